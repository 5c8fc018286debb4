//! A submitter's jobs (`/v1/jobs`, `/v1/whoami`): list, show, the
//! log and the result, cancel. Submitting one is `submit`'s.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;

use super::{serve_file, ApiError, ApiResult, Authed, OwnJob};
use crate::app::App;
use crate::db::{self, JobRecord};
use crate::store::Place;

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

/// A job as its submitter sees it, at `place`.
pub(super) fn job_json(j: &JobRecord, place: &Place) -> wire::Job {
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
        // Served from the cache: the run that made its result.
        built_by: j
            .ran_on
            .as_ref()
            .map(crate::db::RanOn::key_owner)
            .or(j.from_cache.as_ref().and_then(|h| h.built_by.clone())),
        debug: None,
        from_cache: j.from_cache.clone(),
        result_cache: match (&j.from_cache, &j.cache_note, &j.cache_lookup) {
            (Some(_), _, _) => None,
            (None, Some(note), _) => Some(note.clone()),
            (None, None, Some(_)) => Some("to be stored if it ends ok".to_owned()),
            (None, None, None) => None,
        },
    }
}

/// A verified rebuild's state for its submitter: where the second run is,
/// and the verdict once there is one.
pub(super) async fn rebuild_view(app: &App, j: &JobRecord) -> ApiResult<Option<wire::Rebuild>> {
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
    let queued = crate::store::Queued::default();
    for j in &jobs {
        let mut job = job_json(j, &app.refresh_among(j, &queued).await);
        job.rebuild = rebuild_view(&app, j).await?;
        if matches!(job.place, Place::Done { .. }) {
            job.debug = crate::debug::session(&app, j);
        }
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
    out.debug = crate::debug::session(&app, &job);
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
    run_file(&app, job, run, &headers, RunFile::Log).await
}

/// One of a run's files, as its submitter fetches it.
#[derive(Debug, Clone, Copy)]
enum RunFile {
    Log,
    Result,
    Provenance,
}

/// Serves `which` of run `run` of `job` (`Range` honoured), or says why it is not there.
async fn run_file(
    app: &App,
    job: JobRecord,
    run: wire::RunQuery,
    headers: &HeaderMap,
    which: RunFile,
) -> ApiResult<Response> {
    let job = run_of(app, job, run).await?;
    let gone = "the job has not finished, failed, or its result was deleted";
    let (path, missing, kind) = match which {
        RunFile::Log => (
            app.store.log_path(&job.file_name),
            "no log yet: the job has not finished".to_owned(),
            "text/plain; charset=utf-8",
        ),
        RunFile::Result => (app.store.result_path(&job.file_name), format!("no result: {gone}"), "application/x-xz"),
        RunFile::Provenance => {
            (app.store.provenance_path(&job.file_name), format!("no provenance: {gone}"), "application/x-ndjson")
        }
    };
    let path = path.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, missing))?;
    serve_file(&path, None, headers, kind).await
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
    run_file(&app, job, run, &headers, RunFile::Result).await
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
    run_file(&app, job, run, &headers, RunFile::Provenance).await
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
            db::audit_or_log(app.db(), Some(&account.name), "cancel_requested", &id).await;
            let place = app.refresh(&job).await;
            let mut out = job_json(&job, &place);
            out.cancel = Some(format!("requested: {host} stops the VM within seconds; the job then ends in failed"));
            return Ok(Json(out));
        }
        done @ Place::Done { .. } if crate::debug::session(&app, &job).is_some() => {
            if crate::debug::end(&app, &job).map_err(ApiError::internal)? {
                db::audit_or_log(app.db(), Some(&account.name), "debug_cancelled", &id).await;
            }
            let mut out = job_json(&job, &done);
            out.cancel = Some("its debug session is ended: the host powers its VM off within seconds".to_owned());
            return Ok(Json(out));
        }
        other => {
            let Some(second) = second else {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("the job is {}: nothing to cancel", other.name()),
                ));
            };
            db::audit_or_log(app.db(), Some(&account.name), "cancelled", &format!("{id} (its second run)")).await;
            let mut out = job_json(&job, &other);
            out.rebuild = rebuild_view(&app, &job).await?;
            out.cancel = Some(format!("the job is {}; its second run {second}", other.name()));
            return Ok(Json(out));
        }
    }
    db::audit_or_log(app.db(), Some(&account.name), "cancelled", &id).await;
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
