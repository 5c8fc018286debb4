//! The debug sessions remote hosts offer (`crate::debug`), by job id, held
//! until their owner attaches, the offer's time runs out, or the owner
//! cancels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::WebSocket;
use tokio::sync::{oneshot, Notify};

/// A remote host's offer, until its owner attaches.
pub struct Offer {
    pub info: wire::DebugSession,
    /// The job's name in the queue.
    pub file_name: String,
    /// Hands the owner's socket (and the account's name) to the host's task.
    pub attach: Option<oneshot::Sender<(WebSocket, String)>>,
    /// Wakes the host's task when the owner cancels.
    pub end: Arc<Notify>,
}

/// The sessions remote hosts offer, by job id.
#[derive(Default)]
pub struct Offers(Mutex<HashMap<String, Offer>>);

impl Offers {
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, Offer>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn info(&self, id: &str) -> Option<wire::DebugSession> {
        self.lock().get(id).map(|o| o.info.clone())
    }
}
