//! construir-server: the front door. Accounts submit job files over HTTP;
//! the server puts them into a construir queue and follows them there. The
//! queue's directories stay the contract: build hosts run unchanged beside
//! it, and the server's database follows what the directories say.

pub mod api;
pub mod auth;
pub mod db;
pub mod farm;
pub mod page;
pub mod sql;
pub mod store;

use std::fs;
use std::sync::Arc;

use api::App;
use db::JobRecord;

/// Makes the database agree with the directories: every job file of a
/// known account that has no record gets one (a database lost or restored
/// from a backup), and every record's state is read again. Returns how many
/// records were added.
pub fn rebuild(app: &App) -> Result<usize, db::DbError> {
    let accounts = db::accounts(&app.db)?;
    let mut added = 0;
    for account in accounts.iter().filter(|a| !a.name.starts_with("removed-")) {
        for file_name in app.store.files_with_prefix(&format!("{}.", account.name)) {
            let Some(id) = file_name.split('.').nth(1).filter(|id| id.len() == 16) else { continue };
            let conn = &app.db;
            if db::job(conn, account.id, id)?.is_some() {
                continue;
            }
            let Ok(job) = jobfile::JobName::parse(&file_name) else { continue };
            let meta = fs::metadata(app.store.queue.join(&file_name))
                .or_else(|_| fs::metadata(app.store.done.join(job.done_file_name())))
                .or_else(|_| fs::metadata(app.store.failed.join(&file_name)))
                .ok();
            let name = job.name().splitn(3, '.').nth(2).unwrap_or(job.name()).to_owned();
            let now = db::now();
            db::insert_job(
                conn,
                &JobRecord {
                    id: id.to_owned(),
                    account_id: account.id,
                    name,
                    image: job.image().to_owned(),
                    file_name: file_name.clone(),
                    size: meta.as_ref().map_or(0, |m| m.len()),
                    submitted: now.clone(),
                    submitted_unix: db::unix_now(),
                    state: "unknown".into(),
                    updated: now,
                    verdict: None,
                    result_bytes: None,
                    deleted: None,
                    host: None,
                    attempts: 0,
                },
            )?;
            db::audit(conn, Some(&account.name), "rebuilt", &format!("{id} {file_name}"))?;
            added += 1;
        }
    }
    let jobs = db::all_jobs(&app.db)?;
    for job in &jobs {
        app.refresh(job);
    }
    Ok(added)
}

/// Deletes the results and logs of finished jobs older than their account's
/// retention, and records it. Returns how many jobs it cleared.
pub fn sweep_retention(app: &App) -> Result<usize, db::DbError> {
    let conn = &app.db;
    let accounts = db::accounts(conn)?;
    let jobs = db::all_jobs(conn)?;
    let mut cleared = 0;
    for job in jobs.iter().filter(|j| j.deleted.is_none() && (j.state == "done" || j.state == "failed")) {
        let Some(account) = accounts.iter().find(|a| a.id == job.account_id) else { continue };
        let Some(days) = account.limits.or(app.defaults).retention_days else { continue };
        if db::unix_now() - job.submitted_unix < (days as i64) * 86_400 {
            continue;
        }
        let Ok(name) = jobfile::JobName::parse(&job.file_name) else { continue };
        for path in [
            app.store.done.join(name.done_file_name()),
            app.store.done.join(name.done_with_extension("log")),
            app.store.failed.join(&job.file_name),
            app.store.failed.join(format!("{}.reason", job.file_name)),
            app.store.failed.join(format!("{}.log", job.file_name)),
        ] {
            let _ = fs::remove_file(path);
        }
        let conn = &app.db;
        db::mark_deleted(conn, &job.id)?;
        db::audit(conn, Some(&account.name), "retention_deleted", &format!("{} after {days} day(s)", job.id))?;
        cleared += 1;
    }
    Ok(cleared)
}

/// Follows the directories and applies retention every `every`, for ever.
pub async fn follow(app: Arc<App>, every: std::time::Duration) {
    loop {
        tokio::time::sleep(every).await;
        let app = app.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = rebuild(&app) {
                log::error!("cannot follow the queue: {e}");
            }
            match sweep_retention(&app) {
                Ok(0) => {}
                Ok(n) => log::info!("retention: deleted the results and logs of {n} job(s)"),
                Err(e) => log::error!("retention: {e}"),
            }
        })
        .await;
    }
}
