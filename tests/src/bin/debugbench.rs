//! `construir-debugbench`: how long from a job's failure to a shell prompt
//! in its debug session, on a local queue a host is running.
//!
//! Usage: construir-debugbench debug|plain RUNNING HOST_ID FILE_NAME DONE_RESULT
//!
//! Both modes wait for the job's live console (`RUNNING/HOST_ID/.console.FILE_NAME`)
//! to show init's `job ended` line: the moment the job failed. `debug` then
//! attaches to the session as a terminal would (the terminal's size first),
//! waits for the shell's prompt, leaves with `exit`, and prints the seconds
//! from the failure to the prompt. `plain` prints the seconds from the
//! failure to DONE_RESULT's landing: the VM's own time, for reference.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const FAILED: &[u8] = b"construir-init: job ended";
const PROMPT: &[u8] = b"construir-debug:";
const LIMIT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, running, host_id, file_name, done] = args.as_slice() else {
        eprintln!("usage: construir-debugbench debug|plain RUNNING HOST_ID FILE_NAME DONE_RESULT");
        return ExitCode::from(2);
    };
    let running = PathBuf::from(running);
    let console = jobfile::layout::live_console(&running.join(host_id), file_name.as_ref());
    let Some(failed) = seen(&console) else {
        eprintln!("construir-debugbench: {} never showed the job's end", console.display());
        return ExitCode::FAILURE;
    };
    let took = match mode.as_str() {
        "plain" => wait_until(|| Path::new(done).exists()).map(|()| failed.elapsed()),
        "debug" => prompt(&running, file_name).map(|()| failed.elapsed()),
        _ => None,
    };
    match took {
        Some(t) => {
            println!("{:.4}", t.as_secs_f64());
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("construir-debugbench: {mode}: no prompt or result within {} s", LIMIT.as_secs());
            ExitCode::FAILURE
        }
    }
}

/// When `console` first held init's `job ended` line (looked at every millisecond).
fn seen(console: &Path) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < LIMIT {
        if std::fs::read(console).is_ok_and(|b| b.windows(FAILED.len()).any(|w| w == FAILED)) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

fn wait_until(mut done: impl FnMut() -> bool) -> Option<()> {
    let start = Instant::now();
    while start.elapsed() < LIMIT {
        if done() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Attaches as soon as the session is there; returns at the prompt, after asking the shell to exit.
fn prompt(running: &Path, file_name: &str) -> Option<()> {
    wait_until(|| jobfile::debug::read_session(running, file_name.as_ref()).is_some())?;
    let mut socket = jobfile::debug::connect(running, file_name.as_ref()).ok()?;
    socket.write_all(&jobfile::debug::Frame::Size { rows: 30, cols: 120 }.encode()).ok()?;
    socket.set_read_timeout(Some(LIMIT)).ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(PROMPT.len()).any(|w| w == PROMPT) {
        let n = socket.read(&mut buf).ok().filter(|&n| n > 0)?;
        got.extend_from_slice(&buf[..n]);
    }
    let _ = socket.write_all(&jobfile::debug::Frame::Data(b"exit\r".to_vec()).encode());
    let _ = socket.read_to_end(&mut got);
    Some(())
}
