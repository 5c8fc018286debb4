//! Debug sessions over the API (`crate::debug`): the owner attaches
//! (`GET /v1/jobs/{id}/debug`) and a remote host offers its session
//! (`GET /v1/host/jobs/{id}/debug`), each as a WebSocket.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::{ApiError, ApiResult, HostAuthed, OwnJob};
use crate::app::App;
use crate::db::{self, RanOn};
use crate::debug::{self, Target, MAX_MESSAGE};

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/debug",
    tag = "submitters",
    params(("id" = String, Path, description = "the job id, 16 hex digits")),
    responses((status = 101, description = "the session, as a WebSocket: binary messages carry the frames toward the guest (`jobfile::debug::Frame`) and the shell's bytes back"), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 404, description = "no such job of this account", body = wire::ErrorBody), (status = 409, description = "the job has no debug session open, or it is attached already", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn attach(
    State(app): State<Arc<App>>,
    OwnJob { account, job }: OwnJob,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let target =
        debug::take(&app, &job).map_err(|why| ApiError::new(StatusCode::CONFLICT, format!("job {}: {why}", job.id)))?;
    let ws = ws.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE);
    let (id, name) = (job.id.clone(), account.name.clone());
    log::info!("job {id}: {name} attaches to its debug session");
    Ok(match target {
        Target::Local(unix) => ws.on_upgrade(move |socket| debug::relay_local(app, socket, unix, name, id)),
        Target::Remote(offer) => ws.on_upgrade(move |socket| async move {
            let _ = offer.send((socket, name));
        }),
    })
}

#[utoipa::path(
    get,
    path = "/v1/host/jobs/{id}/debug",
    tag = "build hosts",
    params(("id" = String, Path, description = "the job id, 16 hex digits"), wire::OfferQuery),
    responses((status = 101, description = "the offer, as a WebSocket the server holds until the job's owner attaches, then relays"), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 403, description = "not a build host's token", body = wire::ErrorBody), (status = 404, description = "no job this host delivered", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub(crate) async fn offer(
    State(app): State<Arc<App>>,
    HostAuthed(host): HostAuthed,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<wire::OfferQuery>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let job = db::job_by_id(app.db(), &id).await.map_err(ApiError::internal)?;
    // Only the host that delivered the job's result offers its session.
    let Some(job) = job.filter(|j| j.ran_on.as_ref() == Some(&RanOn::Remote(host.name.clone()))) else {
        return Err(ApiError::not_found());
    };
    if let Some(why) = app.settings.debug.refusal() {
        return Err(ApiError::new(StatusCode::CONFLICT, why));
    }
    let ws = ws.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE);
    log::info!("job {id}: host {} offers its debug session", host.name);
    Ok(ws.on_upgrade(move |socket| debug::hold_offer(app, socket, host.name, job, q)))
}
