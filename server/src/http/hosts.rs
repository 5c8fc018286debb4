//! The build hosts' half of the API (`/v1/host/...`): take a job under a
//! lease, fetch it and the images, renew, deliver or give it back; and
//! `GET /v1/hosts`, the hosts as a submitter sees them. What a lease is and
//! how it ends is `crate::lease`'s.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path as UrlPath, Query, State};
use axum::http::request::Parts as RequestParts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use jobfile::layout::Terms;
use tokio::io::AsyncWriteExt;
use wire::{HostImage, LeaseRequest, SeqQuery, MAX_HOST_IMAGES};

use super::{AnyAccount, ApiError, ApiResult, HostAuthed};
use crate::app::App;
use crate::db::{self, Account, Kind};
use crate::lease::{current, land, leave_for_warmer, offered_images, part, warm_elsewhere, MAX_CONSOLE};

/// Most bytes of a lease request's body (a full list of images is about 6 KiB).
pub const MAX_LEASE_BODY: usize = 64 << 10;

/// Most bytes of a renewal's body: the console a host sends with it (it sends 256 KiB at most).
pub const MAX_RENEW_BODY: usize = 1 << 20;

/// What a host says it holds, counting only caches of jobs the server gave
/// it: its word about any other (another account's, made up) is dropped.
async fn given_only(app: &App, host: &db::Account, held: Vec<wire::HeldCache>) -> ApiResult<Vec<wire::HeldCache>> {
    let given = db::given_caches(app.db(), host.id).await.map_err(ApiError::internal)?;
    let (held, unknown): (Vec<wire::HeldCache>, Vec<wire::HeldCache>) =
        held.into_iter().partition(|c| given.contains(&(c.owner.clone(), c.image.clone(), c.name.clone())));
    if !unknown.is_empty() {
        let n = unknown.len();
        log::warn!("host {}: says it holds {n} build cache(s) it was given no job for; not counted", host.name);
    }
    Ok(held)
}

/// `POST /v1/host/lease`: record the host, and hand it a job when it has room.
#[utoipa::path(
    post,
    path = "/v1/host/lease",
    tag = "build hosts",
    request_body(content = wire::LeaseRequest),
    responses((status = 200, description = "a job under a lease, or none for now", body = wire::LeaseAnswer), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody), (status = 400, description = "what the host said of itself did not pass the checks", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn lease(
    State(app): State<Arc<App>>,
    HostAuthed(host): HostAuthed,
    Json(req): Json<LeaseRequest>,
) -> ApiResult<Json<wire::LeaseAnswer>> {
    let (req, usable) = heard_from(&app, &host, req).await?;
    // The generations of every owner whose caches the host holds: it frees those cleared.
    let generations = db::cache_generations(app.db()).await.map_err(ApiError::internal)?;
    let lease =
        if req.running >= req.capacity { None } else { hand_out(&app, &host, &req, &usable, &generations).await? };
    let mut owners: Vec<String> = req.caches.iter().map(|c| c.owner.clone()).collect();
    owners.extend(lease.as_ref().and_then(|l| l.owner.clone()));
    let generations = generations.into_iter().filter(|(o, _)| owners.contains(o)).collect();
    Ok(Json(wire::LeaseAnswer { lease, generations }))
}

/// Records what the host said of itself, and pins its key the first time
/// (another one later is refused until an operator unpins it). The request
/// with only the caches the server gave it jobs for, and the images it has
/// exactly as the server has them.
async fn heard_from(app: &App, host: &Account, req: LeaseRequest) -> ApiResult<(LeaseRequest, Vec<String>)> {
    req.check().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad lease request: {e}")))?;
    let offered = offered_images(&app.store);
    let usable: Vec<String> = req
        .images
        .iter()
        .filter(|i| offered.iter().any(|o| o.name == i.name && o.checksum == i.checksum))
        .map(|i| i.name.clone())
        .collect();
    let images = serde_json::to_string(&req.images).unwrap_or_default();
    let req = LeaseRequest { caches: given_only(app, host, req.caches).await?, ..req };
    let caches = serde_json::to_string(&req.caches).unwrap_or_default();
    let (now, capacity) = (db::unix_now(), req.capacity.min(1024));
    let said = crate::heard::digest(&(&images, capacity, &req.version, &caches));
    if app.heard.seen_is_news(host.id, now, said) {
        db::host_seen(app.db(), host.id, &images, capacity, &req.version, &caches).await.map_err(ApiError::internal)?;
        app.heard.written(host.id, now, Some(said));
    }
    let Some(key) = &req.key else { return Ok((req, usable)) };
    let key = construir_provenance::PublicKey::parse(key)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad lease request: {e}")))?
        .to_string();
    let pinned = db::pin_key(app.db(), host, &key).await.map_err(ApiError::internal)?;
    if pinned != key {
        log::warn!("host {}: refused: it signs with {key}, but {pinned} is pinned for it", host.name);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this host signs with {key}, but {pinned} is pinned for it; if its key was replaced on purpose, \
                 an operator unpins the old one: construir-server account unpin-key {}",
                host.name
            ),
        ));
    }
    Ok((req, usable))
}

/// Leases the host the oldest job it may take, its file moved to
/// `running/.farm/`; none when there is none. A job that another server, a
/// local host or its submitter moved first is skipped.
async fn hand_out(
    app: &App,
    host: &Account,
    req: &LeaseRequest,
    usable: &[String],
    generations: &jobfile::caches::Generations,
) -> ApiResult<Option<wire::Lease>> {
    // Where the build caches are warm: a job that names caches goes, for a while, to a free host that holds one.
    let here: std::collections::HashSet<_> =
        current(&req.caches, generations).map(|c| (c.owner.clone(), c.image.clone(), c.name.clone())).collect();
    let elsewhere = {
        let hosts = db::hosts(app.db()).await.map_err(ApiError::internal)?;
        // No other host holds a cache: none is warmer, and the leases need not be read.
        if hosts.iter().all(|h| h.name == host.name || h.caches.is_empty()) {
            Default::default()
        } else {
            let leased = db::leased_jobs(app.db()).await.map_err(ApiError::internal)?;
            warm_elsewhere(&hosts, &leased, &host.name, generations)
        }
    };
    for _ in 0..8 {
        let store = app.store.clone();
        // Only the file the server wrote: never a link, a second name or another inode planted in its place.
        // A verified rebuild's run whose other run this host took is left, for a while, to another host.
        let now = db::unix_now().max(0) as u64;
        let take = |c: &db::Candidate| {
            store.waiting_own(&c.file_name, c.ino)
                && !leave_for_warmer(c, &here, &elsewhere, app.farm.warm_wait)
                && !jobfile::rebuild::keeps_off(&store.running, c.file_name.as_ref(), &host.name, now)
        };
        let leased = db::lease_next(app.db(), &host.name, usable, app.farm.lease_ms(), take)
            .await
            .map_err(ApiError::internal)?;
        let Some(lease) = leased else { return Ok(None) };
        fs::create_dir_all(app.store.farm_dir()).map_err(ApiError::internal)?;
        let (queued, leased_path) = (app.store.queue.join(&lease.file_name), app.store.leased(&lease.file_name));
        let moved = app.store.move_job(&queued, &leased_path).map_err(ApiError::internal)?;
        // Swapped between the check and the move: back where it was, and not handed out.
        let swapped = moved && !fs::symlink_metadata(&leased_path).is_ok_and(|m| crate::store::is_own(&m, lease.ino));
        if swapped {
            log::warn!("job {}: a file not written by the server took its place in the queue; not leased", lease.id);
            let _ = app.store.move_job(&leased_path, &queued);
        }
        if !moved || swapped {
            db::unlease(app.db(), &lease).await.map_err(ApiError::internal)?;
            continue;
        }
        log::info!("job {} leased to host {} (lease {}, attempt {})", lease.id, host.name, lease.seq, lease.attempt);
        return with_terms(app, host, lease).map(Some);
    }
    Ok(None)
}

/// A lease as the host gets it, with the job's terms: what the server
/// pinned at submit, from the job's record (or, for a job submitted before
/// records kept it, its pin file), and a verified rebuild's terms, the run
/// noted as this host's before it is handed out.
fn with_terms(app: &App, host: &Account, lease: db::Lease) -> ApiResult<wire::Lease> {
    let terms = Terms::read(&app.store.running, lease.file_name.as_ref()).unwrap_or_else(|why| {
        log::error!("job {}: {why}; it runs without those terms", lease.id);
        Terms::default()
    });
    let rebuild = match terms.rebuild {
        Some(terms) => {
            jobfile::rebuild::write_ran_on(&app.store.running, lease.file_name.as_ref(), &host.name)
                .map_err(ApiError::internal)?;
            // Placed: the host has nothing to keep apart.
            Some(jobfile::rebuild::Terms { apart_until: 0, ..terms })
        }
        None => None,
    };
    Ok(wire::Lease {
        id: lease.id,
        file_name: lease.file_name,
        size: lease.size,
        seq: lease.seq,
        attempt: lease.attempt,
        lease_ms: app.farm.lease_ms() as u64,
        packages: lease.packages.or(terms.pin),
        owner: Some(jobfile::caches::account_owner(lease.account_id)),
        rebuild,
        debug: terms.debug,
        env: terms.env,
    })
}

/// A build host's call about its lease: the host, the job id in the path, the query.
pub struct LeaseCall {
    pub host: Account,
    pub id: String,
    pub q: SeqQuery,
}

impl FromRequestParts<Arc<App>> for LeaseCall {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut RequestParts, app: &Arc<App>) -> ApiResult<Self> {
        let HostAuthed(host) = HostAuthed::from_request_parts(parts, app).await?;
        let UrlPath(id) = UrlPath::<String>::from_request_parts(parts, app).await.map_err(|_| ApiError::not_found())?;
        let Query(q) = Query::<SeqQuery>::from_request_parts(parts, app)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        Ok(LeaseCall { host, id, q })
    }
}

/// A `LeaseCall` under the host's live lease: the job's file name and inode.
pub struct LiveLease {
    pub call: LeaseCall,
    pub file_name: String,
    pub ino: Option<crate::store::FileId>,
}

impl FromRequestParts<Arc<App>> for LiveLease {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut RequestParts, app: &Arc<App>) -> ApiResult<Self> {
        let call = LeaseCall::from_request_parts(parts, app).await?;
        let (file_name, ino) = live(app, &call.id, &call.host.name, call.q.seq).await?;
        Ok(LiveLease { call, file_name, ino })
    }
}

/// The job file (name and inode) of a live lease of `host`, or the refusal a late host gets.
async fn live(app: &App, id: &str, host: &str, seq: u64) -> ApiResult<(String, Option<crate::store::FileId>)> {
    if !crate::auth::is_job_id(id) {
        return Err(ApiError::not_found());
    }
    db::live_lease(app.db(), id, host, seq).await.map_err(ApiError::internal)?.ok_or_else(lease_lost)
}

/// Keeps a lease alive while its own transfer moves: renews it at most
/// every third of its term, from the transfer's progress. A long download
/// or delivery over a slow link never outlives the lease it serves.
pub struct KeepAlive {
    app: Arc<App>,
    id: String,
    host: String,
    seq: u64,
    every: Duration,
    last: std::time::Instant,
}

impl KeepAlive {
    fn new(app: &Arc<App>, id: &str, host: &str, seq: u64) -> KeepAlive {
        let every = app.farm.lease / 3;
        KeepAlive { app: app.clone(), id: id.into(), host: host.into(), seq, every, last: std::time::Instant::now() }
    }

    /// Whether a renewal is due; if so, from now on it is not.
    fn due(&mut self) -> bool {
        if self.last.elapsed() < self.every {
            return false;
        }
        self.last = std::time::Instant::now();
        true
    }

    /// Renews when due; `false` once the lease is lost (expired or taken over).
    async fn progress(&mut self) -> bool {
        if !self.due() {
            return true;
        }
        renew_during_transfer(&self.app, &self.id, &self.host, self.seq).await
    }

    /// Renews when due, without waiting for it: for a transfer whose bytes
    /// flow through a stream (a download), which must not wait on the database.
    fn nudge(&mut self) {
        if self.due() {
            let (app, id, host, seq) = (self.app.clone(), self.id.clone(), self.host.clone(), self.seq);
            tokio::spawn(async move { renew_during_transfer(&app, &id, &host, seq).await });
        }
    }
}

/// Renews a lease while its transfer moves; `false` once it is lost.
async fn renew_during_transfer(app: &App, id: &str, host: &str, seq: u64) -> bool {
    match db::renew(app.db(), id, host, seq, app.farm.lease_ms()).await {
        Ok(renewed) => renewed.is_some(),
        Err(e) => {
            log::error!("job {id}: cannot renew its lease during a transfer: {}", jobfile::error_chain(&e));
            true
        }
    }
}

fn lease_lost() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "lease lost: it ran out or was given to another host; drop the job, its result is not wanted",
    )
}

/// `GET /v1/host/jobs/{id}/file?seq=N`: the job file, to the lease's holder.
#[utoipa::path(
    get,
    path = "/v1/host/jobs/{id}/file",
    tag = "build hosts",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::SeqQuery),
    responses((status = 200, description = "the job file", content_type = "application/x-xz"), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody), (status = 404, description = "no such job", body = wire::ErrorBody), (status = 409, description = "the lease ran out or was given to another host", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn job_file(State(app): State<Arc<App>>, lease: LiveLease, headers: HeaderMap) -> ApiResult<Response> {
    let LiveLease { call: LeaseCall { host, id, q }, file_name, ino } = lease;
    let mut keep = KeepAlive::new(&app, &id, &host.name, q.seq);
    let response = super::serve_file(&app.store.leased(&file_name), ino, &headers, "application/x-xz").await?;
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        keep.nudge();
        chunk
    });
    Ok(Response::from_parts(parts, Body::from_stream(body)))
}

/// `POST /v1/host/jobs/{id}/renew?seq=N&offset=K`, the console from byte K
/// as the body: extends the lease, says whether the submitter cancelled.
#[utoipa::path(
    post,
    path = "/v1/host/jobs/{id}/renew",
    tag = "build hosts",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::SeqQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the console from byte `offset` on (at most 1 MiB)"),
    responses((status = 200, description = "the lease is extended", body = wire::Renewed), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody), (status = 404, description = "no such job", body = wire::ErrorBody), (status = 409, description = "the lease ran out or was given to another host", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn renew(
    State(app): State<Arc<App>>,
    LeaseCall { host, id, q }: LeaseCall,
    body: axum::body::Bytes,
) -> ApiResult<Json<wire::Renewed>> {
    let renewed = db::renew(app.db(), &id, &host.name, q.seq, app.farm.lease_ms()).await.map_err(ApiError::internal)?;
    let file_name = renewed.ok_or_else(lease_lost)?;
    // A busy host asks for no work; its renewals say it is alive.
    let now = db::unix_now();
    if app.heard.touch_is_news(host.id, now) {
        db::host_touch(app.db(), host.id).await.map_err(ApiError::internal)?;
        app.heard.written(host.id, now, None);
    }
    if !body.is_empty() && q.offset < MAX_CONSOLE {
        use std::os::unix::fs::FileExt;
        let path = app.store.farm_console(&file_name);
        let keep = (MAX_CONSOLE - q.offset).min(body.len() as u64) as usize;
        let f =
            fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path).map_err(ApiError::internal)?;
        f.write_all_at(&body[..keep], q.offset).map_err(ApiError::internal)?;
    }
    Ok(Json(wire::Renewed { lease_ms: app.farm.lease_ms() as u64, cancel: app.store.cancel_requested(&file_name) }))
}

/// Removes staged parts however a delivery ends, unless kept.
struct Parts(Vec<PathBuf>, bool);

impl Drop for Parts {
    fn drop(&mut self) {
        if !self.1 {
            for p in &self.0 {
                let _ = fs::remove_file(p);
            }
        }
    }
}

/// Writes the body: its first `first_len` bytes to `first`, the rest to
/// `second` (at most `max_second` bytes), each synced. Returns the second's length.
/// Both are created new (`O_EXCL`): nothing another request staged is ever
/// written. The lease is kept alive while bytes come (`keep`).
async fn receive(
    app: &App,
    body: Body,
    fixed: &[(&PathBuf, u64)],
    second: &Path,
    max_second: u64,
    keep: &mut KeepAlive,
) -> ApiResult<u64> {
    let mut open = tokio::fs::OpenOptions::new();
    open.write(true).create_new(true).mode(0o640);
    // The parts of fixed length first, in order; then the last part.
    let mut firsts = Vec::new();
    for (path, len) in fixed {
        firsts.push((open.open(path).await.map_err(ApiError::internal)?, *len, 0u64));
    }
    let mut b = open.open(second).await.map_err(ApiError::internal)?;
    let mut last = crate::sparse::SparseWriter::new(&mut b);
    let mut stream = body.into_data_stream();
    let mut second_len = 0u64;
    let deadline = tokio::time::Instant::now() + app.settings.upload_timeout;
    loop {
        let wait = app.settings.idle_timeout.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let chunk = match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "the upload stalled or took too long")),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the upload broke off: {e}")))
            }
            Ok(Some(Ok(c))) => c,
        };
        if !keep.progress().await {
            return Err(lease_lost());
        }
        let mut chunk = &chunk[..];
        for (file, len, got) in firsts.iter_mut() {
            if *got < *len && !chunk.is_empty() {
                let n = ((*len - *got) as usize).min(chunk.len());
                file.write_all(&chunk[..n]).await.map_err(ApiError::internal)?;
                *got += n as u64;
                chunk = &chunk[n..];
            }
        }
        if !chunk.is_empty() {
            second_len += chunk.len() as u64;
            if second_len > max_second {
                return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "more than the job's size came back"));
            }
            last.write(chunk).await.map_err(ApiError::internal)?;
        }
    }
    last.finish().await.map_err(ApiError::internal)?;
    if firsts.iter().any(|(_, len, got)| got < len) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the upload ended inside the log or the provenance"));
    }
    for (file, _, _) in &firsts {
        file.sync_all().await.map_err(ApiError::internal)?;
    }
    b.sync_all().await.map_err(ApiError::internal)?;
    Ok(second_len)
}

/// Checks a delivered result as made by `host`: signed with the key pinned
/// for it, as itself, over the job file the server received. What the host
/// signed must be what came.
async fn check_signed(
    app: &App,
    host: &Account,
    (result, provenance, log): (&Path, &Path, &Path),
    job_sha256: Option<String>,
) -> ApiResult<Result<(), String>> {
    let key = db::host_key(app.db(), host.id).await.map_err(ApiError::internal)?;
    let (result, provenance, log, name) = (result.to_owned(), provenance.to_owned(), log.to_owned(), host.name.clone());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let key = key.ok_or("no key is pinned for this host (it sent none when it asked for work)")?;
        let key = construir_provenance::PublicKey::parse(&key).map_err(|e| e.to_string())?;
        let signers = [(crate::rebuild::Signer::Remote(name.clone()), key)];
        let ran_on = db::RanOn::Remote(name);
        let files = (result.as_path(), provenance.as_path(), Some(log.as_path()));
        crate::rebuild::verify_run(files, Some(&ran_on), job_sha256.as_deref(), &signers).map(drop)
    })
    .await
    .map_err(ApiError::internal)
}

/// `POST /v1/host/jobs/{id}/done?seq=N&log_bytes=L&provenance_bytes=P`: the
/// console log (L bytes), the result's signed provenance (P bytes), then
/// the result. Accepted once, under the live lease only, and only when the
/// provenance verifies against the host's pinned key.
#[utoipa::path(
    post,
    path = "/v1/host/jobs/{id}/done",
    tag = "build hosts",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::SeqQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "`log_bytes` bytes of console log, `provenance_bytes` bytes of the result's signed provenance, then the result"),
    responses((status = 200, description = "delivered, once", body = wire::Delivered), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody), (status = 404, description = "no such job", body = wire::ErrorBody), (status = 409, description = "the lease ran out or was given to another host", body = wire::ErrorBody), (status = 400, description = "the body ended inside the log or the provenance, or the result is empty", body = wire::ErrorBody), (status = 413, description = "more than the job's size came back", body = wire::ErrorBody), (status = 422, description = "the result's provenance is missing or does not verify against the host's pinned key; the reason says which check failed", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn done(State(app): State<Arc<App>>, lease: LiveLease, body: Body) -> ApiResult<Json<wire::Delivered>> {
    let LiveLease { call: LeaseCall { host, id, q }, file_name, ino } = lease;
    let size = crate::store::open_regular(&app.store.leased(&file_name), ino)
        .and_then(|f| f.metadata())
        .map_err(ApiError::internal)?
        .len();
    let tag = crate::auth::new_job_id();
    let (log, result) = (part(&app.store, &id, q.seq, &tag, "log"), part(&app.store, &id, q.seq, &tag, "result"));
    let provenance = part(&app.store, &id, q.seq, &tag, "provenance");
    let mut parts = Parts(vec![log.clone(), provenance.clone(), result.clone()], false);
    let mut keep = KeepAlive::new(&app, &id, &host.name, q.seq);
    let fixed = [
        (&log, q.log_bytes.min(MAX_CONSOLE * 2)),
        (&provenance, q.provenance_bytes.min(construir_provenance::MAX_PROVENANCE)),
    ];
    let got = receive(&app, body, &fixed, &result, size, &mut keep).await?;
    if got == 0 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the result is empty"));
    }
    let record = db::job_by_id(app.db(), &id).await.map_err(ApiError::internal)?;
    let job_sha256 = record.as_ref().and_then(|j| j.file_sha256.clone());
    if let Err(why) = check_signed(&app, &host, (&result, &provenance, &log), job_sha256).await? {
        log::warn!("job {id}: refused the result from host {} (lease {}): its provenance: {why}", host.name, q.seq);
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("the result is refused: {why}")));
    }
    let verdict = jobfile::tools::log_verdict(&log).unwrap_or_else(|| "(no verdict in the log)".to_owned());
    accept(&app, &host.name, &id, q.seq, &tag, &file_name, db::Ending::Done, &verdict, &mut parts).await?;
    log::info!("job {id} delivered by host {} (lease {}): {verdict}", host.name, q.seq);
    if let Some(job) = record.filter(|j| !j.caches.is_empty() && j.rebuild.is_none() && j.twin_of.is_none()) {
        let owner = jobfile::caches::account_owner(job.account_id);
        if let Err(e) = db::caches_given(app.db(), host.id, &owner, &job.image, &job.caches).await {
            log::error!(
                "job {id}: cannot record the build caches host {} holds: {}",
                host.name,
                jobfile::error_chain(&e)
            );
        }
    }
    Ok(Json(wire::Delivered { delivered: true, verdict: Some(verdict), reason: None }))
}

/// `POST /v1/host/jobs/{id}/failed?seq=N&log_bytes=L`: the console log (L
/// bytes, maybe none) then the reason, in text.
#[utoipa::path(
    post,
    path = "/v1/host/jobs/{id}/failed",
    tag = "build hosts",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::SeqQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "`log_bytes` bytes of console log, then the reason in text"),
    responses((status = 200, description = "the failure is recorded, once", body = wire::Delivered), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody), (status = 404, description = "no such job", body = wire::ErrorBody), (status = 409, description = "the lease ran out or was given to another host", body = wire::ErrorBody), (status = 400, description = "the body ended inside the log", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn failed(State(app): State<Arc<App>>, lease: LiveLease, body: Body) -> ApiResult<Json<wire::Delivered>> {
    let LiveLease { call: LeaseCall { host, id, q }, file_name, .. } = lease;
    let tag = crate::auth::new_job_id();
    let (log, reason_part) = (part(&app.store, &id, q.seq, &tag, "log"), part(&app.store, &id, q.seq, &tag, "reason"));
    let mut parts = Parts(vec![log.clone(), reason_part.clone()], false);
    let mut keep = KeepAlive::new(&app, &id, &host.name, q.seq);
    receive(&app, body, &[(&log, q.log_bytes.min(MAX_CONSOLE * 2))], &reason_part, 64 << 10, &mut keep).await?;
    let reason = fs::read(&reason_part).map_err(ApiError::internal)?;
    let reason = jobfile::sanitize(&reason);
    let reason = reason.lines().next().unwrap_or("").trim().to_owned();
    let reason = if reason.is_empty() { format!("failed on host {}", host.name) } else { reason };
    let _ = fs::remove_file(&reason_part);
    accept(&app, &host.name, &id, q.seq, &tag, &file_name, db::Ending::Failed, &reason, &mut parts).await?;
    log::info!("job {id} failed on host {} (lease {}): {reason}", host.name, q.seq);
    Ok(Json(wire::Delivered { delivered: true, verdict: None, reason: Some(reason) }))
}

/// Ends the live lease with the delivery (`how`: done or failed), or refuses
/// it; then keeps the staged parts and lands them.
#[allow(clippy::too_many_arguments)]
async fn accept(
    app: &App,
    host: &str,
    id: &str,
    seq: u64,
    tag: &str,
    file_name: &str,
    how: db::Ending,
    verdict: &str,
    parts: &mut Parts,
) -> ApiResult<()> {
    if !db::end_lease(app.db(), id, host, seq, how, verdict, tag).await.map_err(ApiError::internal)? {
        return Err(lease_lost());
    }
    parts.1 = true;
    land(&app.store, file_name, id, seq, tag, how, verdict).map_err(ApiError::internal)?;
    if let Ok(Some(job)) = db::job_by_file(app.db(), file_name).await {
        app.refresh(&job).await;
    }
    Ok(())
}

/// `POST /v1/host/jobs/{id}/release?seq=N`: the host gives the job back
/// unrun (it is stopping); no attempt is counted.
#[utoipa::path(
    post,
    path = "/v1/host/jobs/{id}/release",
    tag = "build hosts",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::SeqQuery),
    responses((status = 200, description = "the job waits again; no attempt is counted", body = wire::Released), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody), (status = 404, description = "no such job", body = wire::ErrorBody), (status = 409, description = "the lease ran out or was given to another host", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn release(State(app): State<Arc<App>>, lease: LiveLease) -> ApiResult<Json<wire::Released>> {
    let LiveLease { call: LeaseCall { host, id, q }, file_name, .. } = lease;
    if !db::end_lease(app.db(), &id, &host.name, q.seq, db::Ending::Released, "", "")
        .await
        .map_err(ApiError::internal)?
    {
        return Err(lease_lost());
    }
    app.store.move_job(&app.store.leased(&file_name), &app.store.queue.join(&file_name)).map_err(ApiError::internal)?;
    let _ = fs::remove_file(app.store.farm_console(&file_name));
    log::info!("job {id} given back by host {} (lease {}): waiting again", host.name, q.seq);
    Ok(Json(wire::Released { released: true }))
}

/// `GET /v1/host/images`: what the server offers, with checksums.
#[utoipa::path(
    get,
    path = "/v1/host/images",
    tag = "build hosts",
    responses((status = 200, description = "the images the server offers", body = wire::ImageList), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn images(State(app): State<Arc<App>>, HostAuthed(_): HostAuthed) -> Json<wire::ImageList> {
    Json(wire::ImageList { images: offered_images(&app.store) })
}

/// `GET /v1/host/images/{image}/{file}`: one file of an offered image.
#[utoipa::path(
    get,
    path = "/v1/host/images/{image}/{file}",
    tag = "build hosts",
    params(("image" = String, Path, description = "the image number"), ("file" = String, Path, description = "a file the image's listing names")),
    responses((status = 200, description = "the file; `Range` is honoured", content_type = "application/octet-stream"), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody), (status = 404, description = "no such image or file", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn image_file(
    State(app): State<Arc<App>>,
    HostAuthed(_): HostAuthed,
    UrlPath((image, file)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let offered = offered_images(&app.store);
    let known = offered.iter().find(|o| o.name == image).is_some_and(|o| o.files.iter().any(|f| f.name == file));
    if !known {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such image file"));
    }
    super::serve_file(
        &app.store.images.join(format!("i{image}")).join(&file),
        None,
        &headers,
        "application/octet-stream",
    )
    .await
}

/// `GET /v1/hosts`: the remote hosts, when each was last seen, its images
/// and capacity, and what it runs now (job ids only of the caller's own jobs).
#[utoipa::path(
    get,
    path = "/v1/hosts",
    tag = "submitters",
    responses((status = 200, description = "the build hosts; job ids only of the caller's own jobs", body = wire::HostList), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn hosts(State(app): State<Arc<App>>, AnyAccount(account): AnyAccount) -> ApiResult<Response> {
    Ok(Json(wire::HostList { hosts: hosts_view(&app, &account).await.map_err(ApiError::internal)? }).into_response())
}

/// `GET /v1/hosts/keys`: the public keys that sign the results of this
/// server's hosts: each remote host's pinned key, each local host's, and each Slurm node's pinned key.
#[utoipa::path(
    get,
    path = "/v1/hosts/keys",
    tag = "submitters",
    responses((status = 200, description = "every host's public key", body = wire::HostKeys), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn host_keys(State(app): State<Arc<App>>, AnyAccount(_): AnyAccount) -> ApiResult<Json<wire::HostKeys>> {
    let mut keys: Vec<wire::HostKey> = db::hosts(app.db())
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .filter_map(|h| Some(wire::HostKey { host: h.name, key: h.key? }))
        .collect();
    let store = app.store.clone();
    let local = tokio::task::spawn_blocking(move || store.local_host_keys()).await.map_err(ApiError::internal)?;
    keys.extend(local.into_iter().map(|(host, key)| wire::HostKey { host: format!("{host} (local)"), key }));
    let nodes = db::node_keys(app.db()).await.map_err(ApiError::internal)?;
    keys.extend(nodes.into_iter().map(|(node, key)| wire::HostKey { host: format!("{node} (slurm)"), key }));
    Ok(Json(wire::HostKeys { keys }))
}

/// The hosts as `account` may see them.
pub async fn hosts_view(app: &App, account: &db::Account) -> Result<Vec<wire::HostView>, db::DbError> {
    let leased = db::leased_jobs(app.db()).await?;
    let generations = db::cache_generations(app.db()).await?;
    let now = db::unix_now();
    let store = app.store.clone();
    let offered = tokio::task::spawn_blocking(move || offered_images(&store)).await.unwrap_or_default();
    Ok(db::hosts(app.db())
        .await?
        .into_iter()
        .map(|h| {
            let running: Vec<_> = leased.iter().filter(|j| j.host.as_deref() == Some(&h.name)).collect();
            let own: Vec<_> = running
                .iter()
                .filter(|j| account.kind == Kind::Submitter && j.account_id == account.id)
                .map(|j| wire::JobRef { id: j.id.clone(), name: j.name.clone() })
                .collect();
            // What a host said is shown to every submitter: only what passes `HostImage::check`.
            // Each image's architecture as the server's own manifest of it says, where the checksums agree.
            let images: Vec<HostImage> = serde_json::from_value::<Vec<HostImage>>(h.images.clone())
                .unwrap_or_default()
                .into_iter()
                .take(MAX_HOST_IMAGES)
                .filter(|i| i.check().is_ok())
                .map(|i| match offered.iter().find(|o| o.name == i.name && o.checksum == i.checksum) {
                    Some(o) => HostImage { arch: o.arch, ..i },
                    None => i,
                })
                .collect();
            // The asking account's warm caches there, as `name (i<image>)`.
            let owner = jobfile::caches::account_owner(account.id);
            let your_caches: Vec<String> = current(&h.caches, &generations)
                .filter(|c| account.kind == Kind::Submitter && c.owner == owner)
                .map(|c| format!("{} (i{})", c.name, c.image))
                .collect();
            let version = if h.version.len() <= 64 && h.version.bytes().all(|b| b.is_ascii_graphic()) {
                h.version.clone()
            } else {
                String::new()
            };
            wire::HostView {
                name: h.name,
                last_seen: h.last_seen,
                seen_secs_ago: (now - h.last_seen_unix).max(0),
                images,
                capacity: h.capacity,
                running: running.len(),
                your_jobs: own,
                your_caches,
                key: h.key.clone(),
                version,
                disabled: h.disabled,
            }
        })
        .collect())
}
