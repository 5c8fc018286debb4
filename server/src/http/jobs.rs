//! A submitter's jobs (`/v1/jobs`, `/v1/whoami`): submit, list, show, the
//! log and the result, cancel.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use jobfile::layout::Terms;
use tokio::io::AsyncWriteExt;

use super::{serve_file, ApiError, ApiResult, Authed, OwnJob};
use crate::app::App;
use crate::auth;
use crate::db::{self, JobRecord};
use crate::quota;
use crate::store::{Place, XZ_MAGIC};

#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "submitters",
    responses((status = 200, description = "the account and the limits that apply to it", body = wire::Whoami), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn whoami(State(app): State<Arc<App>>, Authed(account): Authed) -> ApiResult<Json<wire::Whoami>> {
    Ok(Json(wire::Whoami { account: account.name, limits: account.limits.or(app.settings.defaults) }))
}

use wire::SubmitQuery;

/// Removes a half-written upload and its reservation however the handler
/// ends (an error, or a client that went away).
struct UploadGuard {
    app: Arc<App>,
    path: Option<PathBuf>,
    id: String,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            log::info!("job {}: its upload did not finish; removed it and its reservation", self.id);
            let _ = std::fs::remove_file(p);
            // Dropped inside the server's runtime (the request's future); the reservation goes
            // on a task of its own. Were it lost, the follow loop drops it (`sweep_uploads`).
            let (app, id) = (self.app.clone(), std::mem::take(&mut self.id));
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
            runtime.spawn(async move {
                if let Err(e) = db::drop_upload(app.db(), &id).await {
                    log::error!(
                        "job {id}: cannot drop the reservation of a broken upload: {}",
                        jobfile::error_chain(&e)
                    );
                }
            });
        }
    }
}

/// How often, in bytes received, an upload checks the disk's reserve again.
const DISK_CHECK_EVERY: u64 = 8 << 20;

#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "submitters",
    params(wire::SubmitQuery),
    request_body(content = Vec<u8>, content_type = "application/x-xz", description = "the job file: a tar.xz padded with zeros to the size wanted back"),
    responses((status = 201, description = "queued", body = wire::Job), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody), (status = 400, description = "not a job file, a bad name or image, a construir.toml outside Debian's grammar, or packages for an image without an archive", body = wire::ErrorBody), (status = 413, description = "over the account's max_job_bytes", body = wire::ErrorBody), (status = 422, description = "packages apt cannot satisfy (its words), or too many", body = wire::ErrorBody), (status = 503, description = "the archive the packages come from cannot be read", body = wire::ErrorBody), (status = 429, description = "a limit of the account", body = wire::ErrorBody), (status = 507, description = "the server's disk keeps its reserve", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn submit(
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
    let runs = match q.verify_on {
        None | Some(1) => 1,
        Some(jobfile::rebuild::RUNS) => jobfile::rebuild::RUNS,
        Some(n) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "verify_on={n}: a job runs once (1) or is rebuilt and compared on {} hosts",
                    jobfile::rebuild::RUNS
                ),
            ))
        }
    };
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
        ran_on: None,
        file_sha256: None,
        id: id.clone(),
        account_id: account.id,
        name: job_name.name().to_owned(),
        image: job_name.image().to_owned(),
        file_name: queued.input_file_name(),
        size: 0,
        submitted: now.clone(),
        submitted_unix: db::unix_now(),
        state: db::JobState::Uploading,
        updated: now,
        verdict: None,
        result_bytes: None,
        deleted: None,
        host: None,
        attempts: 0,
        file_id: None,
        packages: None,
        caches: Vec::new(),
        twin_of: None,
        rebuild: None,
    };
    // A verified rebuild's second run: a job of its own, its record naming the first.
    let twin = if runs > 1 {
        let twin_id = auth::new_job_id();
        let name: String = format!("{}.{twin_id}.{}", account.name, job_name.name())
            .chars()
            .take(jobfile::name::MAX_NAME_LEN)
            .collect();
        let file_name = jobfile::JobName::new(&name, job_name.image())
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad job name: {e}")))?
            .input_file_name();
        let epoch = record.submitted_unix.max(0) as u64;
        record.rebuild = Some(db::RebuildRecord { twin: twin_id.clone(), epoch, verdict: None });
        Some(JobRecord { id: twin_id, file_name, twin_of: Some(id.clone()), rebuild: None, ..record.clone() })
    } else {
        None
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
    let mut guard = UploadGuard { app: app.clone(), path: Some(upload.clone()), id: id.clone() };
    let free = app.store.free_bytes().map_err(ApiError::internal)?;
    // Every limit is checked and the bytes reserved in one transaction, before a byte of the body is
    // read (with Expect: 100-continue, before it is sent).
    let reserved = db::reserve_upload(
        app.db(),
        &record,
        |f| app.store.finished(f),
        |usage| quota::admit(usage, &limits, &app.settings.uploads, declared, free),
    )
    .await
    .map_err(ApiError::internal)??;
    // The second run of a verified rebuild counts as a job of its own against every limit.
    let mut twin_guard = None;
    if let Some(twin) = &twin {
        let free = app.store.free_bytes().map_err(ApiError::internal)?;
        twin_guard =
            Some(UploadGuard { app: app.clone(), path: Some(app.store.upload_path(&twin.id)), id: twin.id.clone() });
        let declared = declared.or(Some(reserved));
        db::reserve_upload(
            app.db(),
            twin,
            |f| app.store.finished(f),
            |usage| quota::admit(usage, &limits, &app.settings.uploads, declared, free),
        )
        .await
        .map_err(ApiError::internal)?
        .map_err(|mut refusal| {
            refusal.message =
                format!("a verified rebuild's second run counts as a job of its own: {}", refusal.message);
            ApiError::from(refusal)
        })?;
    }
    let mut stream = body.into_data_stream();
    let mut size: u64 = 0;
    let mut checked_disk: u64 = 0;
    let mut head: Vec<u8> = Vec::with_capacity(XZ_MAGIC.len());
    // Its digest, as received: every result's statement must name it.
    let mut digest = <sha2::Sha256 as sha2::Digest>::new();
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
        sha2::Digest::update(&mut digest, &chunk);
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    let sha256 = jobfile::hex(&sha2::Digest::finalize(digest));
    if size < jobfile::MIN_JOB_SIZE {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{size} bytes is too small: a job file is at least {} bytes (its size is how much output may come back)", jobfile::MIN_JOB_SIZE)));
    }
    if head != XZ_MAGIC {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "not a job file: it does not start with an xz stream"));
    }
    file.sync_all().await.map_err(ApiError::internal)?;
    let ino = crate::store::FileId::of(&file.metadata().await.map_err(ApiError::internal)?);
    drop(file);
    // Its packages, resolved now: what cannot be had is refused before anything is stored.
    // What was chosen is pinned for the host before the job is in the queue.
    // Its caches' owner too: the account, whichever host runs it.
    let (packages, caches) = resolve_packages(&app, &upload, job_name.image()).await?;
    // A verified rebuild's second run: the same bytes, and both runs' terms.
    let twin_file = match &twin {
        Some(twin) => Some(copy_for_second_run(&app, &upload, twin, &record).await?),
        None => None,
    };
    let owner = jobfile::caches::account_owner(account.id);
    let queued: Vec<(&JobRecord, &std::path::Path)> = std::iter::once((&record, upload.as_path()))
        .chain(twin.iter().zip(twin_file.iter().map(|(p, _)| p.as_path())))
        .collect();
    for (i, (job, part)) in queued.iter().enumerate() {
        let terms = Terms { pin: packages.clone(), owner: Some(owner.clone()), rebuild: None };
        let pinned =
            app.store.write_terms(&job.file_name, &terms).and_then(|()| app.store.enqueue(part, &job.file_name));
        if let Err(e) = pinned {
            for (job, _) in &queued {
                Terms::remove_all(&app.store.running, job.file_name.as_ref());
            }
            return Err(ApiError::internal(e));
        }
        // In the queue now: a failure from here on removes it from there.
        let in_queue = Some(app.store.queue.join(&job.file_name));
        match (i, &mut twin_guard) {
            (0, _) => guard.path = in_queue,
            (_, Some(g)) => g.path = in_queue,
            _ => {}
        }
    }
    let finished = [(&record, ino)].into_iter().chain(twin.iter().zip(twin_file.iter().map(|(_, ino)| *ino)));
    for (job, ino) in finished {
        if !db::finish_upload(app.db(), &job.id, (size, &sha256), ino, packages.as_ref(), &caches)
            .await
            .map_err(ApiError::internal)?
        {
            let id = &job.id;
            return Err(ApiError::internal(std::io::Error::other(format!("job {id}: its reservation vanished"))));
        }
    }
    guard.path = None;
    if let Some(g) = &mut twin_guard {
        g.path = None;
    }
    record.size = size;
    record.file_sha256 = Some(sha256);
    record.file_id = Some(ino);
    record.packages = packages;
    record.caches = caches;
    let _ = db::audit(app.db(), Some(&account.name), "submitted", &format!("{id} {} ({size} bytes)", record.file_name))
        .await;
    log::info!("account {}: job {id} submitted as {} ({size} bytes)", account.name, record.file_name);
    let place = app.locate(&record);
    let mut out = job_json(&record, &place);
    out.rebuild = rebuild_view(&app, &record).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// Copies the uploaded job file for a verified rebuild's second run
/// (`twin`), synced, and writes both runs' terms: the name both give the
/// job, the time of submission as `SOURCE_DATE_EPOCH`, and, when the farm
/// has another live host, how long the second run keeps off the host that
/// took the first. Returns the copy and its identity.
async fn copy_for_second_run(
    app: &Arc<App>,
    upload: &std::path::Path,
    twin: &JobRecord,
    first: &JobRecord,
) -> ApiResult<(PathBuf, crate::store::FileId)> {
    let part = app.store.upload_path(&twin.id);
    let live = crate::rebuild::live_hosts(app).await.map_err(ApiError::internal)?;
    let apart_until = if live > 1 { db::unix_now().max(0) as u64 + app.farm.apart_wait.as_secs() } else { 0 };
    let (app, upload, twin, first) = (app.clone(), upload.to_owned(), twin.clone(), first.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut from = std::fs::File::open(&upload)?;
        let mut to = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(&part)?;
        std::io::copy(&mut from, &mut to)?;
        to.sync_all()?;
        let ino = crate::store::FileId::of(&to.metadata()?);
        let epoch = first.rebuild.as_ref().map_or(0, |r| r.epoch);
        for (job, sibling) in [(&first, &twin), (&twin, &first)] {
            let terms = jobfile::rebuild::Terms {
                sibling: sibling.file_name.clone(),
                name: first.name.clone(),
                epoch,
                apart_until,
            };
            jobfile::rebuild::write_terms(&app.store.running, job.file_name.as_ref(), &terms)?;
        }
        Ok((part, ino))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)
}

/// Reads the declaration at the start of the uploaded job file and resolves
/// it against the job's image, as a host would: a declaration outside
/// Debian's grammar is a 400, what apt cannot satisfy (in apt's words) or
/// too many packages a 422, an image without an archive a 400, and an
/// archive the server cannot read a 503. Also returns the caches it names.
async fn resolve_packages(
    app: &Arc<App>,
    upload: &std::path::Path,
    image: &str,
) -> ApiResult<(Option<jobfile::deps::Resolution>, Vec<String>)> {
    let (upload, image, app) = (upload.to_owned(), image.to_owned(), app.clone());
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&upload).map_err(ApiError::internal)?;
        let declared = match jobfile::deps::read_from_job(file) {
            // As before packages: an archive the server cannot read is the host's to report (bad_archive).
            Err(jobfile::deps::DepsError::Archive(_)) => None,
            other => other.map_err(|e| {
                let text = format!("{}: {}", jobfile::deps::DECLARATION, jobfile::error_chain(&e));
                ApiError::new(StatusCode::BAD_REQUEST, text)
            })?,
        };
        let Some((declaration, relations)) = declared else { return Ok((None, Vec::new())) };
        let caches = declaration.caches;
        if relations.is_empty() {
            return Ok((None, caches));
        }
        let Some(resolver) = &app.packages else {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "this server takes no jobs that declare packages"));
        };
        let dir = app.store.images.join(format!("i{image}"));
        let manifest = jobfile::image::ImageManifest::load(&dir).map_err(ApiError::internal)?;
        match resolver.resolve(&image, &dir, &manifest, &relations, &|| false) {
            Ok(resolution) => Ok((Some(resolution), caches)),
            Err(e) => {
                let status = match &e {
                    deps::ResolveError::NoArchive { .. } => StatusCode::BAD_REQUEST,
                    deps::ResolveError::TooMany { .. }
                    | deps::ResolveError::TooLarge { .. }
                    | deps::ResolveError::Apt(deps::AptError::Unsatisfiable { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
                    deps::ResolveError::Apt(deps::AptError::Update { .. }) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                let text = jobfile::error_chain(&e);
                Err(ApiError::new(status, format!("packages: {}", text.lines().next().unwrap_or(&text))))
            }
        }
    })
    .await
    .map_err(ApiError::internal)?
}

/// A job as its submitter sees it, at `place`.
fn job_json(j: &JobRecord, place: &Place) -> wire::Job {
    wire::Job {
        id: j.id.clone(),
        name: j.name.clone(),
        image: j.image.clone(),
        size: j.size,
        submitted: j.submitted.clone(),
        state: place.name().to_owned(),
        place: place.clone(),
        deleted: j.deleted.clone(),
        attempts: j.attempts,
        packages: j.packages.clone(),
        status: None,
        cancel: None,
        rebuild: None,
        built_by: j.ran_on.as_ref().map(crate::db::RanOn::key_owner),
    }
}

/// A verified rebuild's state for its submitter: where the second run is,
/// and the verdict once there is one.
async fn rebuild_view(app: &App, j: &JobRecord) -> ApiResult<Option<wire::Rebuild>> {
    let Some(pair) = &j.rebuild else { return Ok(None) };
    let twin = db::twin(app.db(), &j.id).await.map_err(ApiError::internal)?;
    let second = match &twin {
        Some(twin) => app.refresh(twin).await,
        None => Place::Missing,
    };
    let second_built_by = twin.and_then(|t| t.ran_on).as_ref().map(crate::db::RanOn::key_owner);
    Ok(Some(wire::Rebuild { second, epoch: pair.epoch, verdict: pair.verdict.clone(), second_built_by }))
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "submitters",
    responses((status = 200, description = "the account's jobs", body = wire::JobList), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn list(State(app): State<Arc<App>>, Authed(account): Authed) -> ApiResult<Json<wire::JobList>> {
    let jobs = db::jobs_of(app.db(), account.id).await.map_err(ApiError::internal)?;
    let mut out = Vec::with_capacity(jobs.len());
    for j in &jobs {
        let mut job = job_json(j, &app.refresh(j).await);
        job.rebuild = rebuild_view(&app, j).await?;
        out.push(job);
    }
    Ok(Json(wire::JobList { jobs: out }))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "submitters",
    params(("id" = String, Path, description = "the job id, 16 hex digits")),
    responses((status = 200, description = "where the job is, and its status once it has a result", body = wire::Job), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody), (status = 404, description = "no such job of this account", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn show(State(app): State<Arc<App>>, OwnJob { job, .. }: OwnJob) -> ApiResult<Json<wire::Job>> {
    let place = app.refresh(&job).await;
    let mut out = job_json(&job, &place);
    out.rebuild = rebuild_view(&app, &job).await?;
    if let Some(result) = app.store.result_path(&job.file_name) {
        // The status, read with the same bounds as the host's own reader.
        out.status = tokio::task::spawn_blocking(move || jobfile_status(&result)).await.ok().flatten();
    }
    Ok(Json(out))
}

fn jobfile_status(result: &std::path::Path) -> Option<jobfile::JobStatus> {
    jobfile::read_status(crate::store::open_regular(result, None).ok()?)
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/log",
    tag = "submitters",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::RunQuery),
    responses((status = 200, description = "the console log, sanitized (the live console while it runs); `Range` is honoured", content_type = "text/plain"), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody), (status = 404, description = "no log yet", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn log_of(
    State(app): State<Arc<App>>,
    OwnJob { job, .. }: OwnJob,
    Query(run): Query<wire::RunQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = run_of(&app, job, run).await?;
    let path = app
        .store
        .log_path(&job.file_name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no log yet: the job has not finished"))?;
    serve_file(&path, None, &headers, "text/plain; charset=utf-8").await
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/result",
    tag = "submitters",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::RunQuery),
    responses((status = 200, description = "the result: the job file as the VM left it; `Range` is honoured", content_type = "application/x-xz"), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody), (status = 404, description = "no result", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn result_of(
    State(app): State<Arc<App>>,
    OwnJob { job, .. }: OwnJob,
    Query(run): Query<wire::RunQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = run_of(&app, job, run).await?;
    let path = app.store.result_path(&job.file_name).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "no result: the job has not finished, failed, or its result was deleted")
    })?;
    serve_file(&path, None, &headers, "application/x-xz").await
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/provenance",
    tag = "submitters",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::RunQuery),
    responses((status = 200, description = "the result's signed provenance: DSSE envelopes, one per line, each an in-toto statement with the SLSA provenance predicate", content_type = "application/x-ndjson"), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody), (status = 404, description = "no provenance", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn provenance_of(
    State(app): State<Arc<App>>,
    OwnJob { job, .. }: OwnJob,
    Query(run): Query<wire::RunQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = run_of(&app, job, run).await?;
    let path = app.store.provenance_path(&job.file_name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no provenance: the job has not finished, failed, or its result was deleted",
        )
    })?;
    serve_file(&path, None, &headers, "application/x-ndjson").await
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "submitters",
    params(("id" = String, Path, description = "the job id, 16 hex digits")),
    responses((status = 200, description = "cancelled, or (running) the host was asked to stop it", body = wire::Job), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody), (status = 404, description = "no such job of this account", body = wire::ErrorBody), (status = 409, description = "the job has ended, or ended as it was being cancelled", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn cancel(State(app): State<Arc<App>>, OwnJob { account, job }: OwnJob) -> ApiResult<Json<wire::Job>> {
    let id = job.id.clone();
    let reason = format!("cancelled by {} at {}", account.name, db::now());
    // A verified rebuild's second run goes with it.
    let second = cancel_second_run(&app, &job, &reason).await?;
    match app.refresh(&job).await {
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
                let place = app.refresh(&job).await;
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("the job ended as it was being cancelled: it is {}", place.name()),
                ));
            }
            let _ = db::audit(app.db(), Some(&account.name), "cancel_requested", &id).await;
            let place = app.refresh(&job).await;
            let mut out = job_json(&job, &place);
            out.cancel = Some(format!("requested: {host} stops the VM within seconds; the job then ends in failed"));
            return Ok(Json(out));
        }
        other => {
            let Some(second) = second else {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("the job is {}: nothing to cancel", other.name()),
                ));
            };
            let _ = db::audit(app.db(), Some(&account.name), "cancelled", &format!("{id} (its second run)")).await;
            let mut out = job_json(&job, &other);
            out.rebuild = rebuild_view(&app, &job).await?;
            out.cancel = Some(format!("the job is {}; its second run {second}", other.name()));
            return Ok(Json(out));
        }
    }
    let _ = db::audit(app.db(), Some(&account.name), "cancelled", &id).await;
    let place = app.refresh(&job).await;
    Ok(Json(job_json(&job, &place)))
}

/// Cancels a verified rebuild's second run, waiting or running: what it
/// did, or `None` when the job is no verified rebuild or its second run has ended.
async fn cancel_second_run(app: &App, job: &JobRecord, reason: &str) -> ApiResult<Option<String>> {
    if job.rebuild.is_none() {
        return Ok(None);
    }
    let Some(twin) = db::twin(app.db(), &job.id).await.map_err(ApiError::internal)? else { return Ok(None) };
    Ok(match app.refresh(&twin).await {
        Place::Waiting { .. } if app.store.cancel_waiting(&twin.file_name, reason).map_err(ApiError::internal)? => {
            app.refresh(&twin).await;
            Some("was cancelled".to_owned())
        }
        Place::Running { host, .. } if app.store.request_cancel(&twin.file_name).map_err(ApiError::internal)? => {
            Some(format!("is stopped by {host} within seconds"))
        }
        _ => None,
    })
}

/// The run `?run=` names: the job itself (none or 1), or its verified rebuild's second run (2).
async fn run_of(app: &App, job: JobRecord, q: wire::RunQuery) -> ApiResult<JobRecord> {
    match q.run {
        None | Some(1) => Ok(job),
        Some(2) => db::twin(app.db(), &job.id)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no second run: the job is no verified rebuild")),
        Some(n) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, format!("run={n}: a job has run 1 and, verified, run 2")))
        }
    }
}
