//! The jobs this runner has in hand, on disk: one file per GitLab job in
//! `<state>/journal/`, written (synced, 0600: it holds the job's token)
//! before its construir job is submitted and again once it is, removed when
//! the job is over. A runner that stopped without finishing its jobs ends
//! each on its next start (`recover`): it finds the construir job (by its
//! name when the stop came before the handle was written), never submits
//! it again, follows it to its end and tells GitLab how it ended.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::api::{finish_job, Ending};
use crate::backend::Backend;
use crate::follow::{follow, Ended};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub gitlab_job: u64,
    /// The job's token, which lets this runner finish the job after a restart.
    pub token: String,
    /// The construir job's name and image (how it is found again).
    pub name: String,
    pub image: String,
    /// What the backend returned when it took the job.
    pub handle: Option<String>,
    /// For after_script's construir job: whether the script's ended ok,
    /// which is the CI job's outcome (GitLab ignores after_script's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_ok: Option<bool>,
}

pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(dir: PathBuf) -> std::io::Result<Journal> {
        fs::create_dir_all(&dir)?;
        Ok(Journal { dir })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `entry` whole: a temporary file, synced, renamed over the old one.
    pub fn write(&self, entry: &Entry) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{}.tmp", entry.gitlab_job));
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(entry.gitlab_job))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    pub fn remove(&self, id: u64) {
        let _ = fs::remove_file(self.path(id));
    }

    /// Every entry left, and the files that could not be read.
    pub fn entries(&self) -> (Vec<Entry>, Vec<String>) {
        let (mut entries, mut bad) = (Vec::new(), Vec::new());
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") {
                continue;
            }
            match fs::read(e.path()).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                Some(entry) => entries.push(entry),
                None => bad.push(name),
            }
        }
        entries.sort_by_key(|e: &Entry| e.gitlab_job);
        (entries, bad)
    }
}

/// How a job found in the journal ends in GitLab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub success: bool,
    /// GitLab's `failure_reason` for a failure.
    pub failure_reason: &'static str,
    pub line: String,
}

/// Ends `entry`: its construir job followed to its end (found by name when
/// it has no handle; never submitted again), then GitLab told.
pub async fn recover(entry: Entry, backend: Arc<dyn Backend>, gitlab: url::Url, journal: Arc<Journal>) {
    let report = recovered(&entry, &backend).await;
    eprintln!("construir-gitlab: GitLab job {} (found after a restart): {}", entry.gitlab_job, report.line);
    let e = entry.clone();
    let told = tokio::task::spawn_blocking(move || {
        let end = Ending { success: report.success, failure_reason: report.failure_reason, line: &report.line };
        finish_job(&gitlab, e.gitlab_job, &e.token, &end)
    })
    .await;
    match told {
        Ok(Ok(())) => journal.remove(entry.gitlab_job),
        Ok(Err(why)) => {
            eprintln!("construir-gitlab: GitLab job {}: cannot tell GitLab: {why}", entry.gitlab_job);
            // GitLab has ended it (cancelled, timed out) or forgotten it: nothing is left to tell.
            if why.starts_with("403") || why.starts_with("404") {
                journal.remove(entry.gitlab_job);
            }
        }
        Err(e) => eprintln!("construir-gitlab: GitLab job {}: {e}", entry.gitlab_job),
    }
}

async fn recovered(entry: &Entry, backend: &Arc<dyn Backend>) -> Report {
    let failed = |line: String| Report { success: false, failure_reason: "runner_system_failure", line };
    let handle = match &entry.handle {
        Some(h) => h.clone(),
        None => {
            let (name, image) = (entry.name.clone(), entry.image.clone());
            match crate::follow::blocking(backend, move |b| b.find(&name, &image)).await {
                Ok(Some(h)) => h,
                Ok(None) => {
                    return failed(
                        "the runner stopped before it submitted the job; it was not submitted (retry the job)".into(),
                    )
                }
                Err(e) => return failed(format!("cannot ask construir whether it was submitted: {e}")),
            }
        }
    };
    let quiet = |_: &str| {};
    match follow(backend, &handle, &quiet, &CancellationToken::new(), None).await {
        Ok(Ended::Done { ok, verdict, .. }) => Report {
            success: entry.script_ok.unwrap_or(ok),
            failure_reason: "script_failure",
            line: format!(
                "construir job {handle} ended: {verdict} (the runner restarted while it ran: its console and result are on construir, its artifacts were not uploaded)"
            ),
        },
        Ok(Ended::Failed(reason)) if entry.script_ok.is_none() => failed(format!("construir job {handle} failed: {reason}")),
        // after_script's job ended some other way: the script's outcome stands.
        Ok(other) if entry.script_ok.is_some() => Report {
            success: entry.script_ok == Some(true),
            failure_reason: "script_failure",
            line: format!("after_script's construir job {handle}: {other:?}"),
        },
        Ok(other) => failed(format!("construir job {handle}: {other:?}")),
        Err(e) => failed(format!("construir job {handle}: {e}")),
    }
}
