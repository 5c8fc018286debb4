//! A job a host has claimed (`running/<host-id>/<file>`), and the ways it
//! ends before a result: in `failed/` with a reason, or back in the queue
//! when the host is stopping.

use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use jobfile::JobName;

use crate::limits::Limits;
use crate::metrics;
use crate::queue::{self, Dirs, Ending, Scanned};

/// A claimed job, as the scan saw it, and what its run may be stopped by.
pub struct Claim<'a> {
    pub dirs: &'a Dirs,
    pub limits: &'a Limits,
    pub file_name: &'a OsStr,
    pub job: &'a JobName,
    pub scanned: &'a Scanned,
    /// The host is stopping.
    pub stop: &'a Arc<AtomicBool>,
    /// Its submitter asked for it to be cancelled.
    pub cancel: &'a AtomicBool,
}

impl Claim<'_> {
    /// The job's input name, for the log.
    pub fn label(&self) -> String {
        self.job.input_file_name()
    }

    /// The claimed file.
    pub fn path(&self) -> PathBuf {
        self.dirs.host_dir.join(self.file_name)
    }

    /// Whether the host is stopping or the job was cancelled.
    pub fn halted(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.cancel.load(Ordering::Relaxed)
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Sends the claimed job to `failed/` without a result, with `reason`
    /// and the console so far; `metric` is the word metrics count it under.
    pub fn fail(&self, metric: &str, reason: &str, log: Option<&[u8]>) -> io::Result<Ending> {
        let path = queue::fail(self.dirs, &self.path(), reason, log)?;
        metrics::job_finished(metric, self.job.image());
        Ok(Ending::Failed { path, reason: reason.to_owned() })
    }

    /// Puts the claimed job back in the queue (the host is stopping, or its
    /// VM could not be made), saying `why` in the log.
    pub fn requeue(&self, why: &str) -> io::Result<Ending> {
        queue::requeue(self.dirs, self.file_name)?;
        log::info!("job {}: {why}; back in the queue", self.label());
        Ok(Ending::Requeued)
    }
}
