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
