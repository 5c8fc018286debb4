//! `POST /v1/jobs`: an upload, from its reservation to the queue. Every
//! limit is checked and the bytes reserved before a byte of the body is
//! read; the file is written to a part file, checked, its packages
//! resolved, its terms written, and only then renamed into the queue. A
//! verified rebuild is two jobs, each counted and queued.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use jobfile::jobenv::JobEnv;
use jobfile::layout::Terms;
use wire::{Limits, SubmitQuery};

use super::jobs::{job_json, rebuild_view};
use super::{ApiError, ApiResult, Authed};
use crate::app::App;
use crate::auth;
use crate::db::{self, Account, JobRecord};
use crate::quota;
use crate::result_cache;
use crate::store::{FileId, XZ_MAGIC};

/// Removes a half-written upload and its reservation however the handler
/// ends (an error, or a client that went away).
pub(super) struct UploadGuard {
    pub app: Arc<App>,
    pub path: Option<PathBuf>,
    pub id: String,
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
    let (record, twin) = records(&app, &account, &q)?;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    // The part file first, then its reservation: a reservation whose part is gone died with its server.
    let upload = app.store.upload_path(&record.id);
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&upload)
        .await
        .map_err(ApiError::internal)?;
    let mut guards = vec![UploadGuard { app: app.clone(), path: Some(upload.clone()), id: record.id.clone() }];
    let reserved = reserve(&app, &limits, &record, declared, "").await?;
    // A verified rebuild's second run: its part file first too, kept fresh while the first's
    // arrives, so that no sweep takes its reservation for one that died (it is filled last).
    let mut twin_part = None;
    if let Some(twin) = &twin {
        let part = app.store.upload_path(&twin.id);
        let made = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(&part);
        twin_part = Some(made.map_err(ApiError::internal)?);
        guards.push(UploadGuard { app: app.clone(), path: Some(part), id: twin.id.clone() });
        let why = "a verified rebuild's second run counts as a job of its own: ";
        reserve(&app, &limits, twin, declared.or(Some(reserved)), why).await?;
    }
    let (size, sha256) = receive(&app, body, (&mut file, twin_part.as_ref()), reserved, &limits).await?;
    // Fresh again for the time its packages take to resolve.
    if let Some(part) = &twin_part {
        part.set_modified(std::time::SystemTime::now()).map_err(ApiError::internal)?;
    }
    file.sync_all().await.map_err(ApiError::internal)?;
    let ino = FileId::of(&file.metadata().await.map_err(ApiError::internal)?);
    drop(file);
    let received = Received { record, twin, upload, ino, size, sha256 };
    queue_received(&app, &account, &q, received, &mut guards).await
}

/// A job file received whole (its part file synced), not yet queued.
pub(super) struct Received {
    pub record: JobRecord,
    pub twin: Option<JobRecord>,
    pub upload: PathBuf,
    pub ino: FileId,
    pub size: u64,
    pub sha256: String,
}

/// From a received job file to the queue: its packages resolved, a
/// verified rebuild's second run copied, a copy kept for reruns, its
/// terms written, queued, and its reservation made its record (the
/// submission audited). The answer is the new job, 201.
pub(super) async fn queue_received(
    app: &Arc<App>,
    account: &Account,
    q: &SubmitQuery,
    received: Received,
    guards: &mut [UploadGuard],
) -> ApiResult<Response> {
    let Received { mut record, twin, upload, ino, size, sha256 } = received;
    // Its packages, resolved now: what cannot be had is refused before anything is stored.
    let (packages, caches, declared_debug) = resolve_packages(app, &upload, &record.image).await?;
    if declared_debug {
        debug_allowed(app, q, "its construir.toml says debug = true")?;
    }
    // The environment its inputs fix: the name it was given and its newest file's time.
    let env = source_date_epoch(&upload).await.map(|epoch| JobEnv { name: record.name.clone(), epoch });
    if let (Some(pair), Some(env)) = (record.rebuild.as_mut(), &env) {
        pair.epoch = env.epoch;
        db::set_rebuild(app.db(), &record.id, pair).await.map_err(ApiError::internal)?;
    }
    let image = record.image.clone();
    let submission = result_cache::Submission {
        account,
        image: &image,
        sha256: &sha256,
        size,
        packages: packages.as_ref(),
        env: env.as_ref(),
        excluded: result_cache::exclusion(q.no_result_cache, q.debug || declared_debug, &caches),
    };
    let lookup = result_cache::lookup_of(app, &submission);
    // A verified rebuild asks for two runs; anything else may be served what it would make.
    if let (Ok(lookup), None) = (&lookup, &twin) {
        if let Some(served) =
            result_cache::serve(app, &submission, &record, lookup).await.map_err(ApiError::internal)?
        {
            return answer_hit(app, &submission, record, served, upload, guards).await;
        }
    }
    // A verified rebuild's second run: the same bytes, and both runs' terms.
    let mut queued = vec![(record.clone(), upload, ino)];
    if let Some(twin) = twin {
        let (part, ino) = copy_for_second_run(app, &queued[0].1, &twin, &record).await?;
        queued.push((twin, part, ino));
    }
    // Kept for `rerun` as long as the job's result is: copied from this descriptor once the
    // submission is answered (a host never changes a job file's bytes, whatever it renames it to).
    let kept_from = std::fs::File::open(&queued[0].1).map_err(ApiError::internal)?;
    let terms = Terms {
        pin: packages.clone(),
        owner: Some(jobfile::caches::account_owner(account.id)),
        rebuild: None,
        debug: q.debug,
        env,
    };
    enqueue(app, &queued, &terms, guards)?;
    let (id, what) = (&record.id, format!("{} ({size} bytes)", record.file_name));
    let jobs: Vec<(&str, FileId)> = queued.iter().map(|(job, _, ino)| (job.id.as_str(), *ino)).collect();
    let audit = (account.name.as_str(), format!("{id} {what}"));
    let finished = db::finish_submission(
        app.db(),
        &jobs,
        (size, &sha256),
        packages.as_ref(),
        &caches,
        lookup.as_deref().map_err(String::as_str),
        (audit.0, &audit.1),
    )
    .await
    .map_err(ApiError::internal)?;
    if !finished {
        return Err(ApiError::internal(std::io::Error::other(format!("job {id}: its reservation vanished"))));
    }
    guards.iter_mut().for_each(|g| g.path = None);
    let (store, kept_id) = (app.clone(), record.id.clone());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.store.keep_input(kept_from, &kept_id) {
            log::warn!("job {kept_id}: cannot keep its job file for reruns: {e}");
        }
    });
    (record.size, record.file_sha256, record.file_id, record.packages, record.caches) =
        (size, Some(sha256), Some(ino), packages, caches);
    log::info!("account {}: job {id} submitted as {what}", account.name);
    let mut out = job_json(&record, &app.locate(&record));
    out.rebuild = rebuild_view(app, &record).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// Answers a submission served from the result cache: its record finished
/// as a job that is done (the hit, the result landed for it), its upload
/// removed. The answer is the job, 201, as for any submission.
async fn answer_hit(
    app: &Arc<App>,
    s: &result_cache::Submission<'_>,
    mut record: JobRecord,
    served: result_cache::Served,
    upload: PathBuf,
    guards: &mut [UploadGuard],
) -> ApiResult<Response> {
    let hit = db::result_cache::Hit {
        id: &record.id,
        size: s.size,
        sha256: s.sha256,
        file: served.file,
        packages: s.packages,
        from_cache: &served.hit,
        verdict: &served.verdict,
        result_bytes: served.result_bytes,
    };
    let detail = format!("{} {} ({} bytes), from the result cache", record.id, record.file_name, s.size);
    let finished =
        db::result_cache::finish_hit(app.db(), &hit, (&s.account.name, &detail)).await.map_err(ApiError::internal)?;
    if !finished {
        let why = format!("job {}: its reservation vanished as it was served from the cache", record.id);
        return Err(ApiError::internal(std::io::Error::other(why)));
    }
    guards.iter_mut().for_each(|g| g.path = None);
    // Kept for `rerun` (which always runs) as any job's file is, then the upload goes.
    let (store, kept_id) = (app.clone(), record.id.clone());
    tokio::task::spawn_blocking(move || {
        let kept = std::fs::File::open(&upload).and_then(|f| store.store.keep_input(f, &kept_id));
        if let Err(e) = kept {
            log::warn!("job {kept_id}: cannot keep its job file for reruns: {e}");
        }
        let _ = std::fs::remove_file(&upload);
    });
    log::info!(
        "account {}: job {} submitted, served from the result cache ({})",
        s.account.name,
        record.id,
        served.hit.key
    );
    (record.size, record.file_sha256, record.file_id, record.packages) =
        (s.size, Some(s.sha256.to_owned()), Some(served.file), s.packages.cloned());
    record.from_cache = Some(served.hit);
    let place = app.refresh(&record).await;
    Ok((StatusCode::CREATED, Json(job_json(&record, &place))).into_response())
}

/// The newest time among the job file's entries, its `SOURCE_DATE_EPOCH`
/// (`jobfile::jobenv`); `None` when it cannot be read (its host refuses it).
async fn source_date_epoch(upload: &Path) -> Option<u64> {
    let upload = upload.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&upload).ok()?;
        jobfile::jobenv::newest_mtime(std::io::BufReader::new(file)).ok()
    })
    .await
    .ok()
    .flatten()
}

/// The job's record as its upload starts (and a verified rebuild's second
/// run, a job of its own whose record names the first), each with a new id
/// and its queue name: the account, the id, the name the submitter gave.
pub(super) fn records(app: &App, account: &Account, q: &SubmitQuery) -> ApiResult<(JobRecord, Option<JobRecord>)> {
    let job_name = jobfile::JobName::new(&q.name, &q.image)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad job name or image: {e}")))?;
    if q.debug {
        debug_allowed(app, q, "debug=true")?;
    }
    if !app.store.has_image(job_name.image()) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("no image i{} on this server", job_name.image())));
    }
    let runs = match q.verify_on {
        None | Some(1) => 1,
        Some(jobfile::rebuild::RUNS) => jobfile::rebuild::RUNS,
        Some(n) => {
            let runs = jobfile::rebuild::RUNS;
            let why = format!("verify_on={n}: a job runs once (1) or is rebuilt and compared on {runs} hosts");
            return Err(ApiError::new(StatusCode::BAD_REQUEST, why));
        }
    };
    // The queue name carries the account and the id, so no two accounts' names collide.
    let file_name = |id: &str| -> ApiResult<String> {
        let name: String =
            format!("{}.{id}.{}", account.name, job_name.name()).chars().take(jobfile::name::MAX_NAME_LEN).collect();
        let queued = jobfile::JobName::new(&name, job_name.image())
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad job name: {e}")))?;
        Ok(queued.input_file_name())
    };
    let id = auth::new_job_id();
    let mut record = JobRecord::uploading(&id, account.id, job_name.name(), job_name.image(), file_name(&id)?);
    if runs == 1 {
        return Ok((record, None));
    }
    let twin_id = auth::new_job_id();
    let epoch = record.submitted_unix.max(0) as u64;
    record.rebuild = Some(db::RebuildRecord { twin: twin_id.clone(), epoch, verdict: None });
    let twin = JobRecord {
        file_name: file_name(&twin_id)?,
        id: twin_id,
        twin_of: Some(record.id.clone()),
        rebuild: None,
        ..record.clone()
    };
    Ok((record, Some(twin)))
}

/// Whether a job that asks for a debug session (as `asked` says) may: not on
/// a server that opens none, and not with a verified rebuild (whose two runs
/// must be alike, and whose first run a session would hold up).
fn debug_allowed(app: &App, q: &SubmitQuery, asked: &str) -> ApiResult<()> {
    if let Some(why) = app.settings.debug.refusal() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{asked}: {why}")));
    }
    if q.verify_on.is_some_and(|n| n > 1) {
        let why = format!("{asked}: a verified rebuild (verify_on=2) opens no debug session; submit it without one");
        return Err(ApiError::new(StatusCode::BAD_REQUEST, why));
    }
    Ok(())
}

/// Checks every limit and reserves the bytes for `record`'s upload, in one
/// transaction, before a byte of the body is read (with Expect:
/// 100-continue, before it is sent). The bytes reserved; a refusal's
/// message starts with `why`.
pub(super) async fn reserve(
    app: &App,
    limits: &Limits,
    record: &JobRecord,
    declared: Option<u64>,
    why: &str,
) -> ApiResult<u64> {
    let free = app.store.free_bytes().map_err(ApiError::internal)?;
    // A job whose VM holds a debug session open has not finished, for its account's limits.
    let sessions = crate::debug::open_of(app, &record.file_name);
    let admit = |usage: &db::Usage| {
        let usage = db::Usage { unfinished: usage.unfinished + sessions, ..*usage };
        quota::admit(&usage, limits, &app.settings.uploads, declared, free)
    };
    let reserved = db::reserve_upload(app.db(), record, |f| app.store.finished(f), admit).await;
    Ok(reserved.map_err(ApiError::internal)?.map_err(|mut refusal| {
        refusal.message = format!("{why}{}", refusal.message);
        refusal
    })?)
}

/// Writes the body into `file`, within the bytes reserved, the time
/// allowed and the disk's reserve; its size and sha256 (every result's
/// statement must name it). A body too small or not xz is refused.
async fn receive(
    app: &App,
    body: Body,
    (file, twin_part): (&mut tokio::fs::File, Option<&std::fs::File>),
    reserved: u64,
    limits: &Limits,
) -> ApiResult<(u64, String)> {
    let mut stream = body.into_data_stream();
    let (mut size, mut checked_disk) = (0u64, 0u64);
    let mut head: Vec<u8> = Vec::with_capacity(XZ_MAGIC.len());
    let mut digest = <sha2::Sha256 as sha2::Digest>::new();
    let deadline = tokio::time::Instant::now() + app.settings.upload_timeout;
    let mut out = crate::sparse::SparseWriter::new(file);
    while let Some(chunk) = next_chunk(app, &mut stream, deadline).await? {
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
            if let Some(part) = twin_part {
                part.set_modified(std::time::SystemTime::now()).map_err(ApiError::internal)?;
            }
            let free = app.store.free_bytes().map_err(ApiError::internal)?;
            if free < app.settings.uploads.min_free {
                return Err(quota::disk_full(free, 0, size, app.settings.uploads.min_free).into());
            }
        }
        if head.len() < XZ_MAGIC.len() {
            head.extend(chunk.iter().take(XZ_MAGIC.len() - head.len()));
        }
        sha2::Digest::update(&mut digest, &chunk);
        out.write(&chunk).await.map_err(ApiError::internal)?;
    }
    out.finish().await.map_err(ApiError::internal)?;
    if size < jobfile::MIN_JOB_SIZE {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{size} bytes is too small: a job file is at least {} bytes (its size is how much output may come back)", jobfile::MIN_JOB_SIZE)));
    }
    if head != XZ_MAGIC {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "not a job file: it does not start with an xz stream"));
    }
    Ok((size, jobfile::hex(&sha2::Digest::finalize(digest))))
}

/// The body's next chunk (`None` at its end), within the idle timeout and the whole upload's deadline.
async fn next_chunk(
    app: &App,
    stream: &mut axum::body::BodyDataStream,
    deadline: tokio::time::Instant,
) -> ApiResult<Option<axum::body::Bytes>> {
    let wait = app.settings.idle_timeout.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    match tokio::time::timeout(wait, stream.next()).await {
        Err(_) if tokio::time::Instant::now() >= deadline => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the upload took longer than the {} s allowed", app.settings.upload_timeout.as_secs()),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the upload sent nothing for {} s", app.settings.idle_timeout.as_secs()),
        )),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the upload broke off: {e}"))),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
    }
}

/// Pins each job's terms for the host, then renames its part into the
/// queue; from then on its guard removes it from there if the rest fails.
/// A failure takes every job's terms back.
fn enqueue(
    app: &App,
    queued: &[(JobRecord, PathBuf, FileId)],
    terms: &Terms,
    guards: &mut [UploadGuard],
) -> ApiResult<()> {
    for ((job, part, _), guard) in queued.iter().zip(guards.iter_mut()) {
        let pinned =
            app.store.write_terms(&job.file_name, terms).and_then(|()| app.store.enqueue(part, &job.file_name));
        if let Err(e) = pinned {
            for (job, _, _) in queued {
                Terms::remove_all(&app.store.running, job.file_name.as_ref());
            }
            return Err(ApiError::internal(e));
        }
        guard.path = Some(app.store.queue.join(&job.file_name));
    }
    Ok(())
}

/// Copies the uploaded job file for a verified rebuild's second run
/// (`twin`), synced, and writes both runs' terms: the name both give the
/// job, the time of submission as `SOURCE_DATE_EPOCH`, and, when the farm
/// has another live host, how long the second run keeps off the host that
/// took the first. Returns the copy and its identity.
async fn copy_for_second_run(
    app: &Arc<App>,
    upload: &Path,
    twin: &JobRecord,
    first: &JobRecord,
) -> ApiResult<(PathBuf, FileId)> {
    let part = app.store.upload_path(&twin.id);
    let live = crate::rebuild::live_hosts(app).await.map_err(ApiError::internal)?;
    let apart_until = if live > 1 { db::unix_now().max(0) as u64 + app.farm.apart_wait.as_secs() } else { 0 };
    let (app, upload, twin, first) = (app.clone(), upload.to_owned(), twin.clone(), first.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut from = std::fs::File::open(&upload)?;
        // Made empty at the reservation (`submit`); the uploads directory is the server's alone.
        let mut to =
            std::fs::OpenOptions::new().write(true).truncate(true).custom_flags(libc::O_NOFOLLOW).open(&part)?;
        std::io::copy(&mut from, &mut to)?;
        to.sync_all()?;
        let ino = FileId::of(&to.metadata()?);
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
    upload: &Path,
    image: &str,
) -> ApiResult<(Option<jobfile::deps::Resolution>, Vec<String>, bool)> {
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
        let Some((declaration, relations)) = declared else { return Ok((None, Vec::new(), false)) };
        let (caches, debug) = (declaration.caches, declaration.debug);
        if relations.is_empty() {
            return Ok((None, caches, debug));
        }
        let Some(resolver) = &app.packages else {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "this server takes no jobs that declare packages"));
        };
        let dir = app.store.images.join(format!("i{image}"));
        let manifest = jobfile::image::ImageManifest::load(&dir).map_err(ApiError::internal)?;
        match resolver.resolve(&image, &dir, &manifest, &relations, &|| false) {
            Ok(resolution) => Ok((Some(resolution), caches, debug)),
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
