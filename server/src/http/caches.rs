//! `/v1/caches`: an account's build caches, as the hosts that keep them
//! say: the local hosts of the server's queue each write what they hold to
//! `running/.caches/host.<host-id>.json`, and remote hosts say it each time they
//! ask for work. Clearing raises the caches' generations: no host lends
//! what they held again, and each frees its copies when it next hears of it.

use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{ApiError, ApiResult, Authed};
use jobfile::layout::CacheTree;

use crate::app::App;
use crate::db;
use crate::lease::current;

/// Every local host's report: (host id, what it holds).
fn local_reports(running: &Path) -> Vec<(String, Vec<wire::HeldCache>)> {
    let mut out = Vec::new();
    for (host, read) in CacheTree::of(running).reports::<Vec<wire::HeldCache>>() {
        match read {
            Ok(held) => out.push((jobfile::sanitize(host.as_bytes()), held)),
            Err(why) => log::warn!("{why}"),
        }
    }
    out
}

/// Every host's held caches: local hosts by their id and `(local)`, remote ones by account.
async fn all_reports(app: &App) -> Result<Vec<(String, Vec<wire::HeldCache>)>, db::DbError> {
    let running = app.store.running.clone();
    let mut out: Vec<(String, Vec<wire::HeldCache>)> = tokio::task::spawn_blocking(move || local_reports(&running))
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(host, held)| (format!("{host} (local)"), held))
        .collect();
    out.extend(db::hosts(app.db()).await?.into_iter().map(|h| (h.name, h.caches)));
    Ok(out)
}

/// The account's caches on every host, at their current generation.
async fn caches_of(app: &App, account: &db::Account) -> Result<Vec<wire::CacheView>, db::DbError> {
    let generations = db::cache_generations(app.db()).await?;
    let owner = jobfile::caches::account_owner(account.id);
    let mut out: Vec<wire::CacheView> = Vec::new();
    for (host, held) in all_reports(app).await? {
        for c in current(&held, &generations).filter(|c| c.owner == owner) {
            out.push(wire::CacheView {
                host: host.clone(),
                image: c.image.clone(),
                name: c.name.clone(),
                version: c.version,
                bytes: c.bytes,
                used: c.used.clone(),
            });
        }
    }
    out.sort_by(|a, b| b.used.cmp(&a.used).then_with(|| a.name.cmp(&b.name)).then_with(|| a.host.cmp(&b.host)));
    Ok(out)
}

#[utoipa::path(
    get,
    path = "/v1/caches",
    tag = "submitters",
    responses((status = 200, description = "the account's build caches on every host, most recently used first", body = wire::CacheList), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn list(State(app): State<Arc<App>>, Authed(account): Authed) -> ApiResult<Json<wire::CacheList>> {
    Ok(Json(wire::CacheList { caches: caches_of(&app, &account).await.map_err(ApiError::internal)? }))
}

/// One writer of the generations file at a time: each writes what the database says after its change.
static GENERATIONS_WRITER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Writes every account's cleared caches to `running/.caches/generations.json`,
/// where the server's local hosts read them.
pub async fn publish_generations(app: &App) -> std::io::Result<()> {
    let _one = GENERATIONS_WRITER.lock().await;
    let generations = db::cache_generations(app.db()).await.map_err(std::io::Error::other)?;
    let running = app.store.running.clone();
    tokio::task::spawn_blocking(move || CacheTree::of(&running).write_generations(&generations))
        .await
        .map_err(std::io::Error::other)?
}

#[utoipa::path(
    post,
    path = "/v1/caches/clear",
    tag = "submitters",
    request_body(content = wire::ClearCaches),
    responses((status = 200, description = "the caches cleared: no job starts from what they held", body = wire::ClearedCaches), (status = 400, description = "not a cache name", body = wire::ErrorBody), (status = 404, description = "no host holds a cache of that name for the account", body = wire::ErrorBody), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn clear(
    State(app): State<Arc<App>>,
    Authed(account): Authed,
    Json(req): Json<wire::ClearCaches>,
) -> ApiResult<Json<wire::ClearedCaches>> {
    let held = caches_of(&app, &account).await.map_err(ApiError::internal)?;
    let names: Vec<String> = match req.name {
        Some(name) => {
            jobfile::caches::check_name(&name).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
            // Only a cache some host holds is recorded as cleared: names made up by the thousand
            // would grow the generations file every host reads until it is refused.
            if !held.iter().any(|c| c.name == name) {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no host holds a build cache named {name} for this account: nothing to clear"),
                ));
            }
            vec![name]
        }
        None => {
            let mut names: Vec<String> = held.iter().map(|c| c.name.clone()).collect();
            names.sort();
            names.dedup();
            names
        }
    };
    let copies = held.iter().filter(|c| names.contains(&c.name)).count() as u64;
    if !names.is_empty() {
        db::clear_caches(app.db(), &account, &names).await.map_err(ApiError::internal)?;
        publish_generations(&app).await.map_err(ApiError::internal)?;
        log::info!("account {}: build caches cleared: {} ({copies} copies on hosts)", account.name, names.join(", "));
    }
    Ok(Json(wire::ClearedCaches { cleared: names, copies }))
}
