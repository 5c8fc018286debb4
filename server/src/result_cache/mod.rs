//! The result cache: a job whose inputs are all those of an earlier job
//! that ended ok is not run again; the server serves that job's result and
//! its original signed provenance, with a record of the hit it signs itself.
//!
//! What keeps it from being poisoned or leaking:
//! - Results come only from hosts, never from a client, and an entry is made
//!   only from a result that ended `ok` and whose provenance verifies against
//!   the key of the host the server recorded for the run, naming the job file
//!   the server received (`crate::rebuild::verify_run`), checked on the
//!   server's own copy of the files. A failure, a debug job, a job with build
//!   caches (their state is in no key) and a job marked `no_result_cache` are
//!   never stored.
//! - The key (`key`) is a sha256 over everything that can change the result;
//!   an entry is served again only while each of its files has the sha256 it
//!   was stored with and its provenance still verifies against a key the
//!   server trusts now. Anything else is a miss, and the entry is removed.
//! - An account is served only its own entries, and, with
//!   `--share-reproducible`, entries a verified rebuild found reproducible on
//!   two different hosts. Which entries another account holds is never
//!   looked at otherwise, so neither a hit nor a miss says anything about them.
//!
//! Entries are files beside the queue (`entry::Entries`) and rows of the
//! `result_cache` table (`db::result_cache`); they count against their
//! account's stored bytes, and the least recently used go when the cache is
//! over `--result-cache-size`.

pub mod entry;
pub mod key;

use std::io;
use std::path::{Path, PathBuf};

use construir_provenance::HostKey;
use jobfile::jobenv::JobEnv;
use jobfile::layout::{Landed, Landing};
use jobfile::JobName;
use wire::result_cache::CacheHit;
use wire::{Place, RebuildOutcome};

use crate::app::App;
use crate::db::result_cache::{self as rows, Entry};
use crate::db::{self, Account, DbError, JobRecord};
use crate::store::{open_regular, sparse_copy_from, FileId};
use entry::Entries;

/// How the server keeps results.
pub struct Settings {
    /// A digest of `--cache-salt` (`key::salt_digest`).
    pub salt: String,
    /// Whether entries reproduced on two hosts are served to every account.
    pub share_reproducible: bool,
    /// Most bytes all entries may take before the least recently used go.
    pub max_bytes: u64,
    pub entries: Entries,
    /// What the server signs each hit's record with.
    pub key: std::sync::Arc<HostKey>,
}

/// The default `--result-cache-size`.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;

/// Where the key that signs hits is kept [default: beside the queue].
pub fn default_key_path(queue: &Path) -> PathBuf {
    jobfile::layout::sibling(queue, "server-keys").join("result-cache.key")
}

/// Where entries are kept: `result-cache/` beside the queue.
pub fn default_root(queue: &Path) -> PathBuf {
    jobfile::layout::sibling(queue, "result-cache")
}

/// What a submission brings to a lookup.
pub struct Submission<'a> {
    pub account: &'a Account,
    pub image: &'a str,
    pub sha256: &'a str,
    pub size: u64,
    pub packages: Option<&'a jobfile::deps::Resolution>,
    pub env: Option<&'a JobEnv>,
    /// Why its result may not be cached, whatever its key: it names build
    /// caches, asks for a debug session, is marked `no_result_cache`.
    pub excluded: Option<&'static str>,
}

/// Why a job that asks for `debug`, names `caches`, is marked
/// `no_result_cache` or is a verified rebuild's second run may not be cached.
pub fn exclusion(no_result_cache: bool, debug: bool, caches: &[String]) -> Option<&'static str> {
    if no_result_cache {
        Some("its submitter asked for no result cache")
    } else if debug {
        Some("it is a debug job")
    } else if !caches.is_empty() {
        Some("it names build caches, whose state is in no key")
    } else {
        None
    }
}

/// The lookup digest of a submission whose result may be cached, or why it may not be.
pub fn lookup_of(app: &App, s: &Submission<'_>) -> Result<String, String> {
    let settings = app.result_cache.as_ref().ok_or("this server keeps no results")?;
    if let Some(why) = s.excluded {
        return Err(why.to_owned());
    }
    let env = s.env.ok_or("its job file could not be read for its newest time")?;
    let dir = app.store.images.join(format!("i{}", s.image));
    let manifest = jobfile::image::ImageManifest::load(&dir).map_err(|e| jobfile::error_chain(&e))?;
    let manifest_sha256 =
        jobfile::image::sha256_file(&dir.join(jobfile::image::MANIFEST)).map_err(|e| e.to_string())?;
    let lookup = key::Lookup {
        job_sha256: s.sha256,
        size: s.size,
        image: s.image,
        manifest_sha256: &manifest_sha256,
        arch: manifest.arch.debian(),
        init: &manifest.builder_version,
        construir: env!("CARGO_PKG_VERSION"),
        packages: s.packages,
        env,
        salt: &settings.salt,
    };
    Ok(lookup.digest())
}

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

/// Removes an entry (its row, then its files), saying why.
async fn drop_entry(app: &App, entry: &Entry, why: &str) {
    let Some(settings) = &app.result_cache else { return };
    match rows::remove(app.db(), entry.account_id, &entry.key).await {
        Ok(true) => {
            settings.entries.remove(entry.account_id, &entry.key);
            log::warn!("result cache: removed entry {} (job {}): {why}", entry.key, entry.job_id);
            let account = db::account_by_id(app.db(), entry.account_id).await.ok().flatten().map(|a| a.name);
            let detail = format!("{} {}: {}", entry.job_id, entry.key, jobfile::sanitize(why.as_bytes()));
            db::audit_or_log(app.db(), account.as_deref(), "result_cache_removed", &detail).await;
        }
        Ok(false) => settings.entries.remove(entry.account_id, &entry.key),
        Err(e) => log::error!("result cache: cannot remove entry {}: {}", entry.key, jobfile::error_chain(&e)),
    }
}

/// Decides, for every job that may be cached and has ended, whether its
/// result is stored (`admit`); then keeps the cache within its size.
pub async fn admit_ended(app: &App) -> Result<(), DbError> {
    if app.result_cache.is_none() {
        return Ok(());
    }
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
    let reproduced = match &job.rebuild {
        Some(pair) => match &pair.verdict {
            None => return Ok(Decision::Wait),
            Some(v) => v.outcome == RebuildOutcome::Reproducible && !v.same_host && v.hosts.len() == 2,
        },
        None => false,
    };
    let twin = match &job.rebuild {
        Some(_) if reproduced => db::twin(app.db(), &job.id).await?,
        _ => None,
    };
    let paths = |j: &JobRecord| {
        (app.store.result_path(&j.file_name), app.store.provenance_path(&j.file_name), app.store.log_path(&j.file_name))
    };
    let (Some(result), Some(provenance), log) = paths(job) else {
        return Ok(Decision::Not("its result or its provenance is gone".into()));
    };
    let mut sources: Vec<(&str, PathBuf)> = vec![(entry::RESULT, result), (entry::PROVENANCE, provenance)];
    sources.extend(log.map(|l| (entry::LOG, l)));
    if let Some(twin) = &twin {
        match paths(twin).1 {
            Some(second) => sources.push((entry::SECOND, second)),
            None => return Ok(Decision::Not("its second run's provenance is gone".into())),
        }
    }
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
    // The row says the files are there: they are put in place first, unless the account has the entry.
    let exists = rows::entries_of(app.db(), job.account_id).await?.iter().any(|e| e.key == key);
    if exists {
        staged.discard();
        rows::set_note(app.db(), &job.id, "not stored: the cache holds its result already").await?;
        return Ok(Decision::Wait);
    }
    if let Err(e) = staged.commit(&settings.entries, job.account_id, &key) {
        return Ok(Decision::Not(format!("its files cannot be kept: {e}")));
    }
    if !rows::insert(app.db(), &entry).await? {
        return Ok(Decision::Wait);
    }
    log::info!(
        "job {}: result cached as {key}{}",
        job.id,
        if entry.shared { " (shared: reproduced on two hosts)" } else { "" }
    );
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

/// Removes the least recently used entries until all fit in `--result-cache-size`.
pub async fn evict(app: &App) -> Result<(), DbError> {
    let Some(settings) = &app.result_cache else { return Ok(()) };
    let mut total = rows::total_bytes(app.db()).await?;
    if total <= settings.max_bytes {
        return Ok(());
    }
    for entry in rows::least_recently_used(app.db()).await? {
        if total <= settings.max_bytes {
            break;
        }
        let why = format!("the cache is over its {} bytes (least recently used first)", settings.max_bytes);
        drop_entry(app, &entry, &why).await;
        total = total.saturating_sub(entry.bytes);
    }
    Ok(())
}

/// Removes `account`'s entry `key`, or all of its entries: how many, and their bytes.
pub async fn forget(app: &App, account: &Account, key: Option<&str>) -> Result<(u64, u64), DbError> {
    let Some(settings) = &app.result_cache else { return Ok((0, 0)) };
    let mut out = (0, 0);
    for entry in rows::entries_of(app.db(), account.id).await? {
        if key.is_some_and(|k| k != entry.key) {
            continue;
        }
        if rows::remove(app.db(), account.id, &entry.key).await? {
            settings.entries.remove(account.id, &entry.key);
            out = (out.0 + 1, out.1 + entry.bytes);
        }
    }
    if out.0 > 0 {
        let what = key.map_or_else(|| format!("all ({} entries)", out.0), str::to_owned);
        db::audit_or_log(app.db(), Some(&account.name), "result_cache_forgot", &what).await;
    }
    Ok(out)
}

/// Removes the entries stored under another `--cache-salt` (at start): how many.
pub async fn disown_other_salts(app: &App) -> Result<usize, DbError> {
    let Some(settings) = &app.result_cache else { return Ok(0) };
    let mut n = 0;
    for entry in rows::least_recently_used(app.db()).await? {
        if entry.salt != settings.salt {
            drop_entry(app, &entry, "it was stored under another --cache-salt").await;
            n += 1;
        }
    }
    Ok(n)
}
