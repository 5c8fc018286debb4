//! Debug sessions through the server (`jobfile::debug`): the owner's
//! WebSocket is relayed to the host whose VM holds the session. A local
//! host's session is its socket in `running/.debug/`; a remote host offers
//! its own over a WebSocket it opens (hosts pull: the server never dials a
//! host), held here until the owner attaches, the offer's time runs out,
//! or the owner cancels. Both directions are bytes, never read; each
//! message is bounded, and a session's relay is a task of its own, so a
//! slow or gone client stalls only its own session. Whether the server
//! takes debug jobs is `app::DebugPolicy`; the offers held are `offers`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

use crate::app::App;
use crate::db;
use crate::offers::Offer;

/// The most one message may carry, either way.
pub const MAX_MESSAGE: usize = 64 << 10;

/// How many debug sessions the account whose job is queued as `file_name`
/// holds open: their VMs still run, so for its limits those jobs have not
/// finished. (A queue name starts with its account's name and a dot.)
pub fn open_of(app: &App, file_name: &str) -> u64 {
    let Some((account, _)) = file_name.split_once('.') else { return 0 };
    let prefix = format!("{account}.");
    let remote = app.debug.lock().values().filter(|o| o.file_name.starts_with(&prefix)).count();
    let dir = jobfile::debug::session_dir(&app.store.running);
    let local = std::fs::read_dir(dir).into_iter().flatten().flatten().filter(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with(&prefix) && name.ends_with(".json")
    });
    (remote + local.count()) as u64
}

/// The open session of `job`, if it has one, as its owner sees it.
pub fn session(app: &App, job: &db::JobRecord) -> Option<wire::DebugSession> {
    if let Some(info) = app.debug.info(&job.id) {
        return Some(info);
    }
    let s = jobfile::debug::read_session(&app.store.running, job.file_name.as_ref())?;
    Some(wire::DebugSession {
        host: s.host,
        opened: rfc3339(s.opened),
        attach_by: rfc3339(s.attach_by),
        ends_by: rfc3339(s.ends_by),
        attached: s.attached.is_some(),
    })
}

fn rfc3339(secs: u64) -> String {
    jobfile::units::rfc3339(UNIX_EPOCH + Duration::from_secs(secs))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Where the owner's attach goes.
pub enum Target {
    /// A local host's session socket, connected.
    Local(tokio::net::UnixStream),
    /// A remote host's offer, taken.
    Remote(oneshot::Sender<(WebSocket, String)>),
}

/// Takes `job`'s session for one attach, or says why there is none.
pub fn take(app: &App, job: &db::JobRecord) -> Result<Target, String> {
    if let Some(offer) = app.debug.lock().get_mut(&job.id) {
        offer.info.attached = true;
        return offer.attach.take().map(Target::Remote).ok_or_else(|| "its debug session is attached already".into());
    }
    let running = &app.store.running;
    let Some(s) = jobfile::debug::read_session(running, job.file_name.as_ref()) else {
        return Err(
            "it has no debug session open (it was not submitted with --debug, it ended ok, or its session ended)"
                .into(),
        );
    };
    if s.attached.is_some() {
        return Err("its debug session is attached already".into());
    }
    let stream = jobfile::debug::connect(running, job.file_name.as_ref())
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .and_then(tokio::net::UnixStream::from_std)
        .map_err(|e| format!("its debug session cannot be reached: {e}"))?;
    Ok(Target::Local(stream))
}

/// Asks `job`'s open session to end (its owner's cancel); whether there was one.
pub fn end(app: &App, job: &db::JobRecord) -> std::io::Result<bool> {
    if let Some(offer) = app.debug.lock().remove(&job.id) {
        offer.end.notify_one();
        return Ok(true);
    }
    jobfile::debug::request_end(&app.store.running, job.file_name.as_ref())
}

/// Relays the owner's socket and a local session until either ends; audited.
pub async fn relay_local(app: Arc<App>, socket: WebSocket, unix: tokio::net::UnixStream, account: String, id: String) {
    let started = std::time::Instant::now();
    db::audit_or_log(app.db(), Some(&account), "debug_attached", &id).await;
    let (mut from_guest, mut to_guest) = unix.into_split();
    let (mut to_owner, mut from_owner) = socket.split();
    let up = async {
        while let Some(bytes) = next_bytes(&mut from_owner).await {
            if to_guest.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match from_guest.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_owner.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to_owner.send(Message::Close(None)).await;
    };
    tokio::select! { _ = up => {}, _ = down => {} }
    ended(&app, &account, &id, started).await;
}

/// The next binary message's bytes; `None` once the socket closes or fails.
async fn next_bytes(
    from: &mut (impl futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin),
) -> Option<axum::body::Bytes> {
    loop {
        match from.next().await? {
            Ok(Message::Binary(b)) => return Some(b),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Passes binary messages from one socket to another until either ends, then closes the second.
async fn pass(
    from: &mut (impl futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin),
    to: &mut (impl futures_util::Sink<Message> + Unpin),
) {
    while let Some(bytes) = next_bytes(from).await {
        if to.send(Message::Binary(bytes)).await.is_err() {
            return;
        }
    }
    let _ = to.send(Message::Close(None)).await;
}

async fn ended(app: &App, account: &str, id: &str, started: std::time::Instant) {
    let lasted = started.elapsed().as_secs_f64();
    log::info!("job {id}: debug session of {account} ended after {lasted:.1} s");
    db::audit_or_log(app.db(), Some(account), "debug_ended", &format!("{id} after {lasted:.0} s")).await;
}

/// Holds a remote host's offer of `id`'s session until its owner attaches
/// (then relays the two sockets), the offer's time runs out, the owner
/// cancels, or the host goes away.
pub async fn hold_offer(app: Arc<App>, host: WebSocket, host_name: String, job: db::JobRecord, q: wire::OfferQuery) {
    let (id, file_name) = (job.id, job.file_name);
    let (tx, rx) = oneshot::channel();
    let end = Arc::new(Notify::new());
    let now = unix_now();
    let info = wire::DebugSession {
        host: host_name.clone(),
        opened: rfc3339(now),
        attach_by: rfc3339(q.attach_by),
        ends_by: rfc3339(q.ends_by),
        attached: false,
    };
    app.debug.lock().insert(id.clone(), Offer { info, file_name, attach: Some(tx), end: end.clone() });
    log::info!("job {id}: host {host_name} offers its debug session (attach by {})", rfc3339(q.attach_by));
    let (mut to_host, mut from_host) = host.split();
    let wait = Duration::from_secs(q.attach_by.saturating_sub(now));
    let total = Duration::from_secs(q.ends_by.saturating_sub(now));
    // Until the owner attaches: the host may go away, and nothing it sends counts yet.
    let attached = tokio::select! {
        got = rx => got.ok(),
        _ = tokio::time::sleep(wait) => None,
        _ = end.notified() => None,
        _ = async { while let Some(Ok(m)) = from_host.next().await { if matches!(m, Message::Close(_)) { break } } } => None,
    };
    let Some((owner, account)) = attached else {
        app.debug.lock().remove(&id);
        let _ = to_host.send(Message::Close(None)).await;
        log::info!("job {id}: the debug session host {host_name} offered ended unattached");
        return;
    };
    let started = std::time::Instant::now();
    db::audit_or_log(app.db(), Some(&account), "debug_attached", &format!("{id} (on host {host_name})")).await;
    let (mut to_owner, mut from_owner) = owner.split();
    let up = pass(&mut from_owner, &mut to_host);
    let down = pass(&mut from_host, &mut to_owner);
    tokio::select! {
        _ = up => {},
        _ = down => {},
        _ = end.notified() => {},
        _ = tokio::time::sleep(total) => {},
    }
    app.debug.lock().remove(&id);
    ended(&app, &account, &id, started).await;
}
