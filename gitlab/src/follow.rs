//! Following one construir job to its end: its console goes to the CI job's
//! trace as it arrives; a cancel from GitLab, or the job's GitLab timeout,
//! cancels it in construir.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Place};

/// How a followed job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Done {
        ok: bool,
        verdict: String,
        debug: Option<String>,
    },
    /// Ended without a result, for a reason on construir's side.
    Failed(String),
    /// Cancelled from GitLab; what construir said.
    Cancelled(String),
    /// Past the job's GitLab timeout, and cancelled.
    TimedOut(Duration),
}

/// How often the backend is asked.
const EVERY: Duration = Duration::from_secs(1);
/// How long the backend may stay unreachable before the job is given up.
const UNREACHABLE_FOR: Duration = Duration::from_secs(300);
/// How long a cancelled job may take to stop before it is left to construir.
const STOPPING_FOR: Duration = Duration::from_secs(120);

/// Runs a blocking backend call off the async threads.
pub async fn blocking<T: Send + 'static>(
    backend: &Arc<dyn Backend>,
    call: impl FnOnce(&dyn Backend) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let b = backend.clone();
    tokio::task::spawn_blocking(move || call(b.as_ref())).await.map_err(|e| format!("the call failed: {e}"))?
}

/// Follows `handle` until it ends; each piece of its console (sanitized) goes to `trace`.
pub async fn follow(
    backend: &Arc<dyn Backend>,
    handle: &str,
    trace: &(dyn Fn(&str) + Sync),
    cancel: &CancellationToken,
    deadline: Option<(Instant, Duration)>,
) -> Result<Ended, String> {
    let mut shown: u64 = 0;
    let mut last_place = String::new();
    let mut unreachable_since: Option<Instant> = None;
    // Why it is being stopped, and since when.
    let mut stopping: Option<(Ended, Instant)> = None;
    loop {
        let place = {
            let h = handle.to_owned();
            blocking(backend, move |b| b.place(&h)).await
        };
        let place = match place {
            Ok(p) => {
                unreachable_since = None;
                p
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > UNREACHABLE_FOR {
                    return Err(format!("construir has not answered for {} s: {e}", UNREACHABLE_FOR.as_secs()));
                }
                tokio::time::sleep(EVERY).await;
                continue;
            }
        };
        // The console so far (at the end, the whole log's rest).
        let h = handle.to_owned();
        if let Ok(bytes) = blocking(backend, move |b| b.console(&h, shown)).await {
            if !bytes.is_empty() {
                shown += bytes.len() as u64;
                trace(&jobfile::text::sanitize_lines(&bytes));
            }
        }
        let line = match &place {
            Place::Waiting(s) | Place::Running(s) => s.clone(),
            _ => String::new(),
        };
        // A running job's place says its elapsed time: only a change of state is news.
        let key = line.split(" for ").next().unwrap_or_default().to_owned();
        if !key.is_empty() && key != last_place {
            trace(&format!("construir: {}\n", jobfile::sanitize(line.as_bytes())));
            last_place = key;
        }
        match place {
            Place::Done { ok, verdict, debug } => {
                return Ok(match stopping {
                    Some((why, _)) if !ok => why,
                    _ => Ended::Done { ok, verdict, debug },
                })
            }
            Place::Failed(reason) => {
                return Ok(match stopping {
                    Some((Ended::Cancelled(_), _)) => Ended::Cancelled(reason),
                    Some((why, _)) => why,
                    None => Ended::Failed(reason),
                })
            }
            Place::Waiting(_) | Place::Running(_) => {}
        }
        if stopping.is_none() {
            let why = if cancel.is_cancelled() {
                Some(Ended::Cancelled(String::new()))
            } else {
                deadline.filter(|(at, _)| Instant::now() >= *at).map(|(_, limit)| Ended::TimedOut(limit))
            };
            if let Some(why) = why {
                let h = handle.to_owned();
                let said = blocking(backend, move |b| b.cancel(&h)).await;
                let what = if matches!(why, Ended::Cancelled(_)) {
                    "the GitLab job was cancelled"
                } else {
                    "past the job's timeout"
                };
                trace(&format!(
                    "construir: {what}: cancelling construir job {handle}: {}\n",
                    said.unwrap_or_else(|e| format!("the cancel failed: {e}"))
                ));
                stopping = Some((why, Instant::now()));
            }
        } else if let Some((why, since)) = &stopping {
            if since.elapsed() > STOPPING_FOR {
                return Ok(why.clone());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = cancel.cancelled(), if stopping.is_none() => {}
        }
    }
}
