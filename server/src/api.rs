//! The HTTP API, version 1. Every request carries `Authorization: Bearer
//! <token>`; an account sees and touches only its own jobs (another's id is
//! a 404, as if it did not exist).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Path as UrlPath, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::auth;
use crate::db::{self, Account, JobRecord, Kind, Limits};
use crate::sql::Database;
use crate::store::{Place, Store, XZ_MAGIC};

/// Everything a request handler reaches.
pub struct App {
    pub db: Database,
    pub store: Store,
    /// Limits for accounts that set none of their own.
    pub defaults: Limits,
    /// How long an upload may go without sending a byte.
    pub idle_timeout: Duration,
    /// Failed authentications per client address, in the current minute.
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// The page's login links and sessions.
    pub sessions: crate::page::Sessions,
    /// How remote build hosts are handed jobs.
    pub farm: crate::farm::Settings,
}

/// Failed authentications a client may make in a minute before it is refused outright.
const MAX_FAILURES_PER_MINUTE: u32 = 10;

impl App {
    pub fn new(
        db: Database,
        store: Store,
        defaults: Limits,
        idle_timeout: Duration,
        farm: crate::farm::Settings,
    ) -> Arc<App> {
        Arc::new(App {
            db,
            store,
            defaults,
            idle_timeout,
            failures: Mutex::new(HashMap::new()),
            sessions: crate::page::Sessions::default(),
            farm,
        })
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Brings a job's record up to what the directories say; returns where it is.
    pub fn refresh(&self, job: &JobRecord) -> Place {
        let mut place = self.store.locate(&job.file_name);
        if let (Place::Running { host, .. }, Some(lease_host)) = (&mut place, &job.host) {
            // A farm job's file waits in running/.farm; its host is the lease's.
            host.clone_from(lease_host);
        }
        let (verdict, bytes) = match &place {
            Place::Done { verdict, result_bytes } => (Some(verdict.as_str()), Some(*result_bytes)),
            Place::Failed { reason } => (Some(reason.as_str()), None),
            _ => (None, None),
        };
        // A finished job whose files retention removed keeps its last state.
        if !(place == Place::Missing && job.deleted.is_some()) {
            // One transaction reads, changes and audits: two requests never both log the same change.
            if let Err(e) = db::update_state(self.db(), &job.id, place.name(), verdict, bytes) {
                log::error!("cannot record job {}: {e}", job.id);
            }
        }
        place
    }
}

/// An error as the API answers it: a status and a JSON body saying why.
pub struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, body: json!({ "error": message.into() }) }
    }

    fn limit(status: StatusCode, limit: &str, allowed: u64, would_be: u64, message: String) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": message, "limit": limit, "allowed": allowed, "requested": would_be, "over_by": would_be.saturating_sub(allowed) }),
        }
    }

    pub(crate) fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "no such job")
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
        log::error!("internal error: {e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error; the server's log says more")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/log", get(log_of))
        .route("/v1/jobs/{id}/result", get(result_of))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/page-link", post(crate::page::page_link))
        .route("/v1/hosts", get(crate::farm::hosts))
        .route("/v1/host/lease", post(crate::farm::lease))
        .route("/v1/host/images", get(crate::farm::images))
        .route("/v1/host/images/{image}/{file}", get(crate::farm::image_file))
        .route("/v1/host/jobs/{id}/file", get(crate::farm::job_file))
        .route("/v1/host/jobs/{id}/renew", post(crate::farm::renew))
        .route("/v1/host/jobs/{id}/done", post(crate::farm::done))
        .route("/v1/host/jobs/{id}/failed", post(crate::farm::failed))
        .route("/v1/host/jobs/{id}/release", post(crate::farm::release))
        .route("/page", get(crate::page::page))
        .route("/page/login/{secret}", get(crate::page::login))
        .route("/page/jobs/{id}/{what}", get(crate::page::page_file))
        .with_state(app)
}

/// The account a request's bearer token names, after checking it.
pub fn authenticate(app: &App, headers: &HeaderMap, peer: IpAddr) -> ApiResult<Account> {
    {
        let failures = app.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, since)) = failures.get(&peer) {
            if *n >= MAX_FAILURES_PER_MINUTE && since.elapsed() < Duration::from_secs(60) {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed authentications; wait a minute",
                ));
            }
        }
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let account = token.and_then(|t| {
        let id = auth::account_of(t)?;
        let account = db::account_by_id(app.db(), id).ok()??;
        (auth::matches(t, &account.token_hash) && !account.disabled).then_some(account)
    });
    match account {
        Some(a) => Ok(a),
        None => {
            let mut failures = app.failures.lock().unwrap_or_else(|p| p.into_inner());
            let entry = failures.entry(peer).or_insert((0, Instant::now()));
            if entry.1.elapsed() >= Duration::from_secs(60) {
                *entry = (0, Instant::now());
            }
            entry.0 += 1;
            log::warn!("refused a request from {peer}: {}", if token.is_some() { "bad token" } else { "no token" });
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "a valid token is needed: Authorization: Bearer <token>"))
        }
    }
}

async fn whoami(State(app): State<Arc<App>>, Authed(account): Authed) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!({ "account": account.name, "limits": account.limits.or(app.defaults) })))
}

#[derive(Deserialize)]
struct SubmitQuery {
    name: String,
    image: String,
}

/// Removes a half-written upload however the handler ends (error, or a client that went away).
struct UploadGuard(Option<PathBuf>);

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn submit(
    State(app): State<Arc<App>>,
    Authed(account): Authed,
    Query(q): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let limits = account.limits.or(app.defaults);
    let job_name = jobfile::JobName::new(&q.name, &q.image)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad job name or image: {e}")))?;
    if !app.store.has_image(job_name.image()) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("no image i{} on this server", job_name.image())));
    }
    // Limits that do not depend on this upload's bytes.
    let mine = db::jobs_of(app.db(), account.id).map_err(ApiError::internal)?;
    // Two stats a job (done/ or failed/ has it), not a walk of the queue for each.
    let unfinished = |j: &&JobRecord| {
        j.deleted.is_none() && j.state != "done" && j.state != "failed" && !app.store.finished(&j.file_name)
    };
    let waiting = mine.iter().filter(unfinished).count() as u64;
    if let Some(max) = limits.max_waiting {
        if waiting + 1 > max {
            return Err(ApiError::limit(
                StatusCode::TOO_MANY_REQUESTS,
                "max_waiting",
                max,
                waiting + 1,
                format!("{waiting} of your jobs are not finished; the limit is {max}"),
            ));
        }
    }
    if let Some(max) = limits.max_per_hour {
        let n = db::submitted_since(app.db(), account.id, db::unix_now() - 3600).map_err(ApiError::internal)?;
        if n + 1 > max {
            return Err(ApiError::limit(
                StatusCode::TOO_MANY_REQUESTS,
                "max_per_hour",
                max,
                n + 1,
                format!("you submitted {n} jobs in the last hour; the limit is {max}"),
            ));
        }
    }
    let stored: u64 = mine.iter().filter(|j| j.deleted.is_none()).map(|j| j.size).sum();
    let max_job = limits.max_job_bytes.unwrap_or(u64::MAX);
    let room = limits.max_stored_bytes.map_or(u64::MAX, |m| m.saturating_sub(stored));
    let allowed = max_job.min(room);
    let too_large = |size: u64| {
        if size > max_job {
            ApiError::limit(
                StatusCode::PAYLOAD_TOO_LARGE,
                "max_job_bytes",
                max_job,
                size,
                format!("the job file is larger than the {max_job} bytes allowed"),
            )
        } else {
            let max = limits.max_stored_bytes.unwrap_or(u64::MAX);
            ApiError::limit(
                StatusCode::PAYLOAD_TOO_LARGE,
                "max_stored_bytes",
                max,
                stored + size,
                format!("your jobs would hold {} bytes; the limit is {max}", stored + size),
            )
        }
    };
    // Checked before the upload (its declared length) and during it (what arrives).
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
    {
        if len > allowed {
            return Err(too_large(len));
        }
    }
    let id = auth::new_job_id();
    let upload = app.store.upload_path(&id);
    let mut guard = UploadGuard(Some(upload.clone()));
    let mut file =
        tokio::fs::OpenOptions::new().write(true).create_new(true).open(&upload).await.map_err(ApiError::internal)?;
    let mut stream = body.into_data_stream();
    let mut size: u64 = 0;
    let mut head: Vec<u8> = Vec::with_capacity(XZ_MAGIC.len());
    loop {
        let chunk = match tokio::time::timeout(app.idle_timeout, stream.next()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the upload sent nothing for {} s", app.idle_timeout.as_secs()),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the upload broke off: {e}")))
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        size += chunk.len() as u64;
        if size > allowed {
            return Err(too_large(size));
        }
        if head.len() < XZ_MAGIC.len() {
            head.extend(chunk.iter().take(XZ_MAGIC.len() - head.len()));
        }
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    if size < jobfile::MIN_JOB_SIZE {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{size} bytes is too small: a job file is at least {} bytes (its size is how much output may come back)", jobfile::MIN_JOB_SIZE)));
    }
    if head != XZ_MAGIC {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "not a job file: it does not start with an xz stream"));
    }
    file.sync_all().await.map_err(ApiError::internal)?;
    drop(file);
    // The queue name carries the account and the id, so no two accounts' names collide.
    let prefix = format!("{}.{id}.", account.name);
    let name_part: String = format!("{prefix}{}", job_name.name()).chars().take(jobfile::name::MAX_NAME_LEN).collect();
    let queued = jobfile::JobName::new(&name_part, job_name.image()).map_err(ApiError::internal)?;
    let now = db::now();
    let record = JobRecord {
        id: id.clone(),
        account_id: account.id,
        name: job_name.name().to_owned(),
        image: job_name.image().to_owned(),
        file_name: queued.input_file_name(),
        size,
        submitted: now.clone(),
        submitted_unix: db::unix_now(),
        state: "waiting".into(),
        updated: now,
        verdict: None,
        result_bytes: None,
        deleted: None,
        host: None,
        attempts: 0,
    };
    db::insert_job(app.db(), &record).map_err(ApiError::internal)?;
    if let Err(e) = app.store.enqueue(&upload, &record.file_name) {
        let _ = db::delete_job(app.db(), &record.id);
        return Err(ApiError::internal(e));
    }
    guard.0 = None;
    let _ = db::audit(app.db(), Some(&account.name), "submitted", &format!("{id} {} ({size} bytes)", record.file_name));
    log::info!("account {}: job {id} submitted as {} ({size} bytes)", account.name, record.file_name);
    let place = app.store.locate(&record.file_name);
    Ok((StatusCode::CREATED, Json(job_json(&record, &place))).into_response())
}

fn job_json(j: &JobRecord, place: &Place) -> serde_json::Value {
    json!({
        "id": j.id,
        "name": j.name,
        "image": j.image,
        "size": j.size,
        "submitted": j.submitted,
        "state": place.name(),
        "place": place,
        "deleted": j.deleted,
        "attempts": j.attempts,
    })
}

async fn list(State(app): State<Arc<App>>, Authed(account): Authed) -> ApiResult<Json<serde_json::Value>> {
    let jobs = db::jobs_of(app.db(), account.id).map_err(ApiError::internal)?;
    let out: Vec<_> = jobs.iter().map(|j| job_json(j, &app.refresh(j))).collect();
    Ok(Json(json!({ "jobs": out })))
}

/// The account's job `id`; any other account's, or none, is a 404.
fn own_job(app: &App, account: &Account, id: &str) -> ApiResult<JobRecord> {
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::not_found());
    }
    db::job(app.db(), account.id, id).map_err(ApiError::internal)?.ok_or_else(ApiError::not_found)
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
        authenticate(app, &parts.headers, peer).map(AnyAccount)
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
        let job = own_job(app, &account, &id)?;
        Ok(OwnJob { account, job })
    }
}

async fn show(State(app): State<Arc<App>>, OwnJob { job, .. }: OwnJob) -> ApiResult<Json<serde_json::Value>> {
    let place = app.refresh(&job);
    let mut out = job_json(&job, &place);
    if let Some(result) = app.store.result_path(&job.file_name) {
        // The status, read with the same bounds as the host's own reader.
        if let Ok(status) = tokio::task::spawn_blocking(move || jobfile_status(&result)).await {
            out["status"] = status.unwrap_or(serde_json::Value::Null);
        }
    }
    Ok(Json(out))
}

fn jobfile_status(result: &std::path::Path) -> Option<serde_json::Value> {
    let status = jobfile::read_status(std::fs::File::open(result).ok()?)?;
    serde_json::to_value(status).ok()
}

async fn log_of(State(app): State<Arc<App>>, OwnJob { job, .. }: OwnJob, headers: HeaderMap) -> ApiResult<Response> {
    let path = app
        .store
        .log_path(&job.file_name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no log yet: the job has not finished"))?;
    serve_file(&path, &headers, "text/plain; charset=utf-8").await
}

async fn result_of(State(app): State<Arc<App>>, OwnJob { job, .. }: OwnJob, headers: HeaderMap) -> ApiResult<Response> {
    let path = app.store.result_path(&job.file_name).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "no result: the job has not finished, failed, or its result was deleted")
    })?;
    serve_file(&path, &headers, "application/x-xz").await
}

/// A file, whole or the one byte range asked for (`Range: bytes=a-b`, `a-`, `-n`).
pub async fn serve_file(path: &std::path::Path, headers: &HeaderMap, content_type: &str) -> ApiResult<Response> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await.map_err(ApiError::internal)?;
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

async fn cancel(State(app): State<Arc<App>>, OwnJob { account, job }: OwnJob) -> ApiResult<Json<serde_json::Value>> {
    let id = job.id.clone();
    let reason = format!("cancelled by {} at {}", account.name, db::now());
    match app.refresh(&job) {
        Place::Waiting { .. } => {
            if !app.store.cancel_waiting(&job.file_name, &reason).map_err(ApiError::internal)? {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "a build host claimed the job as it was being cancelled; it is running now",
                ));
            }
        }
        Place::Running { host, .. } => {
            app.store.request_cancel(&job.file_name).map_err(ApiError::internal)?;
            let _ = db::audit(app.db(), Some(&account.name), "cancel_requested", &id);
            let place = app.refresh(&job);
            let mut out = job_json(&job, &place);
            out["cancel"] =
                json!(format!("requested: {host} stops the VM within seconds; the job then ends in failed"));
            return Ok(Json(out));
        }
        other => {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("the job is {}: nothing to cancel", other.name())));
        }
    }
    let _ = db::audit(app.db(), Some(&account.name), "cancelled", &id);
    let place = app.refresh(&job);
    Ok(Json(job_json(&job, &place)))
}

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
