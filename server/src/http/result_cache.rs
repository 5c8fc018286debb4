//! `/v1/result-cache`: an account's entries in the result cache, and
//! forgetting them; `/v1/result-cache/key`, the key that signs the records
//! of cache hits; `/v1/jobs/{id}/cache-hit`, a served job's record.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use wire::result_cache::{Forgotten, ResultCacheEntry, ResultCacheList};

use super::{serve_file, ApiError, ApiResult, Authed, OwnJob};
use crate::app::App;
use crate::db;
use crate::result_cache;

/// The answer when the server keeps no results.
fn off() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "this server keeps no results (it runs with --no-result-cache)")
}

#[utoipa::path(
    get,
    path = "/v1/result-cache",
    tag = "submitters",
    responses((status = 200, description = "the account's entries in the result cache, most recently used first", body = ResultCacheList), (status = 404, description = "the server keeps no results", body = wire::ErrorBody), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn list(State(app): State<Arc<App>>, Authed(account): Authed) -> ApiResult<Json<ResultCacheList>> {
    app.result_cache.as_ref().ok_or_else(off)?;
    let entries = db::result_cache::entries_of(app.db(), account.id).await.map_err(ApiError::internal)?;
    let entries = entries
        .into_iter()
        .map(|e| ResultCacheEntry {
            key: e.key,
            name: e.name,
            image: e.image,
            job: e.job_id,
            made: e.made,
            host: e.host,
            bytes: e.bytes,
            shared: e.shared,
            used: jobfile::units::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.used_unix.max(0) as u64),
            ),
        })
        .collect();
    Ok(Json(ResultCacheList { entries }))
}

#[utoipa::path(
    delete,
    path = "/v1/result-cache/{key}",
    tag = "submitters",
    params(("key" = String, Path, description = "the entry's key, 64 hex digits")),
    responses((status = 200, description = "the entry is gone: the next such job runs", body = Forgotten), (status = 404, description = "no entry of the account has that key, or the server keeps no results", body = wire::ErrorBody), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn forget_one(
    State(app): State<Arc<App>>,
    Authed(account): Authed,
    Path(key): Path<String>,
) -> ApiResult<Json<Forgotten>> {
    app.result_cache.as_ref().ok_or_else(off)?;
    let (entries, bytes) = result_cache::forget(&app, &account, Some(&key)).await.map_err(ApiError::internal)?;
    if entries == 0 {
        let shown = jobfile::sanitize(key.as_bytes());
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no entry of yours has the key {shown}")));
    }
    Ok(Json(Forgotten { entries, bytes }))
}

#[utoipa::path(
    delete,
    path = "/v1/result-cache",
    tag = "submitters",
    responses((status = 200, description = "every entry of the account is gone", body = Forgotten), (status = 404, description = "the server keeps no results", body = wire::ErrorBody), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn forget_all(State(app): State<Arc<App>>, Authed(account): Authed) -> ApiResult<Json<Forgotten>> {
    app.result_cache.as_ref().ok_or_else(off)?;
    let (entries, bytes) = result_cache::forget(&app, &account, None).await.map_err(ApiError::internal)?;
    Ok(Json(Forgotten { entries, bytes }))
}

#[utoipa::path(
    get,
    path = "/v1/result-cache/key",
    tag = "submitters",
    responses((status = 200, description = "the public key that signs cache hits' records (`ed25519:<base64>`)", content_type = "text/plain"), (status = 404, description = "the server keeps no results", body = wire::ErrorBody), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn key(State(app): State<Arc<App>>, Authed(_): Authed) -> ApiResult<String> {
    let settings = app.result_cache.as_ref().ok_or_else(off)?;
    Ok(format!("{}\n", settings.key.public()))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/cache-hit",
    tag = "submitters",
    params(("id" = String, Path, description = "the job id, 16 hex digits")),
    responses((status = 200, description = "the record of a job served from the result cache: a DSSE envelope of an in-toto statement (predicate `urn:construir:predicate:result-cache-hit:v1`) signed with the key of `GET /v1/result-cache/key`", content_type = "application/x-ndjson"), (status = 404, description = "the job was not served from the cache, or its result was deleted", body = wire::ErrorBody), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn hit_record(
    State(app): State<Arc<App>>,
    OwnJob { job, .. }: OwnJob,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let path = job
        .from_cache
        .as_ref()
        .and_then(|_| app.store.done_file(&job.file_name, construir_provenance::cache_hit::EXTENSION));
    let path = path.ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "no record of a cache hit: the job was run, or its result was deleted")
    })?;
    serve_file(&path, None, &headers, "application/x-ndjson").await
}
