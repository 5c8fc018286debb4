//! `construir-host run`: watch the queue, claim jobs as workers come free,
//! refuse bad input, recover after a crash, stop cleanly on a signal.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::image::Image;
use crate::limits::Limits;
use crate::metrics;
use crate::pending::{Pending, Refusal};
use crate::queue::Ending;
use crate::queue::{self, Dirs, Rules};
use crate::{lending, worker};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub dirs: Dirs,
    pub once: bool,
    pub workers: usize,
    pub limits: Limits,
    pub rescan: Duration,
    pub rules: Rules,
    /// A job whose host died this many times while running it goes to failed/.
    pub max_attempts: u32,
    /// After SIGTERM, how long running jobs may go on before they are stopped and requeued.
    pub stop_timeout: Duration,
    /// Where to write Prometheus metrics (node_exporter's textfile collector).
    pub metrics_file: Option<PathBuf>,
}

/// How often the metrics file is rewritten.
const METRICS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub done: u64,
    pub failed: u64,
    pub refused: u64,
    pub requeued: u64,
}

pub fn run(opts: &RunOptions, stop: Arc<AtomicBool>) -> Result<Summary> {
    let dirs = &opts.dirs;
    dirs.create_all()?;
    let mut summary = Summary::default();
    // Before anything else in running/<host-id>/: no second host of this id may recover our claims.
    let info = queue::HostInfo {
        pid: std::process::id(),
        started: jobfile::units::rfc3339(std::time::SystemTime::now()),
        workers: opts.workers,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        stopped: None,
    };
    let held = queue::hold_host(dirs, &info)?;
    if opts.metrics_file.is_some() {
        metrics::init(&opts.limits.host_id);
    }
    let mut metrics_written: Option<Instant> = None;
    queue::recover(dirs, &opts.limits.host_id, opts.max_attempts, |name, ending| {
        tally(dirs, &mut summary, name, ending)
    })?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).context("cannot set up inotify")?;
    let events = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE;
    inotify.add_watch(&dirs.queue, events).with_context(|| format!("cannot watch {}", dirs.queue.display()))?;
    log::info!(
        "watching {} with {} worker(s), {} acceleration, timeout {} s{}",
        dirs.queue.display(),
        opts.workers,
        opts.limits.accel.name(),
        opts.limits.timeout.as_secs(),
        if opts.once { ", until the queue is empty" } else { "" }
    );

    // Workers see `kill`, set only once the stop bound has passed.
    let kill = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(OsString, std::io::Result<Ending>)>();
    // Each running job, with the flag that stops it when its submitter cancels it.
    let mut running: HashMap<OsString, Arc<AtomicBool>> = HashMap::new();
    let mut pending = Pending::new(opts.rules);
    let mut refused: Vec<Refusal> = Vec::new();
    // The watch is set before the first scan: nothing that arrives in between is missed.
    let mut rescan_due = true;
    let mut last_scan = Instant::now();
    let mut stopping: Option<Instant> = None;
    // The server's cleared caches, as last seen: when they change, this host frees its copies.
    let generations_file = jobfile::layout::CacheTree::of(&dirs.running).generations_file();
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut generations_seen = modified(&generations_file);
    lending::report(dirs, &opts.limits);
    loop {
        if opts.limits.caches.is_some() && modified(&generations_file) != generations_seen {
            generations_seen = modified(&generations_file);
            lending::report(dirs, &opts.limits);
        }
        if stop.load(Ordering::Relaxed) && stopping.is_none() {
            stopping = Some(Instant::now());
            log::info!(
                "stopping: no more claims; {} running job(s) may finish within {} s, then go back to the queue",
                running.len(),
                opts.stop_timeout.as_secs()
            );
        }
        if stopping.is_some_and(|t| t.elapsed() >= opts.stop_timeout) && !kill.swap(true, Ordering::Relaxed) {
            log::info!("stop bound reached: stopping {} VM(s)", running.len());
        }
        if rescan_due || last_scan.elapsed() >= opts.rescan {
            rescan_due = false;
            last_scan = Instant::now();
            pending
                .rescan(&dirs.queue, &mut refused)
                .with_context(|| format!("cannot read {}", dirs.queue.display()))?;
        }
        let next_settle = pending.settle(&dirs.queue, &mut refused);
        while stopping.is_none() && running.len() < opts.workers {
            // A verified rebuild's run whose other run this host took is left, for a while, to another host.
            let now = std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs());
            let keeps_off =
                |name: &std::ffi::OsStr| jobfile::rebuild::keeps_off(&dirs.running, name, &opts.limits.host_id, now);
            let Some(ready) = pending.next_ready(&dirs.queue, &mut refused, keeps_off) else { break };
            let job = ready.job;
            if let Err(e) = Image::load(&dirs.images, job.image()) {
                let reason = format!("unknown image i{}: {}", job.image(), jobfile::error_chain(&e));
                refused.push(Refusal { file_name: ready.file_name, kind: "unknown_image", reason });
                continue;
            }
            match queue::claim(dirs, &ready.file_name) {
                Ok(true) => {}
                Ok(false) => continue, // another host took it
                Err(e) => {
                    log::error!("job {}: cannot claim: {e}; looking again at the next rescan", job.input_file_name());
                    continue;
                }
            }
            log::info!("job {}: claimed", job.input_file_name());
            if jobfile::rebuild::terms_file(&dirs.running, &ready.file_name).exists() {
                // Before it runs: the other run, still waiting, is left to another host.
                if let Err(e) = jobfile::rebuild::write_ran_on(&dirs.running, &ready.file_name, &opts.limits.host_id) {
                    log::warn!("job {}: cannot note that this host runs it: {e}", job.input_file_name());
                }
            }
            let file_name = ready.file_name;
            let cancel = Arc::new(AtomicBool::new(false));
            running.insert(file_name.clone(), cancel.clone());
            let (dirs, limits, tx, kill, scanned) =
                (dirs.clone(), opts.limits.clone(), tx.clone(), kill.clone(), ready.scanned);
            thread::spawn(move || {
                let ending = worker::run(&dirs, &limits, &file_name, &job, &scanned, &kill, &cancel);
                let _ = tx.send((file_name, ending));
            });
        }
        for r in refused.drain(..) {
            metrics::refused(r.kind);
            refuse(dirs, &opts.limits.host_id, &r.file_name, &r.reason, &mut summary);
        }
        let ending = running.is_empty() && (stopping.is_some() || (opts.once && pending.is_empty()));
        if let Some(path) = &opts.metrics_file {
            if ending || metrics_written.is_none_or(|t| t.elapsed() >= METRICS_EVERY) {
                metrics::set_queue_depth(pending.len());
                metrics::set_running(running.len());
                if let Err(e) = metrics::write_file(path) {
                    log::warn!("cannot write metrics to {}: {e}", path.display());
                }
                metrics_written = Some(Instant::now());
            }
        }
        if ending {
            break;
        }
        // Sleep until the queue changes, a job ends, an entry may have settled, or it is time to rescan.
        let wait = next_settle.unwrap_or(Duration::MAX).min(opts.rescan.saturating_sub(last_scan.elapsed()));
        let wait_ms = wait.as_millis().clamp(1, if running.is_empty() { 1000 } else { 100 }) as u16;
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(wait_ms));
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: read the directory again.
                    rescan_due = true;
                    continue;
                }
                let Some(name) = event.name else { continue };
                if event.mask.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_DELETE) {
                    pending.gone(&name);
                } else if event.mask.contains(AddWatchFlags::IN_MOVED_TO) {
                    pending.arrived(&dirs.queue, &name, true, &mut refused);
                } else if event.mask.contains(AddWatchFlags::IN_CREATE) {
                    pending.arrived(&dirs.queue, &name, false, &mut refused);
                }
                // IN_CLOSE_WRITE and IN_ATTRIB wake the loop; settle() sees the change.
            }
        }
        for (file_name, cancel) in &running {
            if !cancel.load(Ordering::Relaxed) && queue::cancel_request(dirs, file_name).exists() {
                log::info!(
                    "job {}: cancel requested; stopping its VM",
                    jobfile::sanitize(file_name.as_encoded_bytes())
                );
                cancel.store(true, Ordering::Relaxed);
            }
        }
        while let Ok((file_name, ending)) = rx.try_recv() {
            running.remove(&file_name);
            let _ = fs::remove_file(queue::cancel_request(dirs, &file_name));
            tally(dirs, &mut summary, &file_name, ending);
        }
    }
    let stopped = queue::HostInfo { stopped: Some(jobfile::units::rfc3339(std::time::SystemTime::now())), ..info };
    if let Err(e) = queue::write_host_info(&held, &stopped) {
        log::warn!("cannot note the stop in {}: {e}", dirs.host_dir.join(queue::HOST_FILE).display());
    }
    log::info!(
        "finished: {} done, {} failed, {} refused, {} requeued",
        summary.done,
        summary.failed,
        summary.refused,
        summary.requeued
    );
    Ok(summary)
}

fn refuse(dirs: &Dirs, host_id: &str, file_name: &OsStr, reason: &str, summary: &mut Summary) {
    let label = jobfile::sanitize(file_name.as_encoded_bytes());
    match queue::refuse(dirs, host_id, file_name, reason) {
        Ok(path) => {
            summary.refused += 1;
            log::warn!("job {label}: refused: {reason} -> {}", path.display());
        }
        Err(e) => log::error!("job {label}: cannot move to {}: {e}", dirs.failed.display()),
    }
}

/// Counts and logs how a job ended.
fn tally(dirs: &Dirs, summary: &mut Summary, file_name: &OsStr, ending: std::io::Result<Ending>) {
    let label = jobfile::sanitize(file_name.as_encoded_bytes());
    match ending {
        Ok(Ending::Done { path, verdict }) => {
            summary.done += 1;
            queue::forget_counters(dirs, file_name);
            log::info!("job {label}: done: {verdict} -> {}", path.display());
        }
        Ok(Ending::Failed { path, reason }) => {
            summary.failed += 1;
            queue::forget_counters(dirs, file_name);
            log::warn!("job {label}: failed: {reason} -> {}", path.display());
        }
        Ok(Ending::Requeued) => summary.requeued += 1,
        Err(e) => {
            log::error!("job {label}: {e}; it stays in {} and is retried at the next start", dirs.host_dir.display())
        }
    }
}

/// This machine's host id: its hostname, reduced to safe characters.
pub fn default_host_id() -> String {
    let name = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let id: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    if id.is_empty() || id.starts_with('.') || id.starts_with('-') {
        "host".to_owned()
    } else {
        id
    }
}

/// Default directories: siblings of the queue.
pub use jobfile::layout::sibling;
