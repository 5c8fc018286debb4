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
const EVERY: Duration = Duration::from_millis(500);
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

/// One followed job: what has been shown of it, and whether it is being stopped.
struct Follower<'a> {
    backend: &'a Arc<dyn Backend>,
    handle: &'a str,
    trace: &'a (dyn Fn(&str) + Sync),
    shown: u64,
    last_place: String,
    unreachable_since: Option<Instant>,
    /// Why it is being stopped, and since when.
    stopping: Option<(Ended, Instant)>,
}

/// Follows `handle` until it ends; each piece of its console (sanitized) goes to `trace`.
pub async fn follow(
    backend: &Arc<dyn Backend>,
    handle: &str,
    trace: &(dyn Fn(&str) + Sync),
    cancel: &CancellationToken,
    deadline: Option<(Instant, Duration)>,
) -> Result<Ended, String> {
    let mut f = Follower {
        backend,
        handle,
        trace,
        shown: 0,
        last_place: String::new(),
        unreachable_since: None,
        stopping: None,
    };
    loop {
        if let Some(place) = f.place().await? {
            // The console so far (at the end, the whole log's rest), then what the place says.
            f.console().await;
            if let Some(ended) = f.ended(place) {
                return Ok(ended);
            }
            f.stop_if_asked(cancel, deadline).await;
            if let Some((why, since)) = &f.stopping {
                if since.elapsed() > STOPPING_FOR {
                    return Ok(why.clone());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = cancel.cancelled(), if f.stopping.is_none() => {}
        }
    }
}

impl Follower<'_> {
    /// Where the job is; `None` while the backend does not answer, an error once it has not for too long.
    async fn place(&mut self) -> Result<Option<Place>, String> {
        let h = self.handle.to_owned();
        match blocking(self.backend, move |b| b.place(&h)).await {
            Ok(p) => {
                self.unreachable_since = None;
                Ok(Some(p))
            }
            Err(e) => {
                let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > UNREACHABLE_FOR {
                    return Err(format!("construir has not answered for {} s: {e}", UNREACHABLE_FOR.as_secs()));
                }
                Ok(None)
            }
        }
    }

    async fn console(&mut self) {
        let (h, from) = (self.handle.to_owned(), self.shown);
        if let Ok(bytes) = blocking(self.backend, move |b| b.console(&h, from)).await {
            if !bytes.is_empty() {
                self.shown += bytes.len() as u64;
                (self.trace)(&jobfile::text::sanitize_lines(&bytes));
            }
        }
    }

    /// How it ended, if it has (a stopped job's end is why it was stopped);
    /// otherwise says a change of state (not each second of a running job's time).
    fn ended(&mut self, place: Place) -> Option<Ended> {
        match place {
            Place::Done { ok, verdict, debug } => Some(match self.stopping.take() {
                Some((why, _)) if !ok => why,
                _ => Ended::Done { ok, verdict, debug },
            }),
            Place::Failed(reason) => Some(match self.stopping.take() {
                Some((Ended::Cancelled(_), _)) => Ended::Cancelled(reason),
                Some((why, _)) => why,
                None => Ended::Failed(reason),
            }),
            Place::Waiting(line) | Place::Running(line) => {
                let key = line.split(" for ").next().unwrap_or_default().to_owned();
                if key != self.last_place {
                    (self.trace)(&format!("construir: {}\n", jobfile::sanitize(line.as_bytes())));
                    self.last_place = key;
                }
                None
            }
        }
    }

    /// Cancels the job in construir once GitLab cancelled it or its timeout passed.
    async fn stop_if_asked(&mut self, cancel: &CancellationToken, deadline: Option<(Instant, Duration)>) {
        if self.stopping.is_some() {
            return;
        }
        let why = if cancel.is_cancelled() {
            Ended::Cancelled(String::new())
        } else if let Some((_, limit)) = deadline.filter(|(at, _)| Instant::now() >= *at) {
            Ended::TimedOut(limit)
        } else {
            return;
        };
        let h = self.handle.to_owned();
        let said = blocking(self.backend, move |b| b.cancel(&h)).await;
        let what =
            if matches!(why, Ended::Cancelled(_)) { "the GitLab job was cancelled" } else { "past the job's timeout" };
        (self.trace)(&format!(
            "construir: {what}: cancelling construir job {}: {}\n",
            self.handle,
            said.unwrap_or_else(|e| format!("the cancel failed: {e}"))
        ));
        self.stopping = Some((why, Instant::now()));
    }
}
