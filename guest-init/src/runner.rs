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
    /// Set in the job's environment after the fixed variables (its caches').
    pub env: Vec<(String, String)>,
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
        // Every orphan that has ended is reaped at once: a fork bomb's zombies hold its PIDs.
        status = reap_all().into_iter().find_map(|(p, st)| (p == pid).then_some(st));
        if status.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            break;
        }
        if status.is_none() {
            thread::sleep(Duration::from_millis(10));
        }
    }
    let ended = SystemTime::now();
    let duration = clock.elapsed();
    // A job that timed out gets no polite SIGTERM: everything is killed now.
    let polite = if timed_out { Duration::ZERO } else { Duration::from_secs(2) };
    let (leftovers, job_status) = stop_everything(cfg.kill_scope, pid, polite);
    // A process stuck in D state never dies: after the wait, go on without it.
    let status = status.or(job_status).unwrap_or(WaitStatus::Signaled(pid, Signal::SIGKILL, false));
    let output_bytes = copier.recv_timeout(Duration::from_secs(5)).unwrap_or(0);

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
        .env("TZ", "UTC")
        .env("CONSTRUIR_JOB", cfg.job_name.as_deref().unwrap_or("job"))
        .envs(cfg.env.iter().map(|(k, v)| (k, v)))
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

/// Most children reaped in one go: a fork bomb makes zombies as fast as
/// they are reaped, and the loops around this must still see their deadlines.
const REAP_BATCH: usize = 512;

/// Reaps the children that have ended (at most `REAP_BATCH`), without blocking.
fn reap_all() -> Vec<(Pid, WaitStatus)> {
    let mut reaped = Vec::new();
    while reaped.len() < REAP_BATCH {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::EINTR) => continue,
            Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
            Ok(st) => {
                if let Some(p) = st.pid() {
                    reaped.push((p, st));
                }
            }
        }
    }
    reaped
}

/// Whether any child is left (ended or not).
fn has_children() -> bool {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with WNOHANG|WNOWAIT only inspects and reaps nothing; it writes `info`, which outlives the call.
    let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    !(r < 0 && Errno::last() == Errno::ECHILD)
}

/// How long PID 1 keeps killing and reaping before going on without what is left.
const REAP_WAIT: Duration = Duration::from_secs(10);

fn kill_all(scope: KillScope, job: Pid, sig: Signal) {
    let _ = match scope {
        KillScope::Everything => kill(Pid::from_raw(-1), sig),
        KillScope::Group => kill(Pid::from_raw(-job.as_raw()), sig),
    };
}

/// After the script (or at its timeout): SIGTERM and `polite` for what is
/// left to exit, then SIGKILL, again and again while reaping (a fork bomb's
/// children born after one kill die at the next), until nothing is left or
/// `REAP_WAIT` has passed: what is stuck in D state is left behind, and
/// packing goes on. Returns how many processes other than the script were
/// reaped, and the script's own status if it was among them.
fn stop_everything(scope: KillScope, job: Pid, polite: Duration) -> (u32, Option<WaitStatus>) {
    let mut leftovers = 0;
    let mut job_status = None;
    let mut count = |reaped: Vec<(Pid, WaitStatus)>| {
        for (p, st) in reaped {
            if p == job {
                job_status = Some(st);
            } else {
                leftovers += 1;
            }
        }
    };
    if !polite.is_zero() {
        kill_all(scope, job, Signal::SIGTERM);
        let until = Instant::now() + polite;
        while Instant::now() < until && has_children() {
            count(reap_all());
            thread::sleep(Duration::from_millis(10));
        }
    }
    let until = Instant::now() + REAP_WAIT;
    loop {
        kill_all(scope, job, Signal::SIGKILL);
        count(reap_all());
        if !has_children() || Instant::now() >= until {
            return (leftovers, job_status);
        }
        thread::sleep(Duration::from_millis(10));
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
