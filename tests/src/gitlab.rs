//! A forge for construir-gitlab's tests: GitLab's job API on loopback
//! (the `gitlab-runner-mock` crate), a real git repository on this machine,
//! and `construir-gitlab run` taking the jobs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gitlab_runner_mock::{GitlabRunnerMock, MockJob, MockJobStepName, MockJobStepWhen};

use crate::{bin, sh, Spawned};

/// A git repository with one commit.
pub struct Repo {
    pub url: String,
    pub sha: String,
}

/// `files` committed into a new repository at `dir`.
pub fn repo(dir: &Path, files: &[(&str, &str)]) -> Repo {
    fs::create_dir_all(dir).expect("mkdir");
    for (path, text) in files {
        let p = dir.join(path);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, text).expect("write");
        if path.ends_with(".sh") {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }
    sh("git init -q -b main . && git add -A && git -c user.name=t -c user.email=t@t commit -q -m one", dir);
    let sha = sh("git rev-parse HEAD", dir).trim().to_owned();
    Repo { url: format!("file://{}", dir.display()), sha }
}

/// What one CI job is.
#[derive(Default)]
pub struct CiJob<'a> {
    pub name: &'a str,
    pub script: &'a [&'a str],
    pub after_script: &'a [&'a str],
    /// (key, value, masked)
    pub vars: &'a [(&'a str, &'a str, bool)],
    pub artifacts: &'a [&'a str],
    /// Jobs whose artifacts it gets (GitLab's `needs:`); it waits for them.
    pub needs: &'a [&'a MockJob],
}

/// Queues `job` at `repo`'s commit; its token is also its `CI_JOB_TOKEN`, as GitLab has it.
pub fn enqueue(mock: &GitlabRunnerMock, repo: &Repo, job: &CiJob) -> MockJob {
    let mut b = mock.job_builder(job.name.to_owned());
    let owned = |s: &[&str]| s.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    b.add_step(MockJobStepName::Script, owned(job.script), 3600, MockJobStepWhen::OnSuccess, false);
    if !job.after_script.is_empty() {
        b.add_step(MockJobStepName::AfterScript, owned(job.after_script), 3600, MockJobStepWhen::Always, false);
    }
    b.add_variable("CI_REPOSITORY_URL".into(), repo.url.clone(), false, false);
    b.add_variable("CI_COMMIT_SHA".into(), repo.sha.clone(), true, false);
    b.add_variable("CI_COMMIT_REF_NAME".into(), "main".into(), true, false);
    for (k, v, masked) in job.vars {
        b.add_variable((*k).to_owned(), (*v).to_owned(), !masked, *masked);
    }
    if !job.artifacts.is_empty() {
        b.add_artifact_paths(owned(job.artifacts));
    }
    for needed in job.needs {
        b.dependency((*needed).clone());
    }
    // The builder names the token after the id; GitLab gives the same as CI_JOB_TOKEN.
    let id = builder_id(&b);
    b.add_variable("CI_JOB_TOKEN".into(), format!("job-token-{id}"), false, true);
    let job = b.build();
    mock.enqueue_job(job.clone());
    job
}

/// The id of the builder's job, which it keeps private but shows in its `Debug`.
fn builder_id(b: &gitlab_runner_mock::MockJobBuilder) -> u64 {
    let shown = format!("{b:?}");
    shown
        .split("id: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .expect("the builder's id")
}

/// `construir-gitlab run` in the background, its log in `<root>/gitlab-<tag>.log`.
pub struct Runner {
    pub child: Spawned,
    pub log: PathBuf,
    pub state: PathBuf,
}

impl Runner {
    /// Against `mock`, handing jobs to `to` (`--server URL --token-file F` or `--queue DIR`).
    pub fn start(root: &Path, tag: &str, mock: &GitlabRunnerMock, to: &[&str], extra: &[&str]) -> Runner {
        let token = root.join(format!("runner-token-{tag}"));
        write_secret(&token, mock.runner_token());
        let log = root.join(format!("gitlab-{tag}.log"));
        let state = root.join("gitlab-state");
        let child = Command::new(bin("construir-gitlab"))
            .args(["run", "--gitlab-url", mock.uri().as_str(), "--runner-token-file"])
            .arg(&token)
            .arg("--state-dir")
            .arg(&state)
            .args(["--poll", "1s", "--concurrent", "4"])
            .args(to)
            .args(extra)
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start construir-gitlab");
        Runner { child: Spawned(child), log, state }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A token file, 0600 as construir-gitlab wants it.
pub fn write_secret(path: &Path, token: &str) {
    fs::write(path, format!("{token}\n")).expect("write token");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Waits (asynchronously: the mock answers on this runtime) until `cond`, at most `limit`.
pub async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cond()
}

pub fn trace(job: &MockJob) -> String {
    String::from_utf8_lossy(&job.log()).into_owned()
}

/// The construir job a trace says the runner submitted (the `n`th, from 0).
pub fn construir_id(trace: &str, n: usize) -> Option<String> {
    trace.lines().filter_map(|l| l.strip_prefix("construir: submitted as job ")).nth(n).map(|s| s.trim().to_owned())
}

/// The files of a zip archive GitLab was sent, by name.
pub fn unzip(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("a zip archive");
    let mut out = BTreeMap::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).expect("entry");
        if f.is_dir() {
            continue;
        }
        let mut data = Vec::new();
        f.read_to_end(&mut data).expect("read entry");
        out.insert(f.name().to_owned(), data);
    }
    out
}
