//! Running the job script: clean environment, output to a file and the
//! console at once, a deadline, and every process it started killed and
//! reaped before the result is packed.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{setsid, Pid};

/// The PATH every job gets.
pub const JOB_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which processes "everything the job started" is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillScope {
    /// Every process but us (`kill(-1)`): right for PID 1, which adopts every orphan.
    Everything,
    /// The job's process group only: for running outside a VM (tests).
    Group,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub job_dir: PathBuf,
    pub script: PathBuf,
    pub output: PathBuf,
    pub timeout: Option<Duration>,
    pub job_name: Option<String>,
    pub kill_scope: KillScope,
    /// Bytes of output mirrored to the console before the mirror says it stops.
    pub console_max: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub started: SystemTime,
    pub ended: SystemTime,
    pub duration: Duration,
    pub output_bytes: u64,
    /// Processes the job left running, killed and reaped after it exited.
    pub leftovers: u32,
}

/// Runs the job script to its end or its deadline, then kills whatever it
/// left behind. Output goes to `cfg.output` and `console`, live.
pub fn run_job(cfg: &RunConfig, console: Box<dyn Write + Send>) -> io::Result<RunOutcome> {
    let output = File::create(&cfg.output)?;
    let (reader, writer) = io::pipe()?;
    let started = SystemTime::now();
    let clock = Instant::now();
    let copier = spawn_copier(reader, output, console, cfg.console_max);
    let script = cfg.script.as_os_str();
    let spawned = if is_executable(&cfg.script) {
        match command(cfg, script, &[], &writer)?.spawn() {
            // Executable but not a program the kernel can start (no #! line): a shell script.
            Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {
                command(cfg, "/bin/sh".as_ref(), &[script], &writer)?.spawn()
            }
            other => other,
        }
    } else {
        command(cfg, "/bin/sh".as_ref(), &[script], &writer)?.spawn()
    };
    drop(writer); // only the job holds the pipe's write end now
    let child = spawned.map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", cfg.script.display())))?;
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = cfg.timeout.map(|t| clock + t);

    let mut status = None;
    let mut timed_out = false;
    while status.is_none() {
        match reap_one()? {
            Some((p, st)) if p == pid => status = Some(st),
            Some(_) => continue, // an orphan the job left: reaped, nothing more
            None => {}
        }
        if status.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            kill_all(cfg.kill_scope, pid, Signal::SIGKILL);
            // A process stuck in D state never dies: after the wait, go on without it.
            status = Some(wait_for(pid, REAP_WAIT)?.unwrap_or(WaitStatus::Signaled(pid, Signal::SIGKILL, false)));
        } else if status.is_none() {
            thread::sleep(Duration::from_millis(10));
        }
    }
    let ended = SystemTime::now();
    let duration = clock.elapsed();
    let leftovers = stop_leftovers(cfg.kill_scope, pid);
    let output_bytes = copier.recv_timeout(Duration::from_secs(5)).unwrap_or(0);

    let status = status.expect("the loop ends only with a status");
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, code) => (Some(code), None),
        WaitStatus::Signaled(_, sig, _) => (None, Some(sig as i32)),
        _ => (None, None),
    };
    Ok(RunOutcome { exit_code, signal, timed_out, started, ended, duration, output_bytes, leftovers })
}

/// The job's command: clean environment, cwd the job directory, its own
/// session, stdout and stderr into the pipe.
fn command(cfg: &RunConfig, program: &OsStr, args: &[&OsStr], out: &io::PipeWriter) -> io::Result<Command> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", JOB_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb")
        .env("CONSTRUIR_JOB", cfg.job_name.as_deref().unwrap_or("job"))
        .current_dir(&cfg.job_dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| setsid().map(drop).map_err(io::Error::from));
    }
    Ok(cmd)
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Reaps one exited child, if any, without blocking.
fn reap_one() -> io::Result<Option<(Pid, WaitStatus)>> {
    match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => Ok(None),
        Ok(st) => Ok(st.pid().map(|p| (p, st))),
        Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// How long PID 1 waits for killed processes to be reaped before going on without them.
const REAP_WAIT: Duration = Duration::from_secs(10);

/// Waits for `pid` to end, at most `limit`; `None` if it did not.
fn wait_for(pid: Pid, limit: Duration) -> io::Result<Option<WaitStatus>> {
    let until = Instant::now() + limit;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(st) if matches!(st, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok(Some(st)),
            Ok(_) | Err(Errno::EINTR) if Instant::now() < until => thread::sleep(Duration::from_millis(10)),
            Ok(_) | Err(Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

fn kill_all(scope: KillScope, job: Pid, sig: Signal) {
    let _ = match scope {
        KillScope::Everything => kill(Pid::from_raw(-1), sig),
        KillScope::Group => kill(Pid::from_raw(-job.as_raw()), sig),
    };
}

/// After the script: SIGTERM to what it left running, a moment to exit,
/// SIGKILL to the rest, and reap everything. Returns how many were reaped.
fn stop_leftovers(scope: KillScope, job: Pid) -> u32 {
    let mut reaped = 0;
    kill_all(scope, job, Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return reaped,
            Ok(WaitStatus::StillAlive) => thread::sleep(Duration::from_millis(10)),
            Ok(_) => reaped += 1,
            Err(_) => {}
        }
    }
    kill_all(scope, job, Signal::SIGKILL);
    // Bounded too: what is stuck in D state is left behind, and packing goes on.
    // SIGKILL again whenever nothing is left to reap: a fork bomb's children
    // born after the last kill would otherwise live on.
    let until = Instant::now() + REAP_WAIT;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::EINTR) => continue,
            Ok(WaitStatus::StillAlive) if Instant::now() < until => {
                kill_all(scope, job, Signal::SIGKILL);
                thread::sleep(Duration::from_millis(10));
            }
            Err(_) | Ok(WaitStatus::StillAlive) => return reaped,
            Ok(_) => reaped += 1,
        }
    }
}

/// Copies the job's output to its file and to the console until every
/// writer has closed the pipe; sends the byte count when done.
fn spawn_copier(
    mut reader: io::PipeReader,
    mut file: File,
    mut console: Box<dyn Write + Send>,
    console_max: u64,
) -> mpsc::Receiver<u64> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let (mut total, mut mirrored) = (0u64, 0u64);
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            // The file is the record: a full disk ends the copy to it, not the job.
            let _ = file.write_all(&buf[..n]);
            if mirrored < console_max {
                let m = (console_max - mirrored).min(n as u64) as usize;
                let _ = console.write_all(&buf[..m]);
                mirrored += m as u64;
                if mirrored >= console_max {
                    let _ = writeln!(console, "\nconstruir-init: console copy of the job output stops here ({console_max} bytes); all of it is in job_output.txt");
                }
            }
            total += n as u64;
        }
        let _ = file.sync_all();
        let _ = console.flush();
        let _ = tx.send(total);
    });
    rx
}
