//! Storing a result: once a job that may be cached has ended, it is decided
//! once whether its result becomes an entry: ended ok, its files copied and
//! the copies verified as its recorded host's.

use std::path::{Path, PathBuf};

use wire::{Place, RebuildOutcome};

use super::entry::{self, Entries};
use super::{drop_removed_accounts, evict, key};
use crate::app::App;
use crate::db::result_cache::{self as rows, Entry};
use crate::db::{self, DbError, JobRecord};

/// Decides, for every job that may be cached and has ended, whether its
/// result is stored (`admit`); then keeps the cache within its size and
/// gives back the room of removed accounts' entries.
pub async fn admit_ended(app: &App) -> Result<(), DbError> {
    if app.result_cache.is_none() {
        return Ok(());
    }
    drop_removed_accounts(app).await?;
    let mut stored = false;
    for job in rows::undecided(app.db()).await? {
        match admit(app, &job).await? {
            Decision::Wait => {}
            Decision::Stored => stored = true,
            Decision::Not(why) => {
                log::info!("job {}: result not cached: {why}", job.id);
                rows::set_note(app.db(), &job.id, &format!("not stored: {why}")).await?;
            }
        }
    }
    if stored {
        evict(app).await?;
    }
    Ok(())
}

enum Decision {
    /// Not yet: a verified rebuild without its verdict.
    Wait,
    Stored,
    Not(String),
}

/// Stores `job`'s result when it may be: ended ok, its provenance verified
/// on the server's own copy of its files, a verified rebuild once its
/// verdict is in (shared when reproducible on two different hosts).
async fn admit(app: &App, job: &JobRecord) -> Result<Decision, DbError> {
    let Some(settings) = &app.result_cache else { return Ok(Decision::Wait) };
    let Some(lookup) = job.cache_lookup.clone() else { return Ok(Decision::Wait) };
    // The verdict the host wrote last in the log, which its provenance signs.
    let verdict = match app.locate(job) {
        Place::Done { verdict, .. } if verdict == "ok" || verdict.starts_with("ok ") => verdict,
        Place::Done { verdict, .. } => return Ok(Decision::Not(format!("it ended {verdict}"))),
        Place::Failed { reason } => return Ok(Decision::Not(format!("it failed: {reason}"))),
        _ => return Ok(Decision::Not("its result is gone".into())),
    };
    let reproduced = match job.rebuild.as_ref().map(|pair| pair.verdict.as_ref()) {
        Some(None) => return Ok(Decision::Wait),
        Some(Some(v)) => v.outcome == RebuildOutcome::Reproducible && !v.same_host && v.hosts.len() == 2,
        None => false,
    };
    let sources = match sources(app, job, reproduced).await? {
        Ok(sources) => sources,
        Err(why) => return Ok(Decision::Not(why)),
    };
    let signers = crate::rebuild::signers(app).await?;
    let (entries, j) = (settings.entries.clone(), job.clone());
    let staged = tokio::task::spawn_blocking(move || stage(&entries, &j, &sources, &signers))
        .await
        .unwrap_or_else(|e| Err(format!("the check broke off: {e}")));
    let (staged, host, machine) = match staged {
        Ok(s) => s,
        Err(why) => return Ok(Decision::Not(why)),
    };
    let key = key::key(&lookup, &machine);
    let hosts = job.rebuild.as_ref().and_then(|p| p.verdict.as_ref()).map(|v| v.hosts.clone()).unwrap_or_default();
    let entry = Entry {
        account_id: job.account_id,
        key: key.clone(),
        lookup,
        salt: settings.salt.clone(),
        job_id: job.id.clone(),
        name: job.name.clone(),
        image: job.image.clone(),
        made: job.submitted.clone(),
        host,
        ran_on: job.ran_on.as_ref().map(db::RanOn::to_column),
        file_sha256: job.file_sha256.clone().unwrap_or_default(),
        hosts: if reproduced { hosts } else { Vec::new() },
        shared: reproduced,
        bytes: staged.bytes,
        files: staged.files.clone(),
        verdict,
        created_unix: db::unix_now(),
        used_unix: db::unix_now(),
    };
    keep(app, &settings.entries, staged, &entry).await
}

/// What an entry of `job` is copied from: its result, provenance and log,
/// and a reproduced rebuild's second provenance; or why it cannot be.
async fn sources(
    app: &App,
    job: &JobRecord,
    reproduced: bool,
) -> Result<Result<Vec<(&'static str, PathBuf)>, String>, DbError> {
    let paths = |j: &JobRecord| {
        (app.store.result_path(&j.file_name), app.store.provenance_path(&j.file_name), app.store.log_path(&j.file_name))
    };
    let (Some(result), Some(provenance), log) = paths(job) else {
        return Ok(Err("its result or its provenance is gone".into()));
    };
    let mut sources = vec![(entry::RESULT, result), (entry::PROVENANCE, provenance)];
    sources.extend(log.map(|l| (entry::LOG, l)));
    if reproduced {
        let second = db::twin(app.db(), &job.id).await?.and_then(|twin| paths(&twin).1);
        match second {
            Some(second) => sources.push((entry::SECOND, second)),
            None => return Ok(Err("its second run's provenance is gone".into())),
        }
    }
    Ok(Ok(sources))
}

/// Puts the staged files in place and writes the entry's row (the row
/// says the files are there, so they come first), unless the account has
/// an entry of that key already.
async fn keep(app: &App, entries: &Entries, staged: entry::Staged, entry: &Entry) -> Result<Decision, DbError> {
    if rows::exists(app.db(), entry.account_id, &entry.key).await? {
        staged.discard();
        rows::set_note(app.db(), &entry.job_id, "not stored: the cache holds its result already").await?;
        return Ok(Decision::Wait);
    }
    if let Err(e) = staged.commit(entries, entry.account_id, &entry.key) {
        return Ok(Decision::Not(format!("its files cannot be kept: {e}")));
    }
    if !rows::insert(app.db(), entry).await? {
        return Ok(Decision::Wait);
    }
    let shared = if entry.shared { " (shared: reproduced on two hosts)" } else { "" };
    log::info!("job {}: result cached as {}{shared}", entry.job_id, entry.key);
    Ok(Decision::Stored)
}

/// Copies a job's files into a staged entry and verifies the copies: the
/// host that signed them and the machine its run had.
fn stage(
    entries: &Entries,
    job: &JobRecord,
    sources: &[(&str, PathBuf)],
    signers: &[(crate::rebuild::Signer, construir_provenance::PublicKey)],
) -> Result<(entry::Staged, String, key::Machine), String> {
    let refs: Vec<(&str, &Path)> = sources.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let staged = entries.stage(&job.id, &refs).map_err(|e| format!("its files cannot be copied: {e}"))?;
    let checked = (|| {
        let log = staged.files.contains_key(entry::LOG).then(|| staged.path(entry::LOG));
        let files = (staged.path(entry::RESULT), staged.path(entry::PROVENANCE));
        let (host, verified) = crate::rebuild::verify_run(
            (&files.0, &files.1, log.as_deref()),
            job.ran_on.as_ref(),
            job.file_sha256.as_deref(),
            signers,
        )?;
        let ext = &verified.statement.predicate.build_definition.external_parameters;
        if ext.debug || !ext.caches.is_empty() {
            return Err("its provenance says it ran as a debug job or with build caches".to_owned());
        }
        Ok((jobfile::sanitize(host.as_bytes()), key::Machine::of(&verified.statement)))
    })();
    match checked {
        Ok((host, machine)) => Ok((staged, host, machine)),
        Err(why) => {
            staged.discard();
            Err(why)
        }
    }
}
