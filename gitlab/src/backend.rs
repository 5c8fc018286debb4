//! Where construir-gitlab hands its jobs: a construir server as one account
//! (`server`), or a local queue a construir-host runs (`queue`). Both are
//! followed the same way (`follow`); their calls block, so the async side
//! runs them on tokio's blocking threads.

pub mod queue;
pub mod server;

use std::path::{Path, PathBuf};

use crate::spec::Spec;

/// Where a construir job is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Not yet running (what the backend says of it).
    Waiting(String),
    Running(String),
    /// Ended with a result: whether it is ok (a verified rebuild: and
    /// reproducible), and the verdict to show.
    Done {
        ok: bool,
        verdict: String,
        debug: Option<String>,
    },
    /// Ended without a result, for a reason on construir's side (refused,
    /// cancelled, an image the hosts do not have...).
    Failed(String),
}

/// A result fetched and checked against its signed provenance (beside it).
#[derive(Debug, Clone)]
pub struct Fetched {
    pub result: PathBuf,
    pub provenance: PathBuf,
    /// What the check found: who signed it, over what.
    pub verified: String,
}

/// One way to run construir jobs. `handle` is what `submit` returned.
pub trait Backend: Send + Sync {
    /// One line naming it, for the log and each job's trace.
    fn describe(&self) -> String;
    /// Hands the job file over.
    fn submit(&self, file: &Path, spec: &Spec) -> Result<String, String>;
    /// The job called `name` on `image` handed over earlier, if there is one
    /// (a restarted runner's way to never submit a job twice).
    fn find(&self, name: &str, image: &str) -> Result<Option<String>, String>;
    fn place(&self, handle: &str) -> Result<Place, String>;
    /// The job's console from byte `from` on: what it has so far.
    fn console(&self, handle: &str, from: u64) -> Result<Vec<u8>, String>;
    /// Stops it; what the backend said.
    fn cancel(&self, handle: &str) -> Result<String, String>;
    /// Its result into `into`, checked against its provenance.
    fn fetch(&self, handle: &str, into: &Path) -> Result<Fetched, String>;
    /// The command that opens its debug session, when it has one.
    fn debug_command(&self, handle: &str) -> String;
}

/// `<name>` of a job file `<name>_i<image>.tar.xz`.
pub fn file_job_name(file: &Path) -> Result<String, String> {
    let file_name = file.file_name().and_then(|n| n.to_str()).ok_or("the job file has no name")?;
    let job = jobfile::JobName::parse_input(file_name).map_err(|e| format!("{file_name}: {e}"))?;
    Ok(job.name().to_owned())
}
