//! `construir-host run`: watch the queue, claim jobs as workers come free,
//! refuse bad input, recover after a crash, stop cleanly on a signal.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jobfile::image::ImageManifest;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::queue::{self, Candidate, Dirs};
use crate::worker::{self, Ending, Limits};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub dirs: Dirs,
    pub once: bool,
    pub workers: usize,
    pub limits: Limits,
    pub rescan: Duration,
    pub min_size: u64,
    pub max_size: u64,
}

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
    recover(dirs, &opts.limits.host_id)?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).context("cannot set up inotify")?;
    inotify
        .add_watch(
            &dirs.queue,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_ATTRIB,
        )
        .with_context(|| format!("cannot watch {}", dirs.queue.display()))?;
    log::info!(
        "watching {} with {} worker(s), {} acceleration, timeout {} s{}",
        dirs.queue.display(),
        opts.workers,
        opts.limits.accel.name(),
        opts.limits.timeout.as_secs(),
        if opts.once { ", until the queue is empty" } else { "" }
    );

    let (tx, rx) = mpsc::channel::<(OsString, std::io::Result<Ending>)>();
    let mut running: HashSet<OsString> = HashSet::new();
    let mut summary = Summary::default();
    let mut dirty = true;
    let mut last_scan = Instant::now();
    let mut stopping = false;
    loop {
        if stop.load(Ordering::Relaxed) && !stopping {
            stopping = true;
            log::info!("stopping: no more claims; {} running job(s) go back to the queue", running.len());
        }
        let mut waiting = 0;
        if !stopping && (dirty || last_scan.elapsed() >= opts.rescan) {
            dirty = false;
            last_scan = Instant::now();
            let found = queue::scan(&dirs.queue, opts.min_size, opts.max_size)
                .with_context(|| format!("cannot read {}", dirs.queue.display()))?;
            for candidate in found {
                match candidate {
                    Candidate::Refuse { file_name, reason } => refuse(dirs, &file_name, &reason, &mut summary),
                    Candidate::Job { file_name, job, .. } => {
                        if let Err(e) = ImageManifest::load(&dirs.images.join(format!("i{}", job.image()))) {
                            let reason = format!("unknown image i{}: {}", job.image(), crate::worker::chain(&e));
                            refuse(dirs, &file_name, &reason, &mut summary);
                            continue;
                        }
                        if running.len() >= opts.workers {
                            waiting += 1;
                            continue;
                        }
                        match queue::claim(dirs, &file_name) {
                            Ok(true) => {}
                            Ok(false) => continue, // another host took it
                            Err(e) => {
                                log::error!("job {}: cannot claim: {e}", job.input_file_name());
                                continue;
                            }
                        }
                        log::info!("job {}: claimed", job.input_file_name());
                        running.insert(file_name.clone());
                        let (dirs, limits, tx, stop) = (dirs.clone(), opts.limits.clone(), tx.clone(), stop.clone());
                        thread::spawn(move || {
                            let ending = worker::run(&dirs, &limits, &file_name, &job, &stop);
                            let _ = tx.send((file_name, ending));
                        });
                    }
                }
            }
        }
        if running.is_empty() && (stopping || (opts.once && waiting == 0 && !dirty)) {
            break;
        }
        // Sleep until the queue changes, a job ends, or it is time to rescan.
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(200u16));
        if let Ok(events) = inotify.read_events() {
            dirty |= !events.is_empty();
        }
        while let Ok((file_name, ending)) = rx.try_recv() {
            running.remove(&file_name);
            dirty = true;
            let label = file_name.to_string_lossy();
            match ending {
                Ok(Ending::Done { path, verdict }) => {
                    summary.done += 1;
                    log::info!("job {label}: done: {verdict} -> {}", path.display());
                }
                Ok(Ending::Failed { path, reason }) => {
                    summary.failed += 1;
                    log::warn!("job {label}: failed: {reason} -> {}", path.display());
                }
                Ok(Ending::Requeued) => summary.requeued += 1,
                Err(e) => log::error!(
                    "job {label}: {e}; it stays in {} and is retried at the next start",
                    dirs.running.display()
                ),
            }
        }
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

fn refuse(dirs: &Dirs, file_name: &OsString, reason: &str, summary: &mut Summary) {
    let label = jobfile::escape(file_name.as_encoded_bytes());
    match queue::fail(dirs, &dirs.queue.join(file_name), reason, None) {
        Ok(path) => {
            summary.refused += 1;
            log::warn!("job {label}: refused: {reason} -> {}", path.display());
        }
        Err(e) => log::error!("job {label}: cannot move to {}: {e}", dirs.failed.display()),
    }
}

/// Jobs this host had claimed when it last stopped go back to the queue;
/// working copies it left are removed.
fn recover(dirs: &Dirs, host_id: &str) -> Result<()> {
    for entry in fs::read_dir(&dirs.running).with_context(|| format!("cannot read {}", dirs.running.display()))? {
        let name = entry?.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let label = jobfile::escape(name.as_encoded_bytes());
        match queue::requeue(dirs, &name) {
            Ok(()) => log::info!("job {label}: unfinished at the last stop; back in the queue"),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let reason = "a job of the same name was queued again while this one was unfinished";
                let _ = queue::fail(dirs, &dirs.running.join(&name), reason, None);
                log::warn!("job {label}: {reason}; moved to {}", dirs.failed.display());
            }
            Err(e) => return Err(e).with_context(|| format!("cannot requeue {label}")),
        }
    }
    let prefix = format!("{host_id}.");
    for entry in fs::read_dir(&dirs.work)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// This machine's host id: its hostname, reduced to safe characters.
pub fn default_host_id() -> String {
    let name = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let id: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    if id.is_empty() || id.starts_with('.') {
        "host".to_owned()
    } else {
        id
    }
}

/// Default directories: siblings of the queue.
pub fn sibling(queue: &Path, name: &str) -> std::path::PathBuf {
    let abs = std::path::absolute(queue).unwrap_or_else(|_| queue.to_owned());
    abs.parent().unwrap_or(Path::new("/")).join(name)
}

/// The kernel of the first usable image, for the KVM probe.
pub fn any_kernel(images: &Path) -> Option<std::path::PathBuf> {
    let mut dirs: Vec<_> = fs::read_dir(images).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    dirs.iter().find_map(|d| ImageManifest::load(d).ok().map(|m| d.join(m.kernel)))
}
