//! HTTP: the router, the error every answer uses, the extractors that
//! authenticate a request, and serving a file with `Range`. The handlers
//! are by resource: `jobs` (a submitter's jobs), `hosts` (the build hosts'
//! calls), `page` (the browser page). The API, version 1: every request
//! carries `Authorization: Bearer <token>`; an account sees and touches
//! only its own jobs (another's id is a 404, as if it did not exist).

pub mod caches;
pub mod debug;
pub mod hosts;
pub mod jobs;
pub mod page;
pub mod rerun;
pub mod result_cache;
pub mod submit;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Path as UrlPath};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::app::{App, MAX_FAILURES_PER_MINUTE};
use crate::auth::{self, Failure};
use crate::db::{self, Account, JobRecord, Kind};
use crate::quota::Refusal;

/// An error as the API answers it: a status and a JSON body saying why.
pub struct ApiError {
    status: StatusCode,
    body: wire::ErrorBody,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, body: wire::ErrorBody::new(message) }
    }

    pub(crate) fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "no such job")
    }

    pub(crate) fn internal(e: impl std::error::Error) -> ApiError {
        log::error!("internal error: {}", jobfile::error_chain(&e));
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error; the server's log says more")
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        let body = wire::ErrorBody {
            error: r.message,
            limit: Some(r.limit.to_owned()),
            allowed: Some(r.allowed),
            requested: Some(r.requested),
            over_by: Some(r.requested.saturating_sub(r.allowed)),
        };
        ApiError { status, body }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub fn router(app: Arc<App>) -> Router {
    use axum::extract::DefaultBodyLimit;
    Router::new()
        .route("/v1/openapi.json", get(openapi_json))
        .route("/v1/whoami", get(jobs::whoami))
        .route("/v1/jobs", post(submit::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::show))
        .route("/v1/jobs/{id}/log", get(jobs::log_of))
        .route("/v1/jobs/{id}/result", get(jobs::result_of))
        .route("/v1/jobs/{id}/provenance", get(jobs::provenance_of))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/debug", get(debug::attach))
        .route("/v1/jobs/{id}/rerun", post(rerun::rerun))
        .route("/v1/jobs/{id}/cache-hit", get(result_cache::hit_record))
        .route("/v1/result-cache", get(result_cache::list).delete(result_cache::forget_all))
        .route("/v1/result-cache/key", get(result_cache::key))
        .route("/v1/result-cache/{key}", delete(result_cache::forget_one))
        .route("/v1/page-link", post(page::page_link))
        .route("/v1/caches", get(caches::list))
        .route("/v1/caches/clear", post(caches::clear).layer(DefaultBodyLimit::max(4096)))
        .route("/v1/hosts", get(hosts::hosts))
        .route("/v1/hosts/keys", get(hosts::host_keys))
        .route("/v1/host/lease", post(hosts::lease).layer(DefaultBodyLimit::max(hosts::MAX_LEASE_BODY)))
        .route("/v1/host/images", get(hosts::images))
        .route("/v1/host/images/{image}/{file}", get(hosts::image_file))
        .route("/v1/host/jobs/{id}/file", get(hosts::job_file))
        .route("/v1/host/jobs/{id}/renew", post(hosts::renew).layer(DefaultBodyLimit::max(hosts::MAX_RENEW_BODY)))
        .route("/v1/host/jobs/{id}/done", post(hosts::done))
        .route("/v1/host/jobs/{id}/failed", post(hosts::failed))
        .route("/v1/host/jobs/{id}/release", post(hosts::release))
        .route("/v1/host/jobs/{id}/debug", get(debug::offer))
        .route("/page", get(page::page))
        .route("/page/login", post(page::confirm_login).layer(DefaultBodyLimit::max(4096)))
        .route("/page/login/{secret}", get(page::login))
        .route("/page/jobs/{id}/{what}", get(page::page_file))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

/// `GET /v1/openapi.json`: the API's schema (`crate::openapi`), to anyone.
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOCUMENT.get_or_init(crate::openapi::document).clone();
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// The account a request's bearer token names, after checking it. Only a
/// token that fails counts against the client (`auth::Failures`), and a
/// token that verifies is never refused, whatever else came from its address.
pub async fn authenticate(app: &App, headers: &HeaderMap, peer: IpAddr) -> ApiResult<Account> {
    let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "a valid token is needed: Authorization: Bearer <token>");
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        // No token is no attempt: nothing to count, nothing to guess.
        return Err(refused());
    };
    let account = match auth::account_of(token) {
        Some(id) => db::account_by_id(app.db(), id).await.ok().flatten(),
        None => None,
    };
    if let Some(a) = account.filter(|a| auth::matches(token, &a.token_hash) && !a.disabled) {
        return Ok(a);
    }
    match app.failures.record(peer, Instant::now()) {
        Failure::First => log::warn!("refused a request from {peer}: bad token"),
        Failure::Again(_) => log::warn!("refused a request from {peer}: bad token"),
        Failure::TooMany(n) => {
            if n == MAX_FAILURES_PER_MINUTE + 1 {
                log::warn!("{peer}: more than {MAX_FAILURES_PER_MINUTE} bad tokens this minute; answering 429, not logging each");
            }
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed authentications from your address; wait a minute (valid tokens are not affected)",
            ));
        }
    }
    Err(refused())
}

/// The account's job `id`; any other account's, or none, is a 404.
async fn own_job(app: &App, account: &Account, id: &str) -> ApiResult<JobRecord> {
    if !auth::is_job_id(id) {
        return Err(ApiError::not_found());
    }
    db::job(app.db(), account.id, id).await.map_err(ApiError::internal)?.ok_or_else(ApiError::not_found)
}

/// A request's authenticated account (see `authenticate`).
pub struct Authed(pub Account);

impl FromRequestParts<Arc<App>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> ApiResult<Self> {
        let account = AnyAccount::from_request_parts(parts, app).await?.0;
        if account.kind == Kind::Host {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this is a build host's token: it takes work, and cannot submit or read jobs",
            ));
        }
        Ok(Authed(account))
    }
}

/// A request's authenticated account, of either kind.
pub struct AnyAccount(pub Account);

impl FromRequestParts<Arc<App>> for AnyAccount {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> ApiResult<Self> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        authenticate(app, &parts.headers, peer).await.map(AnyAccount)
    }
}

/// A request from a build host's account.
pub struct HostAuthed(pub Account);

impl FromRequestParts<Arc<App>> for HostAuthed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> ApiResult<Self> {
        let account = AnyAccount::from_request_parts(parts, app).await?.0;
        if account.kind != Kind::Host {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "only build hosts take work: make a host account with `construir-server account add NAME --host`",
            ));
        }
        Ok(HostAuthed(account))
    }
}

/// The authenticated account and its job named in the path (`/v1/jobs/{id}/...`).
pub struct OwnJob {
    pub account: Account,
    pub job: JobRecord,
}

impl FromRequestParts<Arc<App>> for OwnJob {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> ApiResult<Self> {
        let Authed(account) = Authed::from_request_parts(parts, app).await?;
        let UrlPath(id) = UrlPath::<String>::from_request_parts(parts, app).await.map_err(|_| ApiError::not_found())?;
        let job = own_job(app, &account, &id).await?;
        Ok(OwnJob { account, job })
    }
}

/// A file, whole or the one byte range asked for (`Range: bytes=a-b`, `a-`,
/// `-n`). Only a regular file with one name, never through a link, and the
/// inode `ino` when given (`store::open_regular`).
pub async fn serve_file(
    path: &std::path::Path,
    ino: Option<crate::store::FileId>,
    headers: &HeaderMap,
    content_type: &str,
) -> ApiResult<Response> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let opened = crate::store::open_regular(path, ino).map_err(|e| {
        log::warn!("not serving {}: {e}", path.display());
        ApiError::new(StatusCode::NOT_FOUND, "no such file")
    })?;
    let mut file = tokio::fs::File::from_std(opened);
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (start, end, status) = match range {
        None => (0, len, StatusCode::OK),
        Some(r) => match parse_range(r, len) {
            Some((a, b)) => (a, b, StatusCode::PARTIAL_CONTENT),
            None => {
                return Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                    .body(Body::empty())
                    .map_err(ApiError::internal)
            }
        },
    };
    file.seek(std::io::SeekFrom::Start(start)).await.map_err(ApiError::internal)?;
    let stream = tokio_util::io::ReaderStream::new(file.take(end - start));
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", end.saturating_sub(1)));
    }
    response.body(Body::from_stream(stream)).map_err(ApiError::internal)
}

/// `bytes=a-b` as the half-open range `[a, b+1)` within `len`; `None` when unsatisfiable.
pub fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (len.saturating_sub(n), len)
        }
        (a, "") => (a.parse().ok()?, len),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.saturating_add(1).min(len)),
    };
    (start < end && start < len).then_some((start, end))
}

/// The headers every answer carries: nothing is framed, sniffed, cached or
/// sent on as a referrer; the page's policy allows its own styles and forms only.
pub async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, name: &'static str, value: &'static str| {
        h.insert(name, axum::http::HeaderValue::from_static(value));
    };
    set(h, "content-security-policy", CSP);
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "no-referrer");
    set(h, "cache-control", "no-store");
    response
}

/// The page's Content-Security-Policy, sent as a header on every answer.
pub const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        type Case = (&'static str, u64, Option<(u64, u64)>);
        let table: &[Case] = &[
            ("bytes=0-99", 1000, Some((0, 100))),
            ("bytes=900-", 1000, Some((900, 1000))),
            ("bytes=-100", 1000, Some((900, 1000))),
            ("bytes=990-2000", 1000, Some((990, 1000))),
            ("bytes=1000-", 1000, None),
            ("bytes=5-3", 1000, None),
            ("bytes=0-1,5-6", 1000, None),
            ("items=0-1", 1000, None),
            ("bytes=x-", 1000, None),
        ];
        for (value, len, want) in table {
            assert_eq!(parse_range(value, *len), *want, "{value}");
        }
    }
}
