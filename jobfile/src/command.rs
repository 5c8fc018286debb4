//! Running the tools construir drives (debootstrap, chroot, mkfs, qemu-img, apt):
//! a deadline, the child killed on drop, and the end of its output in the error.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Lines of output kept for an error message.
const TAIL_LINES: usize = 30;

#[derive(Debug, Error)]
pub enum CommandError {
    #[error("cannot start {program} (is it installed?)")]
    Spawn { program: String, source: std::io::Error },
    #[error("{what} failed ({status}); its last output:\n{tail}")]
    Failed { what: String, status: std::process::ExitStatus, tail: String },
    #[error("{what} did not finish within {} s; its last output:\n{tail}", limit.as_secs())]
    Timeout { what: String, limit: Duration, tail: String },
    /// The caller's `halt` said to give up (the host is stopping, the job was cancelled).
    #[error("{what} was stopped before it finished")]
    Halted { what: String },
}

/// A child that is killed and reaped when dropped, however `run` ends
/// (a timeout, an error, a panic in `progress`), unless it was reaped first.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `cmd` to completion within `limit`. Returns all of its stdout;
/// `progress` sees every line of stdout and stderr as it comes.
pub fn run(cmd: &mut Command, what: &str, limit: Duration, progress: impl FnMut(&str)) -> Result<String, CommandError> {
    run_until(cmd, what, limit, progress, &|| false)
}

/// `run`, and the child is killed as soon as `halt` says so (it is asked
/// about ten times a second): [`CommandError::Halted`].
pub fn run_until(
    cmd: &mut Command,
    what: &str,
    limit: Duration,
    mut progress: impl FnMut(&str),
    halt: &dyn Fn() -> bool,
) -> Result<String, CommandError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut guard = Guard(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CommandError::Spawn { program, source })?,
    );
    let child = &mut guard.0;
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let tx2 = tx.clone();
    thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).for_each(|l| drop(tx.send((true, l)))));
    thread::spawn(move || BufReader::new(err).lines().map_while(Result::ok).for_each(|l| drop(tx2.send((false, l)))));

    let start = Instant::now();
    let mut stdout = String::new();
    let mut tail: VecDeque<String> = VecDeque::new();
    let tail_text = |tail: &VecDeque<String>| tail.iter().cloned().collect::<Vec<_>>().join("\n");
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((is_stdout, line)) => {
                progress(&line);
                if is_stdout {
                    stdout.push_str(&line);
                    stdout.push('\n');
                }
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if halt() {
            return Err(CommandError::Halted { what: what.to_owned() });
        }
        if start.elapsed() > limit {
            return Err(CommandError::Timeout { what: what.to_owned(), limit, tail: tail_text(&tail) });
        }
    }
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|source| CommandError::Spawn { program: what.to_owned(), source })? {
            break st;
        }
        if halt() {
            return Err(CommandError::Halted { what: what.to_owned() });
        }
        if start.elapsed() > limit {
            return Err(CommandError::Timeout { what: what.to_owned(), limit, tail: tail_text(&tail) });
        }
        thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        return Err(CommandError::Failed { what: what.to_owned(), status, tail: tail_text(&tail) });
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_status_and_deadline() {
        let out = run(
            Command::new("sh").args(["-c", "echo one; echo two >&2; echo three"]),
            "test",
            Duration::from_secs(10),
            |_| {},
        )
        .expect("runs");
        assert_eq!(out, "one\nthree\n");
        match run(
            Command::new("sh").args(["-c", "echo why >&2; exit 4"]),
            "failing step",
            Duration::from_secs(10),
            |_| {},
        ) {
            Err(CommandError::Failed { what, tail, .. }) => {
                assert_eq!((what.as_str(), tail.as_str()), ("failing step", "why"))
            }
            other => panic!("{other:?}"),
        }
        let start = Instant::now();
        assert!(matches!(
            run(Command::new("sleep").arg("30"), "slow", Duration::from_millis(300), |_| {}),
            Err(CommandError::Timeout { .. })
        ));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(
            run(&mut Command::new("/nonexistent/tool"), "x", Duration::from_secs(1), |_| {}),
            Err(CommandError::Spawn { .. })
        ));
    }

    #[test]
    fn a_halt_kills_the_child_at_once_and_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
        let asked = std::cell::Cell::new(0);
        let start = Instant::now();
        let halt = || {
            asked.set(asked.get() + 1);
            pidfile.exists()
        };
        match run_until(
            Command::new("sh").args(["-c", &script]),
            "a long download",
            Duration::from_secs(30),
            |_| {},
            &halt,
        ) {
            Err(e @ CommandError::Halted { .. }) => {
                assert_eq!(e.to_string(), "a long download was stopped before it finished")
            }
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
        assert!(asked.get() >= 1);
        let pid: i32 = std::fs::read_to_string(&pidfile).expect("pid").trim().parse().expect("a pid");
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "process {pid} outlived the halt"
        );
        // Never asked to halt: it runs to its end.
        let out = run_until(Command::new("echo").arg("done"), "quick", Duration::from_secs(10), |_| {}, &|| false);
        assert_eq!(out.expect("runs"), "done\n");
    }

    #[test]
    fn a_child_is_killed_when_run_ends_early_even_by_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!("echo $$ > {}; echo go; exec sleep 60", pidfile.display());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(Command::new("sh").args(["-c", &script]), "panicky", Duration::from_secs(30), |line| {
                assert_ne!(line, "go", "the caller's progress callback gives up");
            })
        }));
        assert!(outcome.is_err(), "the callback panicked");
        let pid: i32 = std::fs::read_to_string(&pidfile).expect("pid").trim().parse().expect("a pid");
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err();
        assert!(gone, "process {pid} outlived run()");
    }
}
