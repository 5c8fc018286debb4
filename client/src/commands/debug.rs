//! `construir debug`: this terminal on the debug session of a failed job
//! (`jobfile::debug`), over the server's WebSocket.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jobfile::terminal::{self, Ended};
use wire::client::Api;

use crate::show::{checked_id, shown};

/// The words of a verdict whose job kept its VM up for a session.
pub const OPEN_IN_VERDICT: &str = "a debug session is open";

pub fn run(api: &Api, id: &str) -> Result<ExitCode> {
    let id = checked_id(id)?;
    let mut socket = wire::socket::Socket::open(api, &format!("jobs/{id}/debug"))
        .with_context(|| format!("cannot attach to job {id}"))?;
    eprintln!("construir: attached to the debug session of job {id}; type ~. to leave\r");
    let ended = terminal::attach(&mut socket).context("the session's connection failed")?;
    let said = match ended {
        Ended::Left => {
            socket.close("left");
            "left the session; its VM is powered off"
        }
        Ended::Closed => "the session ended",
        Ended::InputEnded => {
            socket.close("input ended");
            "input ended; the session ends"
        }
    };
    eprintln!("\r\nconstruir: {id}: {said}\r");
    Ok(ExitCode::SUCCESS)
}

/// For `wait`: when `job`'s verdict says its VM kept a session open, says
/// where and until when (the host offers it within moments of the result).
pub fn tell_open(api: &Api, id: &str, job: &wire::Job, verdict: &str) {
    if !verdict.contains(OPEN_IN_VERDICT) {
        return;
    }
    let asked = Instant::now();
    let mut job = job.clone();
    loop {
        if let Some(s) = &job.debug {
            let state = if s.attached { "attached" } else { "waiting for you" };
            eprintln!(
                "construir: {id}: a debug session is open on host {} ({state}): `construir debug {id}` before {}; it ends by {} (`construir cancel {id}` ends it now)",
                shown(&s.host),
                shown(&s.attach_by),
                shown(&s.ends_by)
            );
            return;
        }
        if asked.elapsed() > Duration::from_secs(10) {
            eprintln!("construir: {id}: its debug session has already ended");
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
        match super::job(api, id) {
            Ok(j) => job = j,
            Err(_) => return,
        }
    }
}
