//! The HTTP API, version 1. Every request carries `Authorization: Bearer
//! <token>`; an account sees and touches only its own jobs (another's id is
//! a 404, as if it did not exist).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
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

use crate::auth::{self, Failure};
use crate::db::{self, Account, JobRecord, Kind, Limits};
use crate::quota::{self, Refusal, UploadRules};
use crate::sql::Database;
use crate::store::{Place, Store, XZ_MAGIC};

/// How the server treats uploads and the clients that send them.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Limits for accounts that set none of their own.
    pub defaults: Limits,
    /// How long an upload may go without sending a byte.
    pub idle_timeout: Duration,
    /// How long a whole upload may take, however steadily it trickles.
    pub upload_timeout: Duration,
    /// Uploads under way per account, and the disk's reserve.
    pub uploads: UploadRules,
    /// Whether clients reach the server over TLS (the page's cookie is then `Secure`).
    pub tls: bool,
}

/// Everything a request handler reaches.
pub struct App {
    pub db: Database,
    pub store: Store,
    pub settings: Settings,
    /// Failed authentications per client.
    failures: auth::Failures,
    /// The page's login links and sessions.
    pub sessions: crate::page::Sessions,
    /// How remote build hosts are handed jobs.
    pub farm: crate::farm::Settings,
}

/// Failed authentications a client may make in a minute before its failures are answered 429.
const MAX_FAILURES_PER_MINUTE: u32 = 10;

impl App {
    pub fn new(db: Database, store: Store, settings: Settings, farm: crate::farm::Settings) -> Arc<App> {
        Arc::new(App {
            db,
            store,
            settings,
            failures: auth::Failures::new(MAX_FAILURES_PER_MINUTE, Duration::from_secs(60)),
            sessions: crate::page::Sessions::default(),
            farm,
        })
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Where a job is, as the directories say (only the server's own file counts).
    pub fn locate(&self, job: &JobRecord) -> Place {
        let mut place = self.store.locate(&job.file_name, job.file_id);
        if let (Place::Running { host, .. }, Some(lease_host)) = (&mut place, &job.host) {
            // A farm job's file waits in running/.farm; its host is the lease's.
            host.clone_from(lease_host);
        }
        place
    }

    /// Brings a job's record up to what the directories say; returns where it is.
    pub fn refresh(&self, job: &JobRecord) -> Place {
        let place = self.locate(job);
        let (verdict, bytes) = match &place {
            Place::Done { verdict, result_bytes } => (Some(verdict.as_str()), Some(*result_bytes)),
            Place::Failed { reason } => (Some(reason.as_str()), None),
            _ => (None, None),
        };
        if place.is_final() {
            // A cancel that came too late has nothing left to stop.
            self.store.forget_cancel(&job.file_name);
        }
        // A finished job whose files retention removed keeps its last state.
        if !(place == Place::Missing && job.deleted.is_some()) {
            // One transaction reads, changes and audits: two requests never both log the same change.
            if let Err(e) = db::update_state(self.db(), &job.id, place.name(), verdict, bytes) {
                log::error!("cannot record job {}: {}", job.id, jobfile::error_chain(&e));
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
        let mut body = serde_json::to_value(&r).unwrap_or_else(|_| json!({ "error": r.message }));
        body["over_by"] = json!(r.requested.saturating_sub(r.allowed));
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
        .route("/v1/whoami", get(whoami))
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/log", get(log_of))
        .route("/v1/jobs/{id}/result", get(result_of))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/page-link", post(crate::page::page_link))
        .route("/v1/hosts", get(crate::farm::hosts))
        .route("/v1/host/lease", post(crate::farm::lease).layer(DefaultBodyLimit::max(crate::farm::MAX_LEASE_BODY)))
        .route("/v1/host/images", get(crate::farm::images))
        .route("/v1/host/images/{image}/{file}", get(crate::farm::image_file))
        .route("/v1/host/jobs/{id}/file", get(crate::farm::job_file))
        .route(
            "/v1/host/jobs/{id}/renew",
            post(crate::farm::renew).layer(DefaultBodyLimit::max(crate::farm::MAX_RENEW_BODY)),
        )
        .route("/v1/host/jobs/{id}/done", post(crate::farm::done))
        .route("/v1/host/jobs/{id}/failed", post(crate::farm::failed))
        .route("/v1/host/jobs/{id}/release", post(crate::farm::release))
        .route("/page", get(crate::page::page))
        .route("/page/login", post(crate::page::confirm_login).layer(DefaultBodyLimit::max(4096)))
        .route("/page/login/{secret}", get(crate::page::login))
        .route("/page/jobs/{id}/{what}", get(crate::page::page_file))
        .layer(axum::middleware::map_response(crate::page::security_headers))
        .with_state(app)
}

/// The account a request's bearer token names, after checking it. Only a
/// token that fails counts against the client (`auth::Failures`), and a
/// token that verifies is never refused, whatever else came from its address.
pub fn authenticate(app: &App, headers: &HeaderMap, peer: IpAddr) -> ApiResult<Account> {
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
    let account = auth::account_of(token).and_then(|id| db::account_by_id(app.db(), id).ok().flatten());
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

async fn whoami(State(app): State<Arc<App>>, Authed(account): Authed) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!({ "account": account.name, "limits": account.limits.or(app.settings.defaults) })))
}

#[derive(Deserialize)]
struct SubmitQuery {
    name: String,
    image: String,
}

/// Removes a half-written upload and its reservation however the handler
/// ends (an error, or a client that went away).
struct UploadGuard<'a> {
    app: &'a App,
    path: Option<PathBuf>,
    id: String,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            log::info!("job {}: its upload did not finish; removed it and its reservation", self.id);
            let _ = std::fs::remove_file(p);
            if let Err(e) = db::drop_upload(self.app.db(), &self.id) {
                log::error!(
                    "job {}: cannot drop the reservation of a broken upload: {}",
                    self.id,
                    jobfile::error_chain(&e)
                );
            }
        }
    }
}

/// How often, in bytes received, an upload checks the disk's reserve again.
const DISK_CHECK_EVERY: u64 = 8 << 20;

async fn submit(
    State(app): State<Arc<App>>,
    Authed(account): Authed,
    Query(q): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let limits = account.limits.or(app.settings.defaults);
    let job_name = jobfile::JobName::new(&q.name, &q.image)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad job name or image: {e}")))?;
    if !app.store.has_image(job_name.image()) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("no image i{} on this server", job_name.image())));
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let id = auth::new_job_id();
    // The queue name carries the account and the id, so no two accounts' names collide.
    let prefix = format!("{}.{id}.", account.name);
    let name_part: String = format!("{prefix}{}", job_name.name()).chars().take(jobfile::name::MAX_NAME_LEN).collect();
    let queued = jobfile::JobName::new(&name_part, job_name.image())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad job name: {e}")))?;
    let now = db::now();
    let mut record = JobRecord {
        id: id.clone(),
        account_id: account.id,
        name: job_name.name().to_owned(),
        image: job_name.image().to_owned(),
        file_name: queued.input_file_name(),
        size: 0,
        submitted: now.clone(),
        submitted_unix: db::unix_now(),
        state: db::UPLOADING.into(),
        updated: now,
        verdict: None,
        result_bytes: None,
        deleted: None,
        host: None,
        attempts: 0,
        file_id: None,
    };
    // The part file first, then its reservation: a reservation whose part is gone died with its server.
    let upload = app.store.upload_path(&id);
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&upload)
        .await
        .map_err(ApiError::internal)?;
    let mut guard = UploadGuard { app: &app, path: Some(upload.clone()), id: id.clone() };
    let free = app.store.free_bytes().map_err(ApiError::internal)?;
    // Every limit is checked and the bytes reserved in one transaction, before a byte of the body is
    // read (with Expect: 100-continue, before it is sent).
    let reserved = db::reserve_upload(
        app.db(),
        &record,
        |f| app.store.finished(f),
        |usage| quota::admit(usage, &limits, &app.settings.uploads, declared, free),
    )
    .map_err(ApiError::internal)??;
    let mut stream = body.into_data_stream();
    let mut size: u64 = 0;
    let mut checked_disk: u64 = 0;
    let mut head: Vec<u8> = Vec::with_capacity(XZ_MAGIC.len());
    let deadline = tokio::time::Instant::now() + app.settings.upload_timeout;
    loop {
        let wait = app.settings.idle_timeout.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let chunk = match tokio::time::timeout(wait, stream.next()).await {
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the upload took longer than the {} s allowed", app.settings.upload_timeout.as_secs()),
                ))
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the upload sent nothing for {} s", app.settings.idle_timeout.as_secs()),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the upload broke off: {e}")))
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        size += chunk.len() as u64;
        if size > reserved {
            let max_job = limits.max_job_bytes.unwrap_or(u64::MAX);
            return Err(if size > max_job {
                quota::too_large_job(max_job, size)
            } else {
                let max = limits.max_stored_bytes.unwrap_or(u64::MAX);
                quota::too_much_stored(max, max.saturating_sub(reserved).saturating_add(size))
            }
            .into());
        }
        if size - checked_disk >= DISK_CHECK_EVERY {
            checked_disk = size;
            let free = app.store.free_bytes().map_err(ApiError::internal)?;
            if free < app.settings.uploads.min_free {
                return Err(quota::disk_full(free, 0, size, app.settings.uploads.min_free).into());
            }
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
    let ino = crate::store::FileId::of(&file.metadata().await.map_err(ApiError::internal)?);
    drop(file);
    app.store.enqueue(&upload, &record.file_name).map_err(ApiError::internal)?;
    // In the queue now: a failure from here on removes it from there.
    guard.path = Some(app.store.queue.join(&record.file_name));
    if !db::finish_upload(app.db(), &id, size, ino).map_err(ApiError::internal)? {
        return Err(ApiError::internal(std::io::Error::other(format!("job {id}: its reservation vanished"))));
    }
    guard.path = None;
    record.size = size;
    record.file_id = Some(ino);
    let _ = db::audit(app.db(), Some(&account.name), "submitted", &format!("{id} {} ({size} bytes)", record.file_name));
    log::info!("account {}: job {id} submitted as {} ({size} bytes)", account.name, record.file_name);
    let place = app.locate(&record);
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
    if !auth::is_job_id(id) {
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
    let status = jobfile::read_status(crate::store::open_regular(result, None).ok()?)?;
    serde_json::to_value(status).ok()
}

async fn log_of(State(app): State<Arc<App>>, OwnJob { job, .. }: OwnJob, headers: HeaderMap) -> ApiResult<Response> {
    let path = app
        .store
        .log_path(&job.file_name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no log yet: the job has not finished"))?;
    serve_file(&path, None, &headers, "text/plain; charset=utf-8").await
}

async fn result_of(State(app): State<Arc<App>>, OwnJob { job, .. }: OwnJob, headers: HeaderMap) -> ApiResult<Response> {
    let path = app.store.result_path(&job.file_name).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "no result: the job has not finished, failed, or its result was deleted")
    })?;
    serve_file(&path, None, &headers, "application/x-xz").await
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
            if !app.store.request_cancel(&job.file_name).map_err(ApiError::internal)? {
                let place = app.refresh(&job);
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("the job ended as it was being cancelled: it is {}", place.name()),
                ));
            }
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
