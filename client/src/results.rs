//! A result fetched from the server, checked against its signed provenance.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use wire::client::Api;

/// Fetches the provenance of run `run` of job `id` beside its result `out`
/// and checks the result against it, as made by the host the server
/// recorded for that run (`wire::Job::built_by`), with that host's key alone.
pub fn verified(api: &Api, job: &wire::Job, id: &str, run: u32, out: &Path) -> Result<construir_provenance::Verified> {
    let provenance = jobfile::layout::provenance_beside(out);
    let mut p = File::create(&provenance).with_context(|| format!("cannot create {}", provenance.display()))?;
    api.download(&format!("jobs/{id}/provenance?run={run}"), 0, None, &mut p)?;
    p.sync_all()?;
    let built_by = match run {
        1 => job.built_by.clone(),
        _ => job.rebuild.as_ref().and_then(|r| r.second_built_by.clone()),
    };
    let signers = server_signers(api, Some(built_by.as_deref()))?;
    let (_, verified) = construir_provenance::verify_signed_as(out, &provenance, &signers, None)
        .map_err(|e| anyhow::anyhow!("{}", jobfile::error_chain(&e)))?;
    Ok(verified)
}

/// The keys the server publishes, each with the host it belongs to (its
/// bare name: a local host's without ` (local)`, a node's without ` (slurm)`).
/// `built_by`: only the key of the host the server recorded for the run
/// (`wire::Job::built_by`), or, for a run with none, only local hosts' keys.
/// `None`: every published key, each still bound to its own host's name.
pub fn server_signers(
    api: &Api,
    built_by: Option<Option<&str>>,
) -> Result<Vec<(String, construir_provenance::PublicKey)>> {
    let wire::HostKeys { keys } = api.get("hosts/keys")?;
    let signers: Vec<_> = keys
        .iter()
        .filter(|k| match built_by {
            None => true,
            Some(Some(host)) => k.host == host,
            Some(None) => k.host.ends_with(" (local)"),
        })
        .filter_map(|k| {
            let key = construir_provenance::PublicKey::parse(&k.key).ok()?;
            let bare = k.host.trim_end_matches(" (local)").trim_end_matches(" (slurm)");
            Some((bare.to_owned(), key))
        })
        .collect();
    if signers.is_empty() {
        match built_by {
            Some(Some(host)) => {
                bail!("the server publishes no key for {}, which ran it", jobfile::sanitize(host.as_bytes()))
            }
            _ => bail!("the server publishes no host keys: no host has signed a result for it yet"),
        }
    }
    Ok(signers)
}

/// Fetches the server's signed record of a job served from its result
/// cache beside the result `out` (`<name>_d<N>.cache-hit.intoto.jsonl`), and
/// checks it with the key the server publishes for it: it must name this
/// job and this result. One line saying what it says.
pub fn cache_hit(api: &Api, id: &str, out: &Path) -> Result<String> {
    use construir_provenance::cache_hit;
    let name = out.file_name().and_then(|n| n.to_str()).context("the result has no name")?;
    let stem = name.strip_suffix(jobfile::name::SUFFIX).unwrap_or(name);
    let path = out.with_file_name(format!("{stem}.{}", cache_hit::EXTENSION));
    let mut line = Vec::new();
    api.download(&format!("jobs/{id}/cache-hit"), 0, Some(64 << 10), &mut line)?;
    std::fs::write(&path, &line).with_context(|| format!("cannot write {}", path.display()))?;
    let key: String = {
        let mut raw = Vec::new();
        api.download("result-cache/key", 0, Some(4096), &mut raw)?;
        String::from_utf8_lossy(&raw).trim().to_owned()
    };
    let key = construir_provenance::PublicKey::parse(&key).map_err(|e| anyhow::anyhow!("the server's key: {e}"))?;
    let statement =
        cache_hit::open(line.trim_ascii_end(), &key).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let sha256 = jobfile::image::sha256_file(out)?;
    if statement.predicate.job != id || statement.subject.first().and_then(|s| s.sha256()) != Some(sha256.as_str()) {
        bail!("{}: it is not the record of this job and this result", path.display());
    }
    let p = &statement.predicate;
    Ok(jobfile::sanitize(
        format!(
            "from cache: the result of job {} of {} on {}, served {} (record signed by the server, {})",
            p.original_job,
            p.original_submitted,
            p.original_host,
            p.served,
            path.display()
        )
        .as_bytes(),
    ))
}
