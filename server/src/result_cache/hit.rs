//! A hit: the entries a submission may be served, each checked before it is
//! (its files as stored, its provenance verified again), and the first sound
//! one landed in `done/` as the new job's, with the server's signed record.

use std::io;
use std::path::Path;

use construir_provenance::HostKey;
use jobfile::layout::{Landed, Landing};
use jobfile::JobName;
use wire::result_cache::CacheHit;

use super::entry::{self, Entries};
use super::{drop_entry, Submission};
use crate::app::App;
use crate::db::result_cache::{self as rows, Entry};
use crate::db::{self, DbError, JobRecord};
use crate::store::{open_regular, sparse_copy_from, FileId};

/// A hit served: the job's record as finished, and the entry it came from.
pub struct Served {
    pub hit: CacheHit,
    pub file: FileId,
    pub result_bytes: u64,
    pub verdict: String,
}

/// Serves `job` (an upload received whole, not queued) from the cache when
/// an entry for `lookup` that `account` may be served is there and sound:
/// its files are landed in `done/` as the job's, with the signed record of
/// the hit. An entry that is not sound is removed, and the next one tried.
pub async fn serve(app: &App, s: &Submission<'_>, job: &JobRecord, lookup: &str) -> Result<Option<Served>, DbError> {
    let Some(settings) = &app.result_cache else { return Ok(None) };
    let candidates = rows::candidates(app.db(), lookup, s.account.id, settings.share_reproducible).await?;
    for entry in candidates {
        match sound(app, &entry, s.sha256).await? {
            Ok(()) => {}
            Err(why) => {
                drop_entry(app, &entry, &format!("it is no longer sound: {why}")).await;
                continue;
            }
        }
        let hit = CacheHit {
            key: entry.key.clone(),
            job: entry.job_id.clone(),
            made: entry.made.clone(),
            host: entry.host.clone(),
            built_by: entry.ran_on.as_deref().and_then(db::RanOn::from_column).map(|r| r.key_owner()),
            reproduced_on: if entry.shared { entry.hosts.clone() } else { Vec::new() },
        };
        let predicate = construir_provenance::cache_hit::HitPredicate {
            key: entry.key.clone(),
            lookup: lookup.to_owned(),
            job: job.id.clone(),
            job_file: s.sha256.to_owned(),
            original_job: entry.job_id.clone(),
            original_submitted: entry.made.clone(),
            original_host: entry.host.clone(),
            reproduced_on: hit.reproduced_on.clone(),
            served: db::now(),
        };
        let (entries, key, file_name, e) =
            (settings.entries.clone(), settings.key.clone(), job.file_name.clone(), entry.clone());
        let done = app.store.done.clone();
        let landed = tokio::task::spawn_blocking(move || land(&done, &entries, &e, &file_name, &key, predicate))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        match landed {
            Ok(Some((file, result_bytes))) => {
                rows::touch(app.db(), entry.account_id, &entry.key).await?;
                log::info!(
                    "job {}: served from the result cache (entry {} of job {})",
                    job.id,
                    entry.key,
                    entry.job_id
                );
                return Ok(Some(Served { hit, file, result_bytes, verdict: entry.verdict.clone() }));
            }
            Ok(None) => return Ok(None),
            Err(e) => {
                drop_entry(app, &entry, &format!("it could not be served: {e}")).await;
            }
        }
    }
    Ok(None)
}

/// Whether an entry can be served now: each file as stored, and its
/// provenance verifying, as made by its host, against the key the server
/// trusts for that host now, for the job file `sha256`.
async fn sound(app: &App, entry: &Entry, sha256: &str) -> Result<Result<(), String>, DbError> {
    let Some(settings) = &app.result_cache else { return Ok(Err("the server keeps no results".into())) };
    let signers = crate::rebuild::signers(app).await?;
    let (entries, e, sha) = (settings.entries.clone(), entry.clone(), sha256.to_owned());
    Ok(tokio::task::spawn_blocking(move || {
        entries.check(e.account_id, &e.key, &e.files)?;
        let result = entries.file(e.account_id, &e.key, entry::RESULT);
        let provenance = entries.file(e.account_id, &e.key, entry::PROVENANCE);
        let log = entries.file(e.account_id, &e.key, entry::LOG);
        let log = e.files.contains_key(entry::LOG).then_some(log.as_path());
        let ran_on = e.ran_on.as_deref().and_then(db::RanOn::from_column);
        if e.file_sha256 != sha {
            return Err(format!("it was made from the job file {}, not {sha}", e.file_sha256));
        }
        crate::rebuild::verify_run((&result, &provenance, log), ran_on.as_ref(), Some(&sha), &signers).map(drop)
    })
    .await
    .unwrap_or_else(|e| Err(format!("the check broke off: {e}"))))
}

/// Lands `entry`'s files in `done` as job `file_name`'s: its result, its
/// log, its provenance (a shared entry's second run's after it), and the
/// record of the hit signed with `key`. The result's identity and size;
/// `None` when a delivery of that name is there already.
fn land(
    done: &Path,
    entries: &Entries,
    entry: &Entry,
    file_name: &str,
    key: &HostKey,
    predicate: construir_provenance::cache_hit::HitPredicate,
) -> io::Result<Option<(FileId, u64)>> {
    let job = JobName::parse(file_name).map_err(io::Error::other)?;
    let staged = |name: String| done.join(format!(".{name}.hit.tmp"));
    let result = staged(job.done_file_name());
    let (log, provenance) = (staged(job.done_with_extension("log")), staged(job.done_with_extension("intoto.jsonl")));
    let record_staged = staged(job.done_with_extension(construir_provenance::cache_hit::EXTENSION));
    let all = [&result, &log, &provenance, &record_staged];
    for p in all {
        let _ = std::fs::remove_file(p);
    }
    let landed = (|| {
        let from = |name| open_regular(&entries.file(entry.account_id, &entry.key, name), None);
        let (result_bytes, sha256) = sparse_copy_from(from(entry::RESULT)?, &result)?;
        if entry.files.get(entry::RESULT) != Some(&sha256) {
            return Err(io::Error::other("its result changed as it was copied"));
        }
        if entry.files.contains_key(entry::LOG) {
            sparse_copy_from(from(entry::LOG)?, &log)?;
        }
        let mut lines = Vec::new();
        for name in [entry::PROVENANCE, entry::SECOND] {
            if entry.files.contains_key(name) {
                io::Read::read_to_end(&mut from(name)?, &mut lines)?;
            }
        }
        write_synced(&provenance, &lines)?;
        let signed = construir_provenance::cache_hit::sign(key, &job.done_file_name(), &sha256, predicate);
        write_synced(&record_staged, &signed)?;
        let file = FileId::of(&std::fs::metadata(&result)?);
        // The record first: whoever sees the result sees it was served.
        jobfile::layout::rename_noreplace(
            &record_staged,
            &done.join(job.done_with_extension(construir_provenance::cache_hit::EXTENSION)),
        )?;
        let landing = Landing {
            job,
            log: entry.files.contains_key(entry::LOG).then(|| log.clone()),
            provenance: Some(provenance.clone()),
            result: result.clone(),
        };
        Ok(match jobfile::layout::land(done, &landing)? {
            Landed::Done(_) => Some((file, result_bytes)),
            Landed::Taken => None,
        })
    })();
    for p in all {
        let _ = std::fs::remove_file(p);
    }
    landed
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
