//! The farm: build hosts on other machines take jobs from the server.
//!
//! A host account asks for work (`POST /v1/host/lease`) saying which images
//! it has and how many VMs it runs; the server hands it the oldest waiting
//! job for one of them under a lease, decided in one database transaction,
//! and moves the job file to `running/.farm/`. The host renews the lease
//! while the VM runs (sending the console as it goes) and then delivers the
//! result (`done`) or the reason it failed (`failed`). Every lease carries
//! its sequence number, the fencing token: renewals and deliveries under an
//! expired or superseded lease are refused, so a job is delivered once. A
//! lease that runs out puts the job back in the queue, its attempt counted,
//! and after the attempt limit into `failed/` with the reason.
//!
//! Files follow the database: a delivery is staged in `done/` under a
//! hidden name, accepted in the database, then landed. `reconcile` finishes
//! whatever a crash interrupted, from what the database says.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::api::{AnyAccount, ApiError, ApiResult, App, HostAuthed};
use crate::db::{self, Kind};
use crate::store::Store;

/// How the server hands jobs to remote hosts.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// A job whose leases ran out this many times fails.
    pub max_attempts: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings { lease: Duration::from_secs(30), max_attempts: 3 }
    }
}

impl Settings {
    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }
}

/// Most console bytes the server keeps of a running farm job.
const MAX_CONSOLE: u64 = 16 << 20;

/// An image as the server offers it: its number, the sha256 of its
/// `image.toml` (which holds the sha256 of every other file), and the files.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Offered {
    pub name: String,
    pub checksum: String,
    pub files: Vec<OfferedFile>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OfferedFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The images in the server's images directory, each with its checksum.
pub fn offered_images(store: &Store) -> Vec<Offered> {
    let Ok(rd) = fs::read_dir(&store.images) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let dir_name = e.file_name().to_string_lossy().into_owned();
        let Some(number) =
            dir_name.strip_prefix('i').filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let dir = e.path();
        let Ok(manifest) = jobfile::image::ImageManifest::load(&dir) else { continue };
        let Ok(checksum) = jobfile::image::sha256_file(&dir.join(jobfile::image::MANIFEST)) else { continue };
        let mut files = vec![OfferedFile {
            name: jobfile::image::MANIFEST.to_owned(),
            size: fs::metadata(dir.join(jobfile::image::MANIFEST)).map_or(0, |m| m.len()),
            sha256: checksum.clone(),
        }];
        for (name, sha256) in &manifest.sha256 {
            let size = fs::metadata(dir.join(name)).map_or(0, |m| m.len());
            files.push(OfferedFile { name: name.clone(), size, sha256: sha256.clone() });
        }
        out.push(Offered { name: number.to_owned(), checksum, files });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct HostImage {
    pub name: String,
    pub checksum: String,
}

/// Most images a host may say it has.
pub const MAX_HOST_IMAGES: usize = 64;

/// Most bytes of a lease request's body (a full list of images is about 6 KiB).
pub const MAX_LEASE_BODY: usize = 64 << 10;

/// Most bytes of a renewal's body: the console a host sends with it (it sends 256 KiB at most).
pub const MAX_RENEW_BODY: usize = 1 << 20;

impl HostImage {
    /// An image as a host may name it: a number of 1 to 9 digits with a sha256 in lowercase hex.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 9 || !self.name.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{:?} is not an image number",
                jobfile::text::sanitize_capped(self.name.as_bytes(), 32)
            ));
        }
        if self.checksum.len() != 64 || !self.checksum.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("image i{}: the checksum is not a sha256 in lowercase hex", self.name));
        }
        Ok(())
    }
}

impl LeaseRequest {
    /// Checks what a host says of itself: an image is a number of 1 to 9
    /// digits with a sha256 in lowercase hex, at most `MAX_HOST_IMAGES` of
    /// them, and the version is short printable text. What passes is what
    /// the server stores and shows to submitters.
    pub fn check(&self) -> Result<(), String> {
        if self.images.len() > MAX_HOST_IMAGES {
            return Err(format!("{} images listed; a host may list at most {MAX_HOST_IMAGES}", self.images.len()));
        }
        for i in &self.images {
            i.check()?;
        }
        if self.version.len() > 64 || !self.version.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the version is not up to 64 printable ASCII characters".to_owned());
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
pub struct LeaseRequest {
    pub images: Vec<HostImage>,
    pub capacity: u64,
    /// Jobs the host holds now (the server hands one more only below capacity).
    pub running: u64,
    #[serde(default)]
    pub version: String,
}

/// `POST /v1/host/lease`: record the host, and hand it a job when it has room.
pub async fn lease(
    State(app): State<Arc<App>>,
    HostAuthed(host): HostAuthed,
    Json(req): Json<LeaseRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    req.check().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad lease request: {e}")))?;
    let offered = offered_images(&app.store);
    // Only images the host has exactly as the server has them.
    let usable: Vec<String> = req
        .images
        .iter()
        .filter(|i| offered.iter().any(|o| o.name == i.name && o.checksum == i.checksum))
        .map(|i| i.name.clone())
        .collect();
    let images = serde_json::to_string(&req.images).unwrap_or_default();
    db::host_seen(app.db(), host.id, &images, req.capacity.min(1024), &req.version).map_err(ApiError::internal)?;
    if req.running >= req.capacity {
        return Ok(Json(json!({ "lease": null })));
    }
    // A job that another server, a local host or its submitter moved first is skipped.
    for _ in 0..8 {
        let store = app.store.clone();
        // Only the file the server wrote: never a link, a second name or another inode planted in its place.
        let leased =
            db::lease_next(app.db(), &host.name, &usable, app.farm.lease_ms(), |f, ino| store.waiting_own(f, ino))
                .map_err(ApiError::internal)?;
        let Some(lease) = leased else { return Ok(Json(json!({ "lease": null }))) };
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
            db::unlease(app.db(), &lease).map_err(ApiError::internal)?;
            continue;
        }
        log::info!("job {} leased to host {} (lease {}, attempt {})", lease.id, host.name, lease.seq, lease.attempt);
        return Ok(Json(json!({
            "lease": {
                "id": lease.id,
                "file_name": lease.file_name,
                "size": lease.size,
                "seq": lease.seq,
                "attempt": lease.attempt,
                "lease_ms": app.farm.lease_ms(),
            }
        })));
    }
    Ok(Json(json!({ "lease": null })))
}

#[derive(Debug, Deserialize)]
pub struct SeqQuery {
    seq: u64,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    log_bytes: u64,
}

/// The job file (name and inode) of a live lease of `host`, or the refusal a late host gets.
fn live(app: &App, id: &str, host: &str, seq: u64) -> ApiResult<(String, Option<crate::store::FileId>)> {
    if !crate::auth::is_job_id(id) {
        return Err(ApiError::not_found());
    }
    db::live_lease(app.db(), id, host, seq).map_err(ApiError::internal)?.ok_or_else(lease_lost)
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

    /// Renews when due; `false` once the lease is lost (expired or taken over).
    fn progress(&mut self) -> bool {
        if self.last.elapsed() < self.every {
            return true;
        }
        self.last = std::time::Instant::now();
        match db::renew(self.app.db(), &self.id, &self.host, self.seq, self.app.farm.lease_ms()) {
            Ok(renewed) => renewed.is_some(),
            Err(e) => {
                log::error!("job {}: cannot renew its lease during a transfer: {}", self.id, jobfile::error_chain(&e));
                true
            }
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
pub async fn job_file(
    State(app): State<Arc<App>>,
    HostAuthed(host): HostAuthed,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<SeqQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (file_name, ino) = live(&app, &id, &host.name, q.seq)?;
    let mut keep = KeepAlive::new(&app, &id, &host.name, q.seq);
    let response = crate::api::serve_file(&app.store.leased(&file_name), ino, &headers, "application/x-xz").await?;
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        keep.progress();
        chunk
    });
    Ok(Response::from_parts(parts, Body::from_stream(body)))
}

/// `POST /v1/host/jobs/{id}/renew?seq=N&offset=K`, the console from byte K
/// as the body: extends the lease, says whether the submitter cancelled.
pub async fn renew(
    State(app): State<Arc<App>>,
    HostAuthed(host): HostAuthed,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<SeqQuery>,
    body: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let renewed = db::renew(app.db(), &id, &host.name, q.seq, app.farm.lease_ms()).map_err(ApiError::internal)?;
    let file_name = renewed.ok_or_else(lease_lost)?;
    // A busy host asks for no work; its renewals say it is alive.
    db::host_touch(app.db(), host.id).map_err(ApiError::internal)?;
    if !body.is_empty() && q.offset < MAX_CONSOLE {
        use std::os::unix::fs::FileExt;
        let path = app.store.farm_console(&file_name);
        let keep = (MAX_CONSOLE - q.offset).min(body.len() as u64) as usize;
        let f =
            fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path).map_err(ApiError::internal)?;
        f.write_all_at(&body[..keep], q.offset).map_err(ApiError::internal)?;
    }
    Ok(Json(json!({ "lease_ms": app.farm.lease_ms(), "cancel": app.store.cancel_requested(&file_name) })))
}

/// Staged parts of a delivery: `done/.farm.<id>.<seq>.<tag>.{log,result}.part`,
/// the tag new for every request, so that two deliveries on one lease
/// never write the same file.
fn part(store: &Store, id: &str, seq: u64, tag: &str, what: &str) -> PathBuf {
    store.done.join(format!(".farm.{id}.{seq}.{tag}.{what}.part"))
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
    first: &Path,
    first_len: u64,
    second: &Path,
    max_second: u64,
    keep: &mut KeepAlive,
) -> ApiResult<u64> {
    let mut open = tokio::fs::OpenOptions::new();
    open.write(true).create_new(true).mode(0o640);
    let mut a = open.open(first).await.map_err(ApiError::internal)?;
    let mut b = open.open(second).await.map_err(ApiError::internal)?;
    let mut stream = body.into_data_stream();
    let (mut got, mut second_len) = (0u64, 0u64);
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
        if !keep.progress() {
            return Err(lease_lost());
        }
        let mut chunk = &chunk[..];
        if got < first_len {
            let n = ((first_len - got) as usize).min(chunk.len());
            a.write_all(&chunk[..n]).await.map_err(ApiError::internal)?;
            got += n as u64;
            chunk = &chunk[n..];
        }
        if !chunk.is_empty() {
            second_len += chunk.len() as u64;
            if second_len > max_second {
                return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "more than the job's size came back"));
            }
            b.write_all(chunk).await.map_err(ApiError::internal)?;
        }
    }
    if got < first_len {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the upload ended inside the log"));
    }
    a.sync_all().await.map_err(ApiError::internal)?;
    b.sync_all().await.map_err(ApiError::internal)?;
    Ok(second_len)
}

/// `POST /v1/host/jobs/{id}/done?seq=N&log_bytes=L`: the console log (L
/// bytes) then the result. Accepted once, under the live lease only.
pub async fn done(
    State(app): State<Arc<App>>,
    HostAuthed(host): HostAuthed,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<SeqQuery>,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let (file_name, ino) = live(&app, &id, &host.name, q.seq)?;
    let size = crate::store::open_regular(&app.store.leased(&file_name), ino)
        .and_then(|f| f.metadata())
        .map_err(ApiError::internal)?
        .len();
    let tag = crate::auth::new_job_id();
    let (log, result) = (part(&app.store, &id, q.seq, &tag, "log"), part(&app.store, &id, q.seq, &tag, "result"));
    let mut parts = Parts(vec![log.clone(), result.clone()], false);
    let mut keep = KeepAlive::new(&app, &id, &host.name, q.seq);
    let got = receive(&app, body, &log, q.log_bytes.min(MAX_CONSOLE * 2), &result, size, &mut keep).await?;
    if got == 0 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the result is empty"));
    }
    let verdict = jobfile::tools::log_verdict(&log).unwrap_or_else(|| "(no verdict in the log)".to_owned());
    accept(&app, &host.name, &id, q.seq, &tag, &file_name, "done", &verdict, &mut parts)?;
    log::info!("job {id} delivered by host {} (lease {}): {verdict}", host.name, q.seq);
    Ok(Json(json!({ "delivered": true, "verdict": verdict })))
}

/// `POST /v1/host/jobs/{id}/failed?seq=N&log_bytes=L`: the console log (L
/// bytes, maybe none) then the reason, in text.
pub async fn failed(
    State(app): State<Arc<App>>,
    HostAuthed(host): HostAuthed,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<SeqQuery>,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let (file_name, _) = live(&app, &id, &host.name, q.seq)?;
    let tag = crate::auth::new_job_id();
    let (log, reason_part) = (part(&app.store, &id, q.seq, &tag, "log"), part(&app.store, &id, q.seq, &tag, "reason"));
    let mut parts = Parts(vec![log.clone(), reason_part.clone()], false);
    let mut keep = KeepAlive::new(&app, &id, &host.name, q.seq);
    receive(&app, body, &log, q.log_bytes.min(MAX_CONSOLE * 2), &reason_part, 64 << 10, &mut keep).await?;
    let reason = fs::read(&reason_part).map_err(ApiError::internal)?;
    let reason = jobfile::sanitize(&reason);
    let reason = reason.lines().next().unwrap_or("").trim().to_owned();
    let reason = if reason.is_empty() { format!("failed on host {}", host.name) } else { reason };
    let _ = fs::remove_file(&reason_part);
    accept(&app, &host.name, &id, q.seq, &tag, &file_name, "failed", &reason, &mut parts)?;
    log::info!("job {id} failed on host {} (lease {}): {reason}", host.name, q.seq);
    Ok(Json(json!({ "delivered": true, "reason": reason })))
}

/// Ends the live lease with the delivery (`how`: done or failed), or refuses
/// it; then keeps the staged parts and lands them.
#[allow(clippy::too_many_arguments)]
fn accept(
    app: &App,
    host: &str,
    id: &str,
    seq: u64,
    tag: &str,
    file_name: &str,
    how: &str,
    verdict: &str,
    parts: &mut Parts,
) -> ApiResult<()> {
    if !db::end_lease(app.db(), id, host, seq, how, verdict, tag).map_err(ApiError::internal)? {
        return Err(lease_lost());
    }
    parts.1 = true;
    land(&app.store, file_name, id, seq, tag, how, verdict).map_err(ApiError::internal)?;
    if let Ok(Some(job)) = db::job_by_file(app.db(), file_name) {
        app.refresh(&job);
    }
    Ok(())
}

/// `POST /v1/host/jobs/{id}/release?seq=N`: the host gives the job back
/// unrun (it is stopping); no attempt is counted.
pub async fn release(
    State(app): State<Arc<App>>,
    HostAuthed(host): HostAuthed,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<SeqQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let (file_name, _) = live(&app, &id, &host.name, q.seq)?;
    if !db::end_lease(app.db(), &id, &host.name, q.seq, "released", "", "").map_err(ApiError::internal)? {
        return Err(lease_lost());
    }
    app.store.move_job(&app.store.leased(&file_name), &app.store.queue.join(&file_name)).map_err(ApiError::internal)?;
    let _ = fs::remove_file(app.store.farm_console(&file_name));
    log::info!("job {id} given back by host {} (lease {}): waiting again", host.name, q.seq);
    Ok(Json(json!({ "released": true })))
}

/// Puts the files of an accepted delivery in place: the staged log and
/// result into `done/`, or the job into `failed/` with its reason. Safe to
/// repeat, and to race with itself: each step is a rename that only one wins.
fn land(store: &Store, file_name: &str, id: &str, seq: u64, tag: &str, how: &str, verdict: &str) -> io::Result<()> {
    let job = jobfile::JobName::parse(file_name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let leased = store.leased(file_name);
    let place = |from: &Path, to: &Path| match crate::store::rename_noreplace(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fs::remove_file(from),
        Err(e) => Err(e),
    };
    if how == "done" {
        // The log first: a result in done/ is how everyone sees that a job ended.
        place(&part(store, id, seq, tag, "log"), &store.done.join(job.done_with_extension("log")))?;
        place(&part(store, id, seq, tag, "result"), &store.done.join(job.done_file_name()))?;
        fs::File::open(&store.done)?.sync_all()?;
        let _ = fs::remove_file(&leased);
    } else {
        place(&part(store, id, seq, tag, "log"), &store.failed.join(format!("{file_name}.log")))?;
        if !store.failed.join(format!("{file_name}.reason")).exists() {
            store.write_reason(file_name, verdict)?;
        }
        store.move_job(&leased, &store.failed.join(file_name))?;
    }
    let _ = fs::remove_file(store.farm_console(file_name));
    store.forget_cancel(file_name);
    Ok(())
}

/// Ends the leases that ran out and moves their files; then finishes
/// whatever a crash left between the database and the directories.
pub fn sweep(app: &App) -> Result<(), db::DbError> {
    for (job, gave_up) in db::expire_leases(app.db(), app.farm.max_attempts)? {
        let host = job.host.clone().unwrap_or_default();
        let leased = app.store.leased(&job.file_name);
        let moved = if gave_up {
            let reason = db::lease_reason(&job, &host, app.farm.max_attempts);
            log::warn!("job {}: the lease of host {host} ran out; {reason}", job.id);
            land(&app.store, &job.file_name, &job.id, 0, "", "failed", &reason).map(|()| true)
        } else {
            log::warn!(
                "job {}: the lease of host {host} ran out (attempt {} of {}); back in the queue",
                job.id,
                job.attempts,
                app.farm.max_attempts
            );
            let _ = fs::remove_file(app.store.farm_console(&job.file_name));
            app.store.move_job(&leased, &app.store.queue.join(&job.file_name))
        };
        if let Err(e) = moved {
            log::error!("job {}: cannot move {}: {e}", job.id, leased.display());
        }
        app.refresh(&job);
    }
    reconcile(app)
}

/// Makes `running/.farm/` and the staged deliveries agree with the
/// database: a delivered job's files are landed, a job no lease holds goes
/// back to the queue (or to failed/ past the attempt limit), and staged
/// parts no delivery will use are removed once they are a minute old.
pub fn reconcile(app: &App) -> Result<(), db::DbError> {
    let store = &app.store;
    if let Ok(rd) = fs::read_dir(store.farm_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let Some((job, delivered)) = db::farm_state(app.db(), &name)? else { continue };
            if job.host.is_some() {
                continue;
            }
            let done = match delivered {
                Some(d) => land(store, &name, &job.id, d.seq, &d.part, &d.how, &d.verdict),
                None if job.attempts >= app.farm.max_attempts => {
                    let reason = db::lease_reason(&job, "(unknown)", app.farm.max_attempts);
                    land(store, &name, &job.id, 0, "", "failed", &reason)
                }
                None => store.move_job(&e.path(), &store.queue.join(&name)).map(|_| ()),
            };
            match done {
                Ok(()) => log::info!("job {}: finished what a crash left in {}", job.id, e.path().display()),
                Err(e) => log::error!("job {}: cannot put its files right: {e}", job.id),
            }
            app.refresh(&job);
        }
    }
    if let Ok(rd) = fs::read_dir(&store.done) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(".farm.") else { continue };
            let mut bits = rest.split('.');
            let (Some(id), Some(seq), Some(tag)) =
                (bits.next(), bits.next().and_then(|s| s.parse::<u64>().ok()), bits.next())
            else {
                continue;
            };
            if !crate::auth::is_job_id(id) {
                continue;
            }
            let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok())
                >= Some(Duration::from_secs(60));
            let delivered = db::farm_state_by_id(app.db(), id)?
                .and_then(|(job, d)| d.filter(|d| d.seq == seq && d.part == tag).map(|d| (job, d)));
            match delivered {
                Some((job, d)) if job.host.is_none() => {
                    if let Err(e) = land(store, &job.file_name, id, d.seq, &d.part, &d.how, &d.verdict) {
                        log::error!("job {id}: cannot land its delivery: {e}");
                    }
                }
                Some(_) => {}
                None if old => {
                    let _ = fs::remove_file(e.path());
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// `GET /v1/host/images`: what the server offers, with checksums.
pub async fn images(State(app): State<Arc<App>>, HostAuthed(_): HostAuthed) -> Json<serde_json::Value> {
    Json(json!({ "images": offered_images(&app.store) }))
}

/// `GET /v1/host/images/{image}/{file}`: one file of an offered image.
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
    crate::api::serve_file(
        &app.store.images.join(format!("i{image}")).join(&file),
        None,
        &headers,
        "application/octet-stream",
    )
    .await
}

/// `GET /v1/hosts`: the remote hosts, when each was last seen, its images
/// and capacity, and what it runs now (job ids only of the caller's own jobs).
pub async fn hosts(State(app): State<Arc<App>>, AnyAccount(account): AnyAccount) -> ApiResult<Response> {
    Ok(Json(json!({ "hosts": hosts_view(&app, &account).map_err(ApiError::internal)? })).into_response())
}

/// The hosts as `account` may see them.
pub fn hosts_view(app: &App, account: &db::Account) -> Result<Vec<serde_json::Value>, db::DbError> {
    let leased = db::leased_jobs(app.db())?;
    let now = db::unix_now();
    Ok(db::hosts(app.db())?
        .into_iter()
        .map(|h| {
            let running: Vec<_> = leased.iter().filter(|j| j.host.as_deref() == Some(&h.name)).collect();
            let own: Vec<_> = running
                .iter()
                .filter(|j| account.kind == Kind::Submitter && j.account_id == account.id)
                .map(|j| json!({"id": j.id, "name": j.name}))
                .collect();
            // What a host said is shown to every submitter: only what passes `HostImage::check`.
            let images: Vec<HostImage> = serde_json::from_value::<Vec<HostImage>>(h.images.clone())
                .unwrap_or_default()
                .into_iter()
                .take(MAX_HOST_IMAGES)
                .filter(|i| i.check().is_ok())
                .collect();
            let version = if h.version.len() <= 64 && h.version.bytes().all(|b| b.is_ascii_graphic()) {
                h.version.clone()
            } else {
                String::new()
            };
            json!({
                "name": h.name,
                "last_seen": h.last_seen,
                "seen_secs_ago": (now - h.last_seen_unix).max(0),
                "images": images,
                "capacity": h.capacity,
                "running": running.len(),
                "your_jobs": own,
                "version": version,
                "disabled": h.disabled,
            })
        })
        .collect())
}

/// Runs `sweep` every `every`, for ever.
pub async fn keep_sweeping(app: Arc<App>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let app = app.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = sweep(&app) {
                log::error!("cannot sweep the leases: {e}");
            }
        })
        .await;
    }
}
