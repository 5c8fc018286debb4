//! The debug session (`jobfile::debug`): once a debug job's result is
//! packed and synced, a root shell with a real pty in `/job`, on the
//! session port. The shell starts when someone attaches (the first frame,
//! the terminal's size); the session ends when the shell ends or the host
//! goes away, and init then powers off. The host bounds how long all of it
//! may take.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobfile::debug::{Decoder, Frame, OPEN_MARKER, PORT_NAME};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{setsid, Pid};

use crate::say;

/// The modules the session port needs, as `device::load_modules` reads them
/// (image-builder writes the list; a kernel with the driver built in needs none).
pub const MODULE_LIST: &str = jobfile::image::DEBUG_MODULE_LIST;

/// What the session's shell is given besides the job's own variables.
pub struct Shell<'a> {
    pub job_dir: &'a Path,
    pub job_name: Option<&'a str>,
    pub env: &'a [(String, String)],
    pub device_wait: Duration,
}

/// Opens the session and serves it until it ends. `disk` is the job disk,
/// synced before the session is said to be open.
pub fn serve(disk: &File, shell: &Shell) {
    if let Err(e) = disk.sync_all() {
        say!("cannot sync the job disk: {e}; no debug session");
        return;
    }
    for failure in crate::device::load_modules(Path::new(MODULE_LIST)) {
        say!("{failure}");
    }
    let port = match find_port(shell.device_wait).and_then(|p| open_port(&p)) {
        Ok(port) => port,
        Err(e) => {
            say!("no debug session: {e}");
            return;
        }
    };
    // The marker is the line's start; what follows is for people.
    say!("{} (the result is packed and synced; the shell starts when its owner attaches)", marker_rest());
    match session(&port, shell) {
        Ok(why) => say!("debug session ended: {why}"),
        Err(e) => say!("debug session ended: {e}"),
    }
}

/// `OPEN_MARKER` without the `construir-init: ` that `say!` prints first.
fn marker_rest() -> &'static str {
    let text = std::str::from_utf8(OPEN_MARKER).unwrap_or_default();
    text.strip_prefix("construir-init: ").unwrap_or(text)
}

/// The port's device: the `vport*` whose name is `PORT_NAME`.
fn find_port(wait: Duration) -> io::Result<PathBuf> {
    let start = Instant::now();
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if name.trim_end() == PORT_NAME {
                    return Ok(Path::new("/dev").join(entry.file_name()));
                }
            }
        }
        if start.elapsed() >= wait {
            return Err(io::Error::other(format!("no virtio port named {PORT_NAME} within {} s", wait.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn open_port(path: &Path) -> io::Result<File> {
    // devtmpfs makes the node when the port appears; wait briefly for it.
    let start = Instant::now();
    loop {
        match fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && start.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))),
        }
    }
}

/// Waits for the first frame (the terminal's size), starts the shell, then
/// relays until one side ends. Returns why it ended.
fn session(port: &File, shell: &Shell) -> io::Result<String> {
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 << 10];
    let mut pending = Vec::new();
    let size = loop {
        let n = (&*port).read(&mut buf)?;
        if n == 0 {
            return Ok("the host closed the session before anyone attached".into());
        }
        let frames = decoder.push(&buf[..n]).map_err(io::Error::other)?;
        let mut frames = frames.into_iter();
        if let Some(first) = frames.next() {
            pending.extend(frames);
            break match first {
                Frame::Size { rows, cols } => Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 },
                Frame::Data(_) => Winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 },
            };
        }
    };
    let pty = openpty(Some(&size), None).map_err(io::Error::from)?;
    let child = spawn_shell(pty.slave, shell)?;
    let pid = Pid::from_raw(child as i32);
    say!("debug session: someone attached; a shell runs in {}", shell.job_dir.display());
    let master = File::from(pty.master);
    for frame in pending {
        apply(frame, &master)?;
    }
    let why = relay(port, &master, &mut decoder, pid);
    // Whatever the shell started goes with it.
    let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
    reap();
    why
}

fn spawn_shell(slave: OwnedFd, shell: &Shell) -> io::Result<u32> {
    let program = ["/bin/bash", "/bin/sh"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("/bin/sh");
    let mut cmd = Command::new(program);
    cmd.arg("-i")
        .env_clear()
        .env("PATH", crate::runner::JOB_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("TERM", "xterm-256color")
        .env("TZ", "UTC")
        .env("CONSTRUIR_JOB", shell.job_name.unwrap_or("job"))
        .env("PS1", "construir-debug:\\w# ")
        .envs(shell.env.iter().map(|(k, v)| (k, v)))
        .current_dir(shell.job_dir)
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and the TIOCSCTTY ioctl are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            setsid().map_err(io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?.id())
}

fn apply(frame: Frame, master: &File) -> io::Result<()> {
    match frame {
        Frame::Data(bytes) => (&*master).write_all(&bytes),
        Frame::Size { rows, cols } => {
            let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
            // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call.
            if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

/// Port to shell (frames) and shell to port (bytes), until the shell ends
/// (its side of the pty hangs up) or the host goes away (the port reads 0).
fn relay(port: &File, master: &File, decoder: &mut Decoder, shell: Pid) -> io::Result<String> {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let (port_ready, master_ready) = {
            let mut fds =
                [PollFd::new(port.as_fd(), PollFlags::POLLIN), PollFd::new(master.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(500u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if master_ready {
            match (&*master).read(&mut buf) {
                Ok(0) => return Ok("the shell ended".into()),
                Ok(n) => (&*port).write_all(&buf[..n])?,
                // EIO: the shell and everything holding its terminal are gone.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok("the shell ended".into()),
                Err(e) => return Err(e),
            }
        }
        if port_ready {
            let n = (&*port).read(&mut buf)?;
            if n == 0 {
                return Ok("the host closed the session".into());
            }
            for frame in decoder.push(&buf[..n]).map_err(io::Error::other)? {
                apply(frame, master)?;
            }
        }
        if matches!(waitpid(shell, Some(WaitPidFlag::WNOHANG)), Ok(s) if s.pid().is_some()) {
            // Its last words may still be in the pty.
            drain(master, port);
            return Ok("the shell ended".into());
        }
        reap();
    }
}

/// What the shell left in the pty, to the port, without waiting.
fn drain(master: &File, port: &File) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            return;
        }
        match (&*master).read(&mut buf) {
            Ok(n) if n > 0 => {
                if (&*port).write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// PID 1 reaps every orphan the shell leaves.
fn reap() {
    while matches!(waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)), Ok(s) if s.pid().is_some()) {}
}
