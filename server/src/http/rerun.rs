//! `POST /v1/jobs/{id}/rerun`: a job's file again, as a new job of the same
//! account, counted against the same limits (the server keeps each job's
//! file as long as its result). With `debug=true` it runs as a debug job.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::submit::{queue_received, records, reserve, Received, UploadGuard};
use super::{ApiError, ApiResult, OwnJob};
use crate::app::App;
use crate::store::FileId;

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/rerun",
    tag = "submitters",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::RerunQuery),
    responses((status = 201, description = "the new job, queued", body = wire::Job), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 404, description = "no such job of this account", body = wire::ErrorBody), (status = 409, description = "its job file is no longer kept", body = wire::ErrorBody), (status = 400, description = "a debug run on a server that opens no debug sessions", body = wire::ErrorBody), (status = 429, description = "a limit of the account", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn rerun(
    State(app): State<Arc<App>>,
    OwnJob { account, job }: OwnJob,
    Query(rq): Query<wire::RerunQuery>,
) -> ApiResult<Response> {
    let kept = app.store.kept_input(&job.id);
    let Ok(len) = std::fs::metadata(&kept).map(|m| m.len()) else {
        let why = format!(
            "the job file of {} is no longer kept (retention removed it with its result, or the job is older than kept job files)",
            job.id
        );
        return Err(ApiError::new(StatusCode::CONFLICT, why));
    };
    // Asked to run again: never served from the result cache (nor kept in it).
    let q = wire::SubmitQuery {
        name: job.name.clone(),
        image: job.image.clone(),
        verify_on: None,
        debug: rq.debug,
        no_result_cache: true,
    };
    let limits = account.limits.or(app.settings.defaults);
    let (record, _) = records(&app, &account, &q)?;
    let upload = app.store.upload_path(&record.id);
    let mut guards = vec![UploadGuard { app: app.clone(), path: Some(upload.clone()), id: record.id.clone() }];
    reserve(&app, &limits, &record, Some(len), "").await?;
    let (store, id, to) = (app.clone(), job.id.clone(), upload.clone());
    let copied = tokio::task::spawn_blocking(move || {
        let (size, sha256) = store.store.copy_input(&id, &to)?;
        Ok::<_, std::io::Error>((size, sha256, FileId::of(&std::fs::metadata(&to)?)))
    });
    let (size, sha256, ino) = copied.await.map_err(ApiError::internal)?.map_err(ApiError::internal)?;
    if job.file_sha256.as_deref().is_some_and(|s| s != sha256) {
        let why = std::io::Error::other(format!("job {}: its kept job file is not the one submitted", job.id));
        return Err(ApiError::internal(why));
    }
    log::info!(
        "account {}: job {} runs again as {}{}",
        account.name,
        job.id,
        record.id,
        if rq.debug { ", a debug run" } else { "" }
    );
    let received = Received { record, twin: None, upload, ino, size, sha256 };
    queue_received(&app, &account, &q, received, &mut guards).await
}
