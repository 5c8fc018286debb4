//! Verified rebuilds on the server's side: how many hosts are live (so a
//! second run is kept apart from the first only where another host can
//! take it), and the verdict once both runs have ended: each result checked
//! against its signed provenance, then the two compared file by file
//! (`jobfile::rebuild::compare`).

use construir_provenance::PublicKey;
use wire::{Place, RebuildVerdict};

use crate::app::App;
use crate::db::{self, DbError, JobRecord};

/// A remote host heard from within this long counts as live.
pub const LIVE_SEEN: i64 = 60;

/// The hosts that could take a job now: remote hosts heard from within
/// [`LIVE_SEEN`] seconds and not disabled, and local hosts whose
/// `running/<host-id>/.host` is held.
pub async fn live_hosts(app: &App) -> Result<usize, DbError> {
    let remote = db::hosts(app.db()).await?.iter().filter(|h| !h.disabled && h.seen_secs_ago() < LIVE_SEEN).count();
    let store = app.store.clone();
    let local = tokio::task::spawn_blocking(move || {
        store.host_dirs().iter().filter(|(_, dir)| jobfile::layout::host_state(dir).0).count()
    })
    .await
    .unwrap_or(0);
    Ok(remote + local)
}

/// Decides every verified rebuild whose two runs have ended and that has no
/// verdict yet, records it on the first run and removes the pair's terms.
/// Returns how many it decided.
pub async fn settle(app: &App, jobs: &[JobRecord]) -> Result<usize, DbError> {
    let mut decided = 0;
    for first in jobs {
        let Some(pair) = first.rebuild.as_ref().filter(|r| r.verdict.is_none()) else { continue };
        let first_place = app.locate(first);
        if !first_place.is_final() {
            continue;
        }
        let twin = jobs.iter().find(|j| j.id == pair.twin);
        if twin.is_none() && db::state_of(app.db(), &pair.twin).await?.is_some() {
            continue; // its upload is being finished
        }
        let second_place = twin.map(|t| app.locate(t));
        if second_place.as_ref().is_some_and(|p| !p.is_final()) {
            continue;
        }
        let keys = known_keys(app).await?;
        let (app2, first2, twin2) = (app.store.clone(), first.clone(), twin.cloned());
        let verdict = tokio::task::spawn_blocking(move || {
            judge(&app2, &first2, &first_place, twin2.as_ref().zip(second_place.as_ref()), &keys)
        })
        .await
        .unwrap_or_else(|e| not_compared(format!("the comparison broke off: {e}"), Vec::new()));
        if db::set_rebuild_verdict(app.db(), &first.id, &verdict).await? {
            log::info!("job {}: verified rebuild: {}", first.id, verdict.summary());
            let account = db::account_by_id(app.db(), first.account_id).await?.map(|a| a.name);
            let _ = db::audit(
                app.db(),
                account.as_deref(),
                "rebuild_verdict",
                &format!("{} {}", first.id, verdict.outcome),
            )
            .await;
            decided += 1;
        }
        for job in std::iter::once(first).chain(twin) {
            jobfile::rebuild::remove_terms(&app.store.running, job.file_name.as_ref());
        }
    }
    Ok(decided)
}

/// The keys results may be signed with: remote hosts' and Slurm nodes'
/// pinned keys, and the keys local hosts published.
async fn known_keys(app: &App) -> Result<Vec<PublicKey>, DbError> {
    let mut keys: Vec<PublicKey> = db::hosts(app.db())
        .await?
        .iter()
        .filter_map(|h| h.key.as_deref())
        .filter_map(|k| PublicKey::parse(k).ok())
        .collect();
    let store = app.store.clone();
    let local = tokio::task::spawn_blocking(move || store.local_host_keys()).await.unwrap_or_default();
    keys.extend(local.iter().filter_map(|(_, k)| PublicKey::parse(k).ok()));
    keys.extend(db::node_keys(app.db()).await?.iter().filter_map(|(_, k)| PublicKey::parse(k).ok()));
    Ok(keys)
}

fn not_compared(reason: String, hosts: Vec<String>) -> RebuildVerdict {
    RebuildVerdict {
        outcome: RebuildVerdict::NOT_COMPARED.into(),
        same_host: hosts.len() == 2 && hosts[0] == hosts[1],
        hosts,
        files: 0,
        differing: Vec::new(),
        differing_total: 0,
        reason: Some(reason),
        decided: db::now(),
    }
}

/// One run's result, checked against its provenance: the host that signed
/// it (its builder id without `construir-host:`), and its files.
struct Run {
    host: String,
    files: Vec<jobfile::tools::EntryDigest>,
}

fn checked_run(store: &crate::store::Store, job: &JobRecord, keys: &[PublicKey], which: &str) -> Result<Run, String> {
    let result = store.result_path(&job.file_name).ok_or_else(|| format!("the {which} run's result is gone"))?;
    let provenance =
        store.provenance_path(&job.file_name).ok_or_else(|| format!("the {which} run's result has no provenance"))?;
    let log = jobfile::layout::log_beside(&result);
    let verified = construir_provenance::verify(&result, &provenance, keys, log.as_deref())
        .map_err(|e| format!("the {which} run's provenance does not verify: {}", jobfile::error_chain(&e)))?;
    let builder = verified.statement.predicate.run_details.builder.id.clone();
    let host = jobfile::sanitize(builder.strip_prefix("construir-host:").unwrap_or(&builder).as_bytes());
    let files = jobfile::tools::digests(&result, construir_provenance::member_limits())
        .map_err(|e| format!("the {which} run's result cannot be listed: {}", jobfile::error_chain(&e)))?;
    Ok(Run { host, files })
}

/// The verdict on a pair whose runs have ended (`second` none: its record is gone).
fn judge(
    store: &crate::store::Store,
    first: &JobRecord,
    first_place: &Place,
    second: Option<(&JobRecord, &Place)>,
    keys: &[PublicKey],
) -> RebuildVerdict {
    let Some((second, second_place)) = second else {
        return not_compared(
            "the second run was lost: the server stopped while the job was submitted".into(),
            Vec::new(),
        );
    };
    for (place, which) in [(first_place, "first"), (second_place, "second")] {
        match place {
            Place::Done { .. } => {}
            Place::Failed { reason } => return not_compared(format!("the {which} run failed: {reason}"), Vec::new()),
            other => return not_compared(format!("the {which} run is {}", other.name()), Vec::new()),
        }
    }
    let runs =
        checked_run(store, first, keys, "first").and_then(|a| Ok((a, checked_run(store, second, keys, "second")?)));
    let (a, b) = match runs {
        Ok(runs) => runs,
        Err(reason) => return not_compared(reason, Vec::new()),
    };
    let hosts = vec![a.host.clone(), b.host.clone()];
    for (run, which) in [(&a, "first"), (&b, "second")] {
        if let Some(bad) = run.files.iter().find(|e| e.kind == 'f' && e.sha256.is_none()) {
            return not_compared(format!("the {which} run's {} could not be read", bad.path), hosts);
        }
    }
    let jobfile::rebuild::Comparison { files, differing } = jobfile::rebuild::compare(&a.files, &b.files);
    RebuildVerdict {
        outcome: if differing.is_empty() { RebuildVerdict::REPRODUCIBLE } else { RebuildVerdict::DIFFERS }.into(),
        same_host: a.host == b.host,
        hosts,
        files,
        differing_total: differing.len() as u64,
        differing: differing.into_iter().take(jobfile::rebuild::MAX_LISTED).collect(),
        reason: None,
        decided: db::now(),
    }
}
