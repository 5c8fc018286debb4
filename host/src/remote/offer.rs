//! A debug session on a remote host (`jobfile::debug`): once the job's
//! result is delivered, the host offers the session its spool holds to the
//! server over a WebSocket of its own (`GET /v1/host/jobs/{id}/debug`); the
//! server never dials a host. The spool's session socket is connected only
//! when the owner attaches (the first message the server passes on), since
//! that connection is the attach. A closed offer (nobody came in time, the
//! owner cancelled, the server went away) ends the session on this host.
//! Bytes pass as they are, each way.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use jobfile::terminal::{Link, Received};
use wire::client::Api;

/// One offer: the job's server id and its name in the spool.
pub(crate) struct Offer {
    pub api: Arc<Api>,
    /// The spool's `running/`.
    pub running: PathBuf,
    pub file_name: String,
    pub id: String,
    /// Sessions this host serves now (they count against its capacity).
    pub open: Arc<AtomicUsize>,
}

/// Offers the session of `offer.file_name`, if the spool has one open, on a thread of its own.
pub(crate) fn offer_if_open(offer: Offer) {
    let Some(session) = jobfile::debug::read_session(&offer.running, offer.file_name.as_ref()) else { return };
    log::info!("job {}: its debug session is open; offering it to the server", offer.file_name);
    let open = Arc::clone(&offer.open);
    let (running, file_name) = (offer.running.clone(), offer.file_name.clone());
    open.fetch_add(1, Ordering::Relaxed);
    let spawned = thread::Builder::new().name(format!("debug {}", offer.id)).spawn(move || {
        let path = format!("host/jobs/{}/debug?attach_by={}&ends_by={}", offer.id, session.attach_by, session.ends_by);
        let why = match wire::socket::Socket::open(&offer.api, &path) {
            Ok(socket) => serve(&offer, socket),
            Err(e) => format!("the server would not take the offer: {e}"),
        };
        log::info!("job {}: debug session offered to the server ended: {why}", offer.file_name);
        // Whatever ended it ends it here too (a session nobody can reach has no reason to go on).
        let _ = jobfile::debug::request_end(&offer.running, offer.file_name.as_ref());
        offer.open.fetch_sub(1, Ordering::Relaxed);
    });
    if let Err(e) = spawned {
        open.fetch_sub(1, Ordering::Relaxed);
        log::error!("job {file_name}: cannot offer its debug session: {e}");
        let _ = jobfile::debug::request_end(&running, file_name.as_ref());
    }
}

/// Waits for the owner's first bytes, then relays; why it ended.
fn serve(offer: &Offer, mut socket: wire::socket::Socket) -> String {
    let first = loop {
        if jobfile::debug::read_session(&offer.running, offer.file_name.as_ref()).is_none() {
            socket.close("the session ended on the host");
            return "the session ended here before anyone attached".into();
        }
        match socket.recv(Duration::from_millis(500)) {
            Ok(Received::Bytes(b)) => break b,
            Ok(Received::Idle) => {}
            Ok(Received::Closed) => {
                return "the server closed the offer (nobody attached in time, or it was cancelled)".into()
            }
            Err(e) => return format!("the offer's connection failed: {e}"),
        }
    };
    let mut local = match jobfile::debug::connect(&offer.running, offer.file_name.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            socket.close("the session cannot be reached");
            return format!("cannot reach the spool's session: {e}");
        }
    };
    log::info!("job {}: its owner attached through the server", offer.file_name);
    if let Err(e) = local.write_all(&first) {
        return format!("the session's socket failed: {e}");
    }
    let why = relay(&mut socket, &mut local);
    socket.close("the session ended");
    why
}

fn relay(socket: &mut wire::socket::Socket, local: &mut UnixStream) -> String {
    if let Err(e) = local.set_nonblocking(true) {
        return format!("the session's socket failed: {e}");
    }
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match socket.recv(Duration::from_millis(20)) {
            Ok(Received::Bytes(b)) => {
                if let Err(e) = write_all_waiting(local, &b) {
                    return format!("the session's socket failed: {e}");
                }
            }
            Ok(Received::Idle) => {}
            Ok(Received::Closed) => return "its owner left".into(),
            Err(e) => return format!("the connection to the server failed: {e}"),
        }
        loop {
            match local.read(&mut buf) {
                Ok(0) => return "the session ended on the host".into(),
                Ok(n) => {
                    if let Err(e) = socket.send(&buf[..n]) {
                        return format!("the connection to the server failed: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return format!("the session's socket failed: {e}"),
            }
        }
    }
}

/// `write_all` on a nonblocking socket: waits while the other side is full.
fn write_all_waiting(to: &mut UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match to.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
