//! One CI job, as the gitlab-runner crate drives it: the script step becomes
//! a construir job (fetched, composed, submitted, followed into the trace,
//! its result fetched and checked); after_script, when there is one, runs as
//! a second construir job on what the first left; the artifacts are the
//! files of the last result's checkout, with its provenance.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use gitlab_runner::job::Job;
use gitlab_runner::{CancellableJobHandler, JobResult, Phase};
use tokio_util::sync::CancellationToken;

use crate::artifacts::{self, Artifact};
use crate::backend::{Backend, Fetched};
use crate::compose::{self, Part};
use crate::follow::{blocking, follow, Ended};
use crate::journal::{Entry, Journal};
use crate::spec::{Defaults, Spec, Vars};

/// What every job of this runner shares.
pub struct Ctx {
    pub backend: Arc<dyn Backend>,
    pub defaults: Defaults,
    pub journal: Arc<Journal>,
}

/// A result fetched, checked and unpacked.
struct Landed {
    tree: PathBuf,
    fetched: Fetched,
}

pub struct CiJob {
    job: Job,
    ctx: Arc<Ctx>,
    spec: Result<Spec, String>,
    token: Option<String>,
    started: Instant,
    /// The latest result; the artifacts come from it.
    last: Option<Landed>,
    /// A construir job not yet seen to end (cancelled at cleanup).
    open: Option<String>,
    /// How the script's part ended, once it has.
    script_ok: Option<bool>,
}

/// How a part of the job went wrong.
enum Failure {
    /// The build's: its script, its repository, its declarations.
    Job(String),
    /// construir's side or the runner's: GitLab's "system failure".
    System(String),
    Cancelled,
}

impl CiJob {
    pub fn new(job: Job, ctx: Arc<Ctx>) -> CiJob {
        let vars = Vars::of(&job);
        let spec = Spec::read(job.id(), &vars, &ctx.defaults);
        let token = vars.get("CI_JOB_TOKEN").map(str::to_owned);
        CiJob { job, ctx, spec, token, started: Instant::now(), last: None, open: None, script_ok: None }
    }

    fn say(&self, text: &str) {
        self.job.trace(text);
        if !text.ends_with('\n') {
            self.job.trace("\n");
        }
    }

    fn failed(&self, f: Failure) -> JobResult {
        match f {
            Failure::Job(why) => self.say(&format!("ERROR: Job failed: {why}")),
            Failure::System(why) => self.say(&format!("ERROR: Job failed (system failure): {why}")),
            Failure::Cancelled => self.say("construir-gitlab: the job was cancelled"),
        }
        Err(())
    }

    fn work(&self) -> PathBuf {
        self.job.build_dir().to_owned()
    }

    async fn script(&mut self, lines: &[String], cancel: &CancellationToken) -> Result<(), Failure> {
        self.say(&format!(
            "Running with construir-gitlab {} on {}",
            env!("CARGO_PKG_VERSION"),
            self.ctx.backend.describe()
        ));
        let mut spec = self.spec.clone().map_err(Failure::Job)?;
        let dir = self.work().join("job");
        let source = spec.source.clone();
        let src = dir.join(compose::SRC);
        self.say(&format!("Fetching the repository at {}", jobfile::sanitize(source.sha.as_bytes())));
        tokio::task::spawn_blocking(move || compose::checkout(&source, &src))
            .await
            .map_err(|e| Failure::System(e.to_string()))?
            .map_err(|e| Failure::System(format!("cannot fetch the repository: {e}")))?;
        self.put_dependencies(&dir.join(compose::SRC), spec.size).await?;
        let (d, s, l) = (dir.clone(), spec.clone(), lines.to_vec());
        let out = self.work();
        let (file, verify_on) = tokio::task::spawn_blocking(move || {
            let verify_on = compose::job_dir(&d, &s, Part::Script, &l)?;
            Ok::<_, String>((compose::pack(&d, &s, Part::Script, &out)?, verify_on))
        })
        .await
        .map_err(|e| Failure::System(e.to_string()))?
        .map_err(Failure::Job)?;
        // The variable says first; else the repository.
        spec.verify_on = spec.verify_on.or(verify_on);
        self.spec = Ok(spec.clone());
        self.say(&format!(
            "construir: image i{}, job size {}{}{}",
            spec.image,
            jobfile::units::human_size(spec.size),
            if spec.verify_on == Some(2) { ", verified rebuild on 2 hosts" } else { "" },
            if spec.debug { ", a debug session if it fails" } else { "" }
        ));
        if !spec.withheld.is_empty() {
            self.say(&format!(
                "construir: kept out of the VM: {} (masked or carrying the job's token; a project names masked ones it wants in the VM in {})",
                spec.withheld.join(" "),
                crate::spec::VM_VARIABLES
            ));
        }
        self.run(&spec, file, 1, cancel).await
    }

    /// The artifacts of the jobs this one depends on, into the checkout.
    async fn put_dependencies(&mut self, checkout: &std::path::Path, size: u64) -> Result<(), Failure> {
        let mut got = Vec::new();
        for dep in self.job.dependencies() {
            let name = jobfile::sanitize(dep.name().as_bytes());
            match dep.download().await {
                Ok(Some(artifact)) => got.push((name, artifact)),
                Ok(None) => {}
                Err(e) => return Err(Failure::System(format!("cannot download the artifacts of {name}: {e}"))),
            }
        }
        if got.is_empty() {
            return Ok(());
        }
        let checkout = checkout.to_owned();
        let said = tokio::task::spawn_blocking(move || {
            let mut budget = size;
            let mut said = Vec::new();
            for (name, mut artifact) in got {
                let put = crate::dependencies::put(&checkout, &mut artifact, &mut budget)?;
                said.push(format!(
                    "construir: the artifacts of {name}: {} files, {}",
                    put.files,
                    jobfile::units::human_size(put.bytes)
                ));
                said.extend(put.skipped.iter().map(|s| format!("construir: left out of {name}'s artifacts: {s}")));
            }
            Ok::<_, String>(said)
        })
        .await
        .map_err(|e| Failure::System(e.to_string()))?
        .map_err(Failure::Job)?;
        said.iter().for_each(|line| self.say(line));
        Ok(())
    }

    async fn after_script(&mut self, lines: &[String], cancel: &CancellationToken) -> Result<(), Failure> {
        let (Ok(spec), Some(last)) = (self.spec.clone(), &self.last) else {
            self.say("construir-gitlab: after_script skipped: the script's job left no result to run it on");
            return Ok(());
        };
        self.say("Running after_script in a second VM, on what the script left");
        let (d, s, l, out) = (last.tree.clone(), spec.clone(), lines.to_vec(), self.work());
        let file = tokio::task::spawn_blocking(move || {
            compose::job_dir(&d, &s, Part::After, &l)?;
            compose::pack(&d, &s, Part::After, &out)
        })
        .await
        .map_err(|e| Failure::System(e.to_string()))?
        .map_err(Failure::Job)?;
        self.run(&spec, file, 2, cancel).await
    }

    /// Submits `file`, follows it into the trace, and lands its result as run `n`.
    async fn run(&mut self, spec: &Spec, file: PathBuf, n: u32, cancel: &CancellationToken) -> Result<(), Failure> {
        let handle = self.submit(spec, file).await?;
        self.say(&format!("construir: submitted as job {handle}"));
        let deadline = spec.timeout.map(|t| (self.started + t, t));
        let trace = |text: &str| self.job.trace(text);
        let ended = follow(&self.ctx.backend, &handle, &trace, cancel, deadline).await.map_err(Failure::System)?;
        self.open = None;
        match ended {
            Ended::Done { ok, verdict, debug } => {
                if let Some(d) = debug {
                    self.say(&format!(
                        "construir: a debug session is open in its VM ({}): {}",
                        jobfile::sanitize(d.as_bytes()),
                        self.ctx.backend.debug_command(&handle)
                    ));
                }
                self.land(&handle, n).await?;
                match ok {
                    true => Ok(()),
                    false => Err(Failure::Job(short_verdict(&jobfile::sanitize(verdict.as_bytes())))),
                }
            }
            Ended::Failed(reason) => Err(Failure::System(format!("construir job {handle}: {reason}"))),
            Ended::Cancelled(_) => Err(Failure::Cancelled),
            Ended::TimedOut(limit) => {
                Err(Failure::Job(format!("execution took longer than the job's timeout of {} s", limit.as_secs())))
            }
        }
    }

    /// Hands `file` to the backend, in the journal before (by name) and after (by handle).
    async fn submit(&mut self, spec: &Spec, file: PathBuf) -> Result<String, Failure> {
        let name = crate::backend::file_job_name(&file).map_err(Failure::System)?;
        let mut entry = Entry {
            gitlab_job: self.job.id(),
            token: self.token.clone().unwrap_or_default(),
            name,
            image: spec.image.clone(),
            handle: None,
            script_ok: self.script_ok,
        };
        self.ctx
            .journal
            .write(&entry)
            .map_err(|e| Failure::System(format!("cannot write the runner's journal: {e}")))?;
        let s = spec.clone();
        let handle = blocking(&self.ctx.backend, move |b| b.submit(&file, &s))
            .await
            .map_err(|e| Failure::System(format!("construir did not take the job: {e}")))?;
        self.open = Some(handle.clone());
        entry.handle = Some(handle.clone());
        if let Err(e) = self.ctx.journal.write(&entry) {
            eprintln!("construir-gitlab: GitLab job {}: cannot write the runner's journal: {e}", self.job.id());
        }
        Ok(handle)
    }

    /// Fetches the result of `handle`, checks it, unpacks it as `tree-<n>`.
    async fn land(&mut self, handle: &str, n: u32) -> Result<(), Failure> {
        let into = self.work().join(format!("result-{n}"));
        let tree = self.work().join(format!("tree-{n}"));
        let (h, t) = (handle.to_owned(), tree.clone());
        let fetched = blocking(&self.ctx.backend, move |b| {
            std::fs::create_dir_all(&into).map_err(|e| e.to_string())?;
            let fetched = b.fetch(&h, &into)?;
            jobfile::tools::unpack(&fetched.result, &t, jobfile::tools::default_limits("unpack"))
                .map_err(|e| format!("cannot unpack its result: {}", jobfile::error_chain(&e)))?;
            Ok(fetched)
        })
        .await
        .map_err(|e| Failure::System(format!("construir job {handle}: {e}")))?;
        self.say(&format!("construir: its result is verified: {}", jobfile::sanitize(fetched.verified.as_bytes())));
        self.last = Some(Landed { tree, fetched });
        Ok(())
    }
}

#[async_trait::async_trait]
impl CancellableJobHandler<Artifact> for CiJob {
    async fn step(&mut self, lines: &[String], phase: Phase, cancel: &CancellationToken) -> JobResult {
        let ran = match phase {
            Phase::Script => {
                let ran = self.script(lines, cancel).await;
                self.script_ok = Some(ran.is_ok());
                ran
            }
            Phase::AfterScript => self.after_script(lines, cancel).await,
        };
        match ran {
            Ok(()) => Ok(()),
            Err(f) => self.failed(f),
        }
    }

    async fn get_uploadable_files(&mut self) -> Result<Box<dyn Iterator<Item = Artifact> + Send>, ()> {
        let Some(last) = &self.last else { return Ok(Box::new(std::iter::empty())) };
        let offered = artifacts::offered(&last.tree.join(compose::SRC), &last.fetched.provenance);
        Ok(Box::new(offered.into_iter()))
    }

    async fn cleanup(&mut self) {
        if let Some(handle) = self.open.take() {
            let h = handle.clone();
            match blocking(&self.ctx.backend, move |b| b.cancel(&h)).await {
                Ok(said) => eprintln!(
                    "construir-gitlab: GitLab job {}: construir job {handle} cancelled: {said}",
                    self.job.id()
                ),
                Err(e) => eprintln!(
                    "construir-gitlab: GitLab job {}: cannot cancel construir job {handle}: {e}",
                    self.job.id()
                ),
            }
        }
        self.ctx.journal.remove(self.job.id());
    }
}

/// A verdict's first clause, as GitLab's runner says a build failed:
/// `failed (exit code 1); the job ran…` -> `exit code 1`.
fn short_verdict(verdict: &str) -> String {
    let first = verdict.split(';').next().unwrap_or(verdict).trim();
    first.strip_prefix("failed (").and_then(|r| r.strip_suffix(')')).unwrap_or(first).to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_verdict_is_said_as_gitlab_says_it() {
        assert_eq!(super::short_verdict("failed (exit code 1); the job ran 0.1 s"), "exit code 1");
        assert_eq!(super::short_verdict("timed_out after 3600 s; VM powered off"), "timed_out after 3600 s");
    }
}
