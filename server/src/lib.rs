//! construir-server: the front door. Accounts submit job files over HTTP;
//! the server puts them into a construir queue and follows them there. The
//! queue's directories stay the contract: build hosts run unchanged beside
//! it, and the server's database follows what the directories say.

//!
//! Modules, each depending only on those above it:
//! - `sql`, `db`: the database; `store`: the queue's directories;
//!   `auth`, `quota`, `sessions`: tokens, limits, the page's sessions;
//! - `lease`: handing a job to one remote host and ending its lease;
//!   `rebuild`: verified rebuilds' live hosts and verdicts; `slurm`: the
//!   Slurm executor, which hands jobs to a site's Slurm; `result_cache`:
//!   results kept for the same job again;
//! - `app`: the state every handler reaches;
//! - `http`: the router, the extractors and the handlers by resource
//!   (`jobs`, `hosts`, `page`); `openapi`: the schema made from them;
//!   `listen`: the accept loop.

pub mod app;
pub mod attempt;
pub mod auth;
pub mod db;
pub mod debug;
pub mod heard;
pub mod http;
pub mod lease;
pub mod listen;
pub mod offers;
pub mod openapi;
pub mod quota;
pub mod rebuild;
pub mod result_cache;
pub mod sessions;
pub mod slurm;
pub mod sparse;
pub mod sql;
pub mod store;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use app::App;

/// Makes the records agree with the directories (at start): every job's
/// state is read again, and reservations of uploads that died with their
/// server are dropped. A job that cannot be brought up to date is logged
/// and skipped; nothing here stops the server. Records come only from the
/// server's own uploads: a file in the directories is never taken for an
/// account's by its name.
pub async fn rebuild(app: &App) -> Result<(), db::DbError> {
    bring_up_to_date(app, db::all_jobs(&app.db).await?).await
}

/// `rebuild` for the jobs that can still change (`db::jobs_to_follow`):
/// what the follow loop does every round.
pub async fn catch_up(app: &App) -> Result<(), db::DbError> {
    bring_up_to_date(app, db::jobs_to_follow(&app.db).await?).await
}

async fn bring_up_to_date(app: &App, jobs: Vec<db::JobRecord>) -> Result<(), db::DbError> {
    let queued = store::Queued::default();
    for job in &jobs {
        app.refresh_among(job, &queued).await;
    }
    // Verified rebuilds whose two runs have both ended get their verdict.
    rebuild::settle(app, &jobs).await?;
    // Results of jobs that ended ok are kept for the same job again.
    result_cache::admit_ended(app).await?;
    sweep_uploads(app).await
}

/// Drops the reservations of uploads whose part file is gone or has been
/// idle for twice `--idle-timeout` (another server sharing the database may
/// be receiving the others). An upload whose file reached the queue before
/// its server died becomes the job it was.
pub async fn sweep_uploads(app: &App) -> Result<(), db::DbError> {
    let idle = app.settings.idle_timeout * 2;
    for (id, file_name) in db::uploads(&app.db).await? {
        let part = app.store.upload_path(&id);
        let quiet = fs::symlink_metadata(&part).ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if quiet.is_some_and(|q| q < idle) {
            continue;
        }
        let queued = fs::symlink_metadata(app.store.queue.join(&file_name)).ok().filter(|m| store::is_own(m, None));
        if let Some(meta) = queued.filter(|_| quiet.is_none()) {
            // What the server pinned before it queued the file is the job's, as the upload would have recorded.
            let packages = match jobfile::layout::Terms::read(&app.store.running, file_name.as_ref()) {
                Ok(terms) => terms.pin,
                Err(why) => {
                    log::error!("job {id}: {why}");
                    None
                }
            };
            // And the caches its declaration names, read again from the file.
            let caches = fs::File::open(app.store.queue.join(&file_name))
                .ok()
                .and_then(|f| jobfile::deps::read_from_job(f).ok().flatten())
                .map(|(d, _)| d.caches)
                .unwrap_or_default();
            // Its digest, from the file the server wrote (and no other: checked to be its own just above).
            let sha256 = jobfile::image::sha256_file(&app.store.queue.join(&file_name)).map_err(db::DbError::Io)?;
            let size = (meta.len(), sha256.as_str());
            if db::finish_upload(&app.db, &id, size, store::FileId::of(&meta), packages.as_ref(), &caches).await? {
                log::info!("job {id}: its upload had reached the queue when its server stopped; waiting");
            }
            continue;
        }
        let _ = fs::remove_file(&part);
        db::drop_upload(&app.db, &id).await?;
        log::info!("job {id}: dropped the reservation of an upload that was cut off");
    }
    Ok(())
}

/// How many job files in the directories carry a server-style name but no
/// record: said at start, since the server never takes them for anyone's.
pub async fn unrecorded(app: &App) -> Result<usize, db::DbError> {
    let mut n = 0;
    for name in app.store.server_style_names() {
        if !db::file_recorded(&app.db, &name).await? {
            n += 1;
        }
    }
    Ok(n)
}

/// Deletes the results and logs of finished jobs older than their account's
/// retention, and records it. Returns how many jobs it cleared.
pub async fn sweep_retention(app: &App) -> Result<usize, db::DbError> {
    let conn = &app.db;
    let accounts = db::accounts(conn).await?;
    // Only jobs older than the shortest retention anyone has can be due.
    let shortest = accounts.iter().filter_map(|a| a.limits.or(app.settings.defaults).retention_days).min();
    let Some(shortest) = shortest else { return Ok(0) };
    let jobs = db::ended_before(conn, db::unix_now() - (shortest as i64).saturating_mul(86_400)).await?;
    let mut cleared = 0;
    for job in &jobs {
        let Some(account) = accounts.iter().find(|a| a.id == job.account_id) else { continue };
        let Some(days) = account.limits.or(app.settings.defaults).retention_days else { continue };
        if db::unix_now() - job.submitted_unix < (days as i64) * 86_400 {
            continue;
        }
        let Ok(name) = jobfile::JobName::parse(&job.file_name) else { continue };
        // Only the files that are this job's: no link, no second name.
        for path in [
            app.store.done.join(name.done_file_name()),
            app.store.done.join(name.done_with_extension("log")),
            app.store.done.join(name.done_with_extension(jobfile::layout::PROVENANCE_EXTENSION)),
            app.store.done.join(name.done_with_extension(construir_provenance::cache_hit::EXTENSION)),
            app.store.failed.join(&job.file_name),
            jobfile::layout::beside_entry(&app.store.failed.join(&job.file_name), "reason"),
            jobfile::layout::beside_entry(&app.store.failed.join(&job.file_name), "log"),
        ] {
            if fs::symlink_metadata(&path).is_ok_and(|m| store::is_own(&m, None)) {
                let _ = fs::remove_file(path);
            }
        }
        app.store.forget_input(&job.id);
        let conn = &app.db;
        db::mark_deleted(conn, &job.id).await?;
        db::audit(conn, Some(&account.name), "retention_deleted", &format!("{} after {days} day(s)", job.id)).await?;
        cleared += 1;
    }
    Ok(cleared)
}

/// Ends the leases that ran out and puts right what a crash left
/// (`lease::sweep`); the jobs it moved get their records brought up to date.
pub async fn sweep_leases(app: &App) -> Result<(), db::DbError> {
    for job in lease::sweep(&app.db, &app.store, &app.farm).await? {
        app.refresh(&job).await;
    }
    Ok(())
}

/// Finishes what a crash left between the database and the directories (`lease::reconcile`).
pub async fn reconcile_leases(app: &App) -> Result<(), db::DbError> {
    for job in lease::reconcile(&app.db, &app.store, &app.farm).await? {
        app.refresh(&job).await;
    }
    Ok(())
}

/// Runs `sweep_leases` every `every`, for ever.
pub async fn keep_sweeping(app: Arc<App>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = sweep_leases(&app).await {
            log::error!("cannot sweep the leases: {}", jobfile::error_chain(&e));
        }
    }
}

/// Follows the directories and applies retention every `every`, for ever.
pub async fn follow(app: Arc<App>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = catch_up(&app).await {
            log::error!("cannot follow the queue: {}", jobfile::error_chain(&e));
        }
        match sweep_retention(&app).await {
            Ok(0) => {}
            Ok(n) => log::info!("retention: deleted the results and logs of {n} job(s)"),
            Err(e) => log::error!("retention: {}", jobfile::error_chain(&e)),
        }
    }
}
