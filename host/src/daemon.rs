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

/// Runs the host: recovers what a crash left, then claims and runs jobs as
/// workers come free until `stop` (or, with `once`, an empty queue).
pub fn run(opts: &RunOptions, stop: Arc<AtomicBool>) -> Result<Summary> {
    let dirs = &opts.dirs;
    dirs.create_all()?;
    // Before anything else in running/<host-id>/: no second host of this id may recover our claims.
    let info = queue::HostInfo {
        pid: std::process::id(),
        started: jobfile::units::rfc3339(std::time::SystemTime::now()),
        workers: opts.workers,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        stopped: None,
    };
    let held = queue::hold_host(dirs, &info)?;
    let summary = run_held(opts, stop)?;
    let stopped = queue::HostInfo { stopped: Some(jobfile::units::rfc3339(std::time::SystemTime::now())), ..info };
    if let Err(e) = queue::write_host_info(&held, &stopped) {
        log::warn!("cannot note the stop in {}: {e}", dirs.host_dir.join(queue::HOST_FILE).display());
    }
    Ok(summary)
}

/// `run`, once the host holds its directory.
fn run_held(opts: &RunOptions, stop: Arc<AtomicBool>) -> Result<Summary> {
    let dirs = &opts.dirs;
    if opts.metrics_file.is_some() {
        metrics::init(&opts.limits.host_id);
    }
    let mut d = Daemon::new(opts, stop);
    // Sessions this host's last run left open: their VMs died with it.
    for stale in crate::debug::forget_stale(&dirs.running, &opts.limits.host_id) {
        log::warn!("job {}: its debug session ended when this host last stopped", stale.to_string_lossy());
    }
    queue::recover(dirs, &opts.limits.host_id, opts.max_attempts, |name, ending| {
        tally(dirs, &mut d.summary, name, ending)
    })?;
    let inotify = watch(&dirs.queue)?;
    log::info!(
        "watching {} with {} worker(s), guests {}, timeout {} s{}",
        dirs.queue.display(),
        opts.workers,
        opts.limits.emulators.describe(),
        opts.limits.timeout.as_secs(),
        if opts.once { ", until the queue is empty" } else { "" }
    );
    lending::report(dirs, &opts.limits);
    loop {
        d.notice_generations();
        d.notice_stop();
        if d.rescan_due || d.last_scan.elapsed() >= opts.rescan {
            d.rescan_due = false;
            d.last_scan = Instant::now();
            d.pending
                .rescan(&dirs.queue, &mut d.refused)
                .with_context(|| format!("cannot read {}", dirs.queue.display()))?;
        }
        let next_settle = d.pending.settle(&dirs.queue, &mut d.refused);
        d.start_ready();
        for r in d.refused.drain(..) {
            metrics::refused(r.kind);
            refuse(dirs, &opts.limits.host_id, &r.file_name, &r.reason, &mut d.summary);
        }
        let ending = d.running.is_empty() && (d.stopping.is_some() || (opts.once && d.pending.is_empty()));
        d.write_metrics(ending);
        if ending {
            break;
        }
        d.wait(&inotify, next_settle);
        d.notice_cancels();
        d.collect_endings();
    }
    let Summary { done, failed, refused, requeued } = &d.summary;
    log::info!("finished: {done} done, {failed} failed, {refused} refused, {requeued} requeued");
    Ok(d.summary)
}

/// Watches `queue` for what arrives, leaves and changes in it.
fn watch(queue: &std::path::Path) -> Result<Inotify> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).context("cannot set up inotify")?;
    let events = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE;
    inotify.add_watch(queue, events).with_context(|| format!("cannot watch {}", queue.display()))?;
    Ok(inotify)
}

/// The daemon's state between two turns of its loop.
struct Daemon<'a> {
    opts: &'a RunOptions,
    stop: Arc<AtomicBool>,
    summary: Summary,
    /// Workers see `kill`, set only once the stop bound has passed.
    kill: Arc<AtomicBool>,
    tx: mpsc::Sender<(OsString, std::io::Result<Ending>)>,
    rx: mpsc::Receiver<(OsString, std::io::Result<Ending>)>,
    /// Each running job, with the flag that stops it when its submitter cancels it.
    running: HashMap<OsString, Arc<AtomicBool>>,
    pending: Pending,
    refused: Vec<Refusal>,
    /// The watch is set before the first scan: nothing that arrives in between is missed.
    rescan_due: bool,
    last_scan: Instant,
    stopping: Option<Instant>,
    metrics_written: Option<Instant>,
    /// The server's cleared caches, as last seen: when they change, this host frees its copies.
    generations_file: PathBuf,
    generations_seen: Option<std::time::SystemTime>,
}

fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl<'a> Daemon<'a> {
    fn new(opts: &'a RunOptions, stop: Arc<AtomicBool>) -> Daemon<'a> {
        let (tx, rx) = mpsc::channel();
        let generations_file = jobfile::layout::CacheTree::of(&opts.dirs.running).generations_file();
        Daemon {
            opts,
            stop,
            summary: Summary::default(),
            kill: Arc::new(AtomicBool::new(false)),
            tx,
            rx,
            running: HashMap::new(),
            pending: Pending::new(opts.rules),
            refused: Vec::new(),
            rescan_due: true,
            last_scan: Instant::now(),
            stopping: None,
            metrics_written: None,
            generations_seen: modified(&generations_file),
            generations_file,
        }
    }

    /// Frees the caches the server cleared since it last looked.
    fn notice_generations(&mut self) {
        if self.opts.limits.caches.is_some() && modified(&self.generations_file) != self.generations_seen {
            self.generations_seen = modified(&self.generations_file);
            lending::report(&self.opts.dirs, &self.opts.limits);
        }
    }

    /// On a stop: no more claims; past the stop bound, the running VMs are stopped.
    fn notice_stop(&mut self) {
        if self.stop.load(Ordering::Relaxed) && self.stopping.is_none() {
            self.stopping = Some(Instant::now());
            log::info!(
                "stopping: no more claims; {} running job(s) may finish within {} s, then go back to the queue",
                self.running.len(),
                self.opts.stop_timeout.as_secs()
            );
        }
        if self.stopping.is_some_and(|t| t.elapsed() >= self.opts.stop_timeout)
            && !self.kill.swap(true, Ordering::Relaxed)
        {
            log::info!("stop bound reached: stopping {} VM(s)", self.running.len());
        }
    }

    /// Claims ready jobs while workers are free, each run on a thread of its own.
    fn start_ready(&mut self) {
        let (dirs, host_id) = (&self.opts.dirs, &self.opts.limits.host_id);
        while self.stopping.is_none() && self.running.len() < self.opts.workers {
            // A verified rebuild's run whose other run this host took is left, for a while, to another host.
            let now = std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs());
            let keeps_off = |name: &OsStr| jobfile::rebuild::keeps_off(&dirs.running, name, host_id, now);
            let Some(ready) = self.pending.next_ready(&dirs.queue, &mut self.refused, keeps_off) else { break };
            let job = ready.job;
            if let Err(e) = Image::load(&dirs.images, job.image()) {
                let reason = format!("unknown image i{}: {}", job.image(), jobfile::error_chain(&e));
                self.refused.push(Refusal { file_name: ready.file_name, kind: "unknown_image", reason });
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
                if let Err(e) = jobfile::rebuild::write_ran_on(&dirs.running, &ready.file_name, host_id) {
                    log::warn!("job {}: cannot note that this host runs it: {e}", job.input_file_name());
                }
            }
            let file_name = ready.file_name;
            let cancel = Arc::new(AtomicBool::new(false));
            self.running.insert(file_name.clone(), cancel.clone());
            let (dirs, limits, tx, kill, scanned) =
                (dirs.clone(), self.opts.limits.clone(), self.tx.clone(), self.kill.clone(), ready.scanned);
            thread::spawn(move || {
                let ending = worker::run(&dirs, &limits, &file_name, &job, &scanned, &kill, &cancel);
                let _ = tx.send((file_name, ending));
            });
        }
    }

    /// Rewrites the metrics file every `METRICS_EVERY`, and at the end.
    fn write_metrics(&mut self, ending: bool) {
        let Some(path) = &self.opts.metrics_file else { return };
        if ending || self.metrics_written.is_none_or(|t| t.elapsed() >= METRICS_EVERY) {
            metrics::set_queue_depth(self.pending.len());
            metrics::set_running(self.running.len());
            if let Err(e) = metrics::write_file(path) {
                log::warn!("cannot write metrics to {}: {e}", path.display());
            }
            self.metrics_written = Some(Instant::now());
        }
    }

    /// Sleeps until the queue changes, a job ends, an entry may have settled,
    /// or it is time to rescan; notes what arrived and left.
    fn wait(&mut self, inotify: &Inotify, next_settle: Option<Duration>) {
        let queue = &self.opts.dirs.queue;
        let wait = next_settle.unwrap_or(Duration::MAX).min(self.opts.rescan.saturating_sub(self.last_scan.elapsed()));
        let wait_ms = wait.as_millis().clamp(1, if self.running.is_empty() { 1000 } else { 100 }) as u16;
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(wait_ms));
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: read the directory again.
                    self.rescan_due = true;
                    continue;
                }
                let Some(name) = event.name else { continue };
                if event.mask.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_DELETE) {
                    self.pending.gone(&name);
                } else if event.mask.contains(AddWatchFlags::IN_MOVED_TO) {
                    self.pending.arrived(queue, &name, true, &mut self.refused);
                } else if event.mask.contains(AddWatchFlags::IN_CREATE) {
                    self.pending.arrived(queue, &name, false, &mut self.refused);
                }
                // IN_CLOSE_WRITE and IN_ATTRIB wake the loop; settle() sees the change.
            }
        }
    }

    /// Stops the VM of each running job whose cancel was asked for.
    fn notice_cancels(&self) {
        for (file_name, cancel) in &self.running {
            if !cancel.load(Ordering::Relaxed) && queue::cancel_request(&self.opts.dirs, file_name).exists() {
                log::info!(
                    "job {}: cancel requested; stopping its VM",
                    jobfile::sanitize(file_name.as_encoded_bytes())
                );
                cancel.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Counts the jobs whose workers ended.
    fn collect_endings(&mut self) {
        while let Ok((file_name, ending)) = self.rx.try_recv() {
            self.running.remove(&file_name);
            let _ = fs::remove_file(queue::cancel_request(&self.opts.dirs, &file_name));
            tally(&self.opts.dirs, &mut self.summary, &file_name, ending);
        }
    }
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
