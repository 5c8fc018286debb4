//! The person's end of a debug session (`crate::debug`): this terminal in
//! raw mode, its keys sent as frames, its size sent first and whenever it
//! changes, the shell's bytes written out as they come. `~.` at the start
//! of a line leaves (as ssh has it; `~~` sends one `~`). The transport is
//! a `Link`: a local socket (`construir-host debug`) or the server's
//! WebSocket (`construir debug`).

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::termios::{self, SetArg, Termios};

use crate::debug::Frame;

/// What a link gave back.
#[derive(Debug)]
pub enum Received {
    Bytes(Vec<u8>),
    /// Nothing within the wait.
    Idle,
    /// The other side ended the session.
    Closed,
}

/// A session's transport, both directions.
pub trait Link {
    /// Sends encoded frames.
    fn send(&mut self, frames: &[u8]) -> io::Result<()>;
    /// What came back, waiting at most about `wait`.
    fn recv(&mut self, wait: Duration) -> io::Result<Received>;
}

/// A local socket as a link.
impl Link for std::os::unix::net::UnixStream {
    fn send(&mut self, frames: &[u8]) -> io::Result<()> {
        self.write_all(frames)
    }

    fn recv(&mut self, wait: Duration) -> io::Result<Received> {
        self.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; 16 << 10];
        match self.read(&mut buf) {
            Ok(0) => Ok(Received::Closed),
            Ok(n) => Ok(Received::Bytes(buf[..n].to_vec())),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(Received::Idle),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Received::Idle),
            Err(e) => Err(e),
        }
    }
}

/// How an attach ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// `~.` was typed.
    Left,
    /// The session ended on the other side (the shell exited, the VM went).
    Closed,
    /// This terminal's input ended.
    InputEnded,
}

/// Puts the terminal in raw mode while it lives (when stdin is a terminal).
struct Raw(Option<Termios>);

impl Raw {
    fn enter() -> Raw {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Raw(None);
        }
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else { return Raw(None) };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return Raw(None);
        }
        Raw(Some(saved))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// This terminal's size (rows, columns), 24x80 when it has none.
pub fn size() -> (u16, u16) {
    // SAFETY: TIOCGWINSZ writes one winsize, which lives across the call.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = [libc::STDIN_FILENO, libc::STDOUT_FILENO]
        .iter()
        .any(|&fd| unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0);
    if ok {
        (ws.ws_row, ws.ws_col)
    } else {
        (24, 80)
    }
}

/// Finds `~.` at a line's start in what is typed; what is not the escape goes on.
#[derive(Debug)]
struct Escape {
    at_line_start: bool,
    tilde: bool,
}

impl Escape {
    fn new() -> Escape {
        Escape { at_line_start: true, tilde: false }
    }

    /// The bytes to send, and whether `~.` was typed.
    fn feed(&mut self, typed: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(typed.len());
        for &b in typed {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => {
                        out.push(b'~');
                        self.at_line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.at_line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.at_line_start = b == b'\r' || b == b'\n';
        }
        (out, false)
    }
}

/// Attaches this terminal to `link` until the session ends or `~.` is typed.
pub fn attach(link: &mut dyn Link) -> io::Result<Ended> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let _raw = Raw::enter();
    let mut shown = size();
    let mut out = io::stdout();
    if let Some(ended) = sent(link, &Frame::Size { rows: shown.0, cols: shown.1 }.encode(), &mut out)? {
        return Ok(ended);
    }
    let mut escape = Escape::new();
    loop {
        match link.recv(Duration::from_millis(30))? {
            Received::Bytes(b) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Received::Idle => {}
            Received::Closed => return Ok(Ended::Closed),
        }
        loop {
            match rx.try_recv() {
                Ok(typed) => {
                    let (send, leave) = escape.feed(&typed);
                    if !send.is_empty() {
                        let mut frames = Vec::new();
                        Frame::data(&send, &mut frames);
                        if let Some(ended) = sent(link, &frames, &mut out)? {
                            return Ok(ended);
                        }
                    }
                    if leave {
                        return Ok(Ended::Left);
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return Ok(Ended::InputEnded),
            }
        }
        let now = size();
        if now != shown {
            shown = now;
            if let Some(ended) = sent(link, &Frame::Size { rows: now.0, cols: now.1 }.encode(), &mut out)? {
                return Ok(ended);
            }
        }
    }
}

/// Sends `frames`; when the other side has closed (a session that ended, or
/// that refused this attach), shows what it said last and says it ended.
fn sent(link: &mut dyn Link, frames: &[u8], out: &mut impl Write) -> io::Result<Option<Ended>> {
    match link.send(frames) {
        Ok(()) => Ok(None),
        Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
            while let Ok(Received::Bytes(b)) = link.recv(Duration::from_millis(50)) {
                out.write_all(&b)?;
            }
            out.flush()?;
            Ok(Some(Ended::Closed))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_dot_at_a_line_start_leaves_and_nothing_else_does() {
        let mut e = Escape::new();
        assert_eq!(e.feed(b"ls ~/x\r"), (b"ls ~/x\r".to_vec(), false));
        assert_eq!(e.feed(b"~~"), (b"~".to_vec(), false), "~~ sends one ~");
        assert_eq!(e.feed(b"\r~"), (b"\r".to_vec(), false), "a ~ at a line start waits");
        assert_eq!(e.feed(b"x"), (b"~x".to_vec(), false), "then goes with what follows");
        assert_eq!(e.feed(b"\n~."), (b"\n".to_vec(), true));
        assert_eq!(Escape::new().feed(b"~."), (Vec::new(), true), "the very start is a line start");
    }
}
