//! A debug job's session (`jobfile::debug`), on the host that runs its VM:
//! the channel QEMU's session port is wired to, the socket in
//! `running/.debug/` a person (`construir-host debug`), the server or a
//! remote host's link attaches to, and the relay between the two. The
//! relay moves bytes and never reads them; each direction holds at most
//! `BUFFER` bytes, so a slow or gone client stalls only its own session.
//! The session is bounded: someone must attach within `wait` of its
//! opening, and the VM ends `max` after it at the latest.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jobfile::debug::Session;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::qemu::Vm;

/// The most bytes held for either direction.
const BUFFER: usize = 64 << 10;

/// How long sessions may wait and last on this host (`run --debug-wait`, `--debug-max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugLimits {
    pub wait: Duration,
    pub max: Duration,
}

/// The host's end of a debug VM's session channel.
#[derive(Debug)]
pub struct Channel(UnixStream);

/// A connected pair: the host's end, and QEMU's (for `VmSpec::debug_port`).
pub fn channel() -> io::Result<(Channel, OwnedFd)> {
    let (host, qemu) = UnixStream::pair()?;
    Ok((Channel(host), qemu.into()))
}

/// How a session went.
#[derive(Debug, Clone)]
pub struct Summary {
    /// From the session's opening to the attach, if anyone attached.
    pub attached_after: Option<Duration>,
    /// From the session's opening to its end.
    pub lasted: Duration,
    pub why: String,
    /// Whether the VM ended by itself (the shell ended and init powered off).
    pub vm_ended: bool,
}

/// Where and for whom a session is served.
pub struct Place<'a> {
    /// The queue's `running/` (its `.debug/` holds the socket and the record).
    pub running: &'a Path,
    pub file_name: &'a OsStr,
    pub host_id: &'a str,
    pub label: &'a str,
}

/// A session open for attaching: its socket listens and its record is
/// written (before the result is delivered, so that whoever sees the result
/// sees the session too).
pub struct Listening {
    listener: UnixListener,
    record: Session,
    opened: Instant,
}

/// Opens the session's socket and writes its record.
pub fn open(place: &Place, limits: DebugLimits) -> io::Result<Listening> {
    let listener = jobfile::debug::listen(place.running, place.file_name)?;
    listener.set_nonblocking(true)?;
    let now = unix_now();
    let record = Session {
        host: place.host_id.to_owned(),
        socket: jobfile::debug::socket_name(place.file_name),
        opened: now,
        attach_by: now + limits.wait.as_secs(),
        ends_by: now + limits.max.as_secs(),
        attached: None,
    };
    if let Err(e) = jobfile::debug::write_session(place.running, place.file_name, &record) {
        jobfile::debug::remove_session(place.running, place.file_name);
        return Err(e);
    }
    Ok(Listening { listener, record, opened: Instant::now() })
}

/// Serves the session until someone attaches and leaves, nobody attaches
/// within `limits.wait`, `limits.max` passes, the VM ends, or the host stops
/// or the job is cancelled; then removes its socket and record.
pub fn serve(
    place: &Place,
    limits: DebugLimits,
    listening: Listening,
    vm: &Vm,
    channel: Channel,
    stop: &AtomicBool,
    cancel: &AtomicBool,
) -> io::Result<Summary> {
    let Listening { listener, mut record, opened } = listening;
    let served = (|| {
        let ends = |why: &str| Summary {
            attached_after: None,
            lasted: opened.elapsed(),
            why: why.to_owned(),
            vm_ended: false,
        };
        let watch = Watch { place, vm, opened, max: limits.max, stop, cancel };
        let client = loop {
            if let Some(why) = watch.over() {
                return Ok(Summary { vm_ended: why.1, ..ends(why.0) });
            }
            if opened.elapsed() >= limits.wait {
                return Ok(ends(&format!("nobody attached within {} s", limits.wait.as_secs())));
            }
            match listener.accept() {
                Ok((client, _)) => break client,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(e) => return Err(e),
            }
        };
        let attached_after = opened.elapsed();
        log::info!(
            "job {}: debug session: attached {:.1} s after it opened",
            place.label,
            attached_after.as_secs_f64()
        );
        record.attached = Some(unix_now());
        jobfile::debug::write_session(place.running, place.file_name, &record)?;
        let (why, vm_ended) = relay(client, channel.0, &listener, &watch)?;
        Ok(Summary { attached_after: Some(attached_after), lasted: opened.elapsed(), why, vm_ended })
    })();
    jobfile::debug::remove_session(place.running, place.file_name);
    served
}

/// What a session is watched against while it is served.
struct Watch<'a> {
    place: &'a Place<'a>,
    vm: &'a Vm,
    opened: Instant,
    max: Duration,
    stop: &'a AtomicBool,
    cancel: &'a AtomicBool,
}

impl Watch<'_> {
    /// Why the session must end now, if it must, and whether the VM ended by itself.
    fn over(&self) -> Option<(&'static str, bool)> {
        if self.vm.exited_within(Duration::ZERO).unwrap_or(true) {
            Some(("the VM powered off", true))
        } else if self.opened.elapsed() >= self.max {
            Some(("its longest time passed", false))
        } else if self.stop.load(Ordering::Relaxed) {
            Some(("the host is stopping", false))
        } else if self.cancel.load(Ordering::Relaxed)
            || std::fs::symlink_metadata(jobfile::debug::end_request(self.place.running, self.place.file_name)).is_ok()
        {
            Some(("its submitter cancelled it", false))
        } else {
            None
        }
    }
}

/// The two sides of an attached session and what is held for each.
struct Relay {
    client: UnixStream,
    guest: UnixStream,
    to_guest: Vec<u8>,
    to_client: Vec<u8>,
    buf: Vec<u8>,
    /// When the guest's side ended (its last bytes may still be going out).
    guest_gone: Option<Instant>,
}

/// Relays client <-> guest until one side ends or the session must: why,
/// and whether the VM ended by itself.
fn relay(client: UnixStream, guest: UnixStream, listener: &UnixListener, watch: &Watch) -> io::Result<(String, bool)> {
    client.set_nonblocking(true)?;
    guest.set_nonblocking(true)?;
    let mut r = Relay {
        client,
        guest,
        to_guest: Vec::new(),
        to_client: Vec::new(),
        buf: vec![0u8; 16 << 10],
        guest_gone: None,
    };
    loop {
        if let Some(at) = r.guest_gone {
            // The guest's last words go out, for a moment at most.
            if r.to_client.is_empty() || at.elapsed() > Duration::from_secs(1) {
                return Ok(("the shell ended".into(), true));
            }
        } else if let Some((why, ended)) = watch.over() {
            return Ok((why.into(), ended));
        }
        let (client_ev, guest_ev) = r.ready(listener)?;
        if let Some(why) = r.step(client_ev, guest_ev) {
            return Ok((why, false));
        }
    }
}

impl Relay {
    /// Waits (100 ms at most) for either side to be ready for what it can
    /// take now; a second client meanwhile is refused.
    fn ready(&self, listener: &UnixListener) -> io::Result<(PollFlags, PollFlags)> {
        let want = |read: bool, write: bool| {
            let mut f = PollFlags::empty();
            f.set(PollFlags::POLLIN, read);
            f.set(PollFlags::POLLOUT, write);
            f
        };
        let guest_reads = self.guest_gone.is_none() && self.to_client.len() < BUFFER;
        let mut fds = [
            PollFd::new(self.client.as_fd(), want(self.to_guest.len() < BUFFER, !self.to_client.is_empty())),
            PollFd::new(self.guest.as_fd(), want(guest_reads, !self.to_guest.is_empty())),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if fds[2].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
            refuse_another(listener);
        }
        Ok((fds[0].revents().unwrap_or(PollFlags::empty()), fds[1].revents().unwrap_or(PollFlags::empty())))
    }

    /// Moves what is ready each way; why the client's side ended, if it did.
    fn step(&mut self, client_ev: PollFlags, guest_ev: PollFlags) -> Option<String> {
        let readable = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        if client_ev.intersects(readable) && self.to_guest.len() < BUFFER {
            match pull(&mut self.client, &mut self.buf, &mut self.to_guest, BUFFER) {
                Ok(true) => {}
                Ok(false) => return Some("its owner left".into()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Some("its owner left".into()),
                Err(e) => return Some(format!("the client's connection failed: {e}")),
            }
        }
        if self.guest_gone.is_none()
            && guest_ev.intersects(readable)
            && self.to_client.len() < BUFFER
            && !pull(&mut self.guest, &mut self.buf, &mut self.to_client, BUFFER).unwrap_or(false)
        {
            self.guest_gone = Some(Instant::now());
        }
        if !self.to_guest.is_empty() && push(&mut self.guest, &mut self.to_guest).is_err() {
            self.guest_gone.get_or_insert_with(Instant::now);
        }
        if !self.to_client.is_empty() {
            if let Err(e) = push(&mut self.client, &mut self.to_client) {
                return Some(format!("the client's connection failed: {e}"));
            }
        }
        None
    }
}

/// Reads what is there into `into` (up to `cap` bytes held); `false` at the end of the stream.
fn pull(from: &mut UnixStream, buf: &mut [u8], into: &mut Vec<u8>, cap: usize) -> io::Result<bool> {
    let room = cap.saturating_sub(into.len()).min(buf.len());
    if room == 0 {
        return Ok(true);
    }
    match from.read(&mut buf[..room]) {
        Ok(0) => Ok(false),
        Ok(n) => {
            into.extend_from_slice(&buf[..n]);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

/// Writes what `from` holds as far as the other side takes it now.
fn push(to: &mut UnixStream, from: &mut Vec<u8>) -> io::Result<()> {
    match to.write(from) {
        Ok(n) => {
            from.drain(..n);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(e),
    }
}

/// One attach per session: a second is told so and closed.
fn refuse_another(listener: &UnixListener) {
    if let Ok((mut other, _)) = listener.accept() {
        let _ = other.set_nonblocking(true);
        let _ = other.write_all(b"construir: this debug session is already attached\r\n");
    }
}

/// Removes the sessions host `host_id` left open when it last stopped (the
/// VMs went with it), before it serves any: the job file names they were for.
pub fn forget_stale(running: &Path, host_id: &str) -> Vec<std::ffi::OsString> {
    let mut gone = Vec::new();
    let Ok(entries) = std::fs::read_dir(jobfile::debug::session_dir(running)) else { return gone };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(file_name) = name.to_str().and_then(|n| n.strip_suffix(".json")) else { continue };
        let file_name = std::ffi::OsString::from(file_name);
        if jobfile::debug::read_session(running, &file_name).is_some_and(|s| s.host == host_id) {
            jobfile::debug::remove_session(running, &file_name);
            gone.push(file_name);
        }
    }
    gone
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_own_stale_sessions_are_forgotten_and_no_others() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let running = tmp.path();
        let session = |host: &str| Session {
            host: host.into(),
            socket: "x.sock".into(),
            opened: 1,
            attach_by: 2,
            ends_by: 3,
            attached: None,
        };
        jobfile::debug::write_session(running, "mine_i0.tar.xz".as_ref(), &session("h1")).expect("write");
        jobfile::debug::write_session(running, "theirs_i0.tar.xz".as_ref(), &session("h2")).expect("write");
        assert_eq!(forget_stale(running, "h1"), vec![std::ffi::OsString::from("mine_i0.tar.xz")]);
        assert!(jobfile::debug::read_session(running, "mine_i0.tar.xz".as_ref()).is_none());
        assert!(jobfile::debug::read_session(running, "theirs_i0.tar.xz".as_ref()).is_some());
    }

    #[test]
    fn pull_and_push_keep_within_the_cap() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        b.set_nonblocking(true).expect("nonblocking");
        a.write_all(&[7u8; 100]).expect("write");
        let (mut buf, mut held) = (vec![0u8; 64], Vec::new());
        assert!(pull(&mut b, &mut buf, &mut held, 30).expect("pull"));
        assert_eq!(held.len(), 30, "no more than the cap");
        assert!(pull(&mut b, &mut buf, &mut held, 30).expect("pull"));
        assert_eq!(held.len(), 30, "a full buffer takes nothing");
        push(&mut b, &mut held).expect("push");
        assert!(held.is_empty());
        let mut back = [0u8; 30];
        a.read_exact(&mut back).expect("read");
        drop(a);
        let mut rest = Vec::new();
        while pull(&mut b, &mut buf, &mut rest, 1000).expect("pull") {}
        assert_eq!(rest.len(), 70, "what was left, then the end");
    }
}
