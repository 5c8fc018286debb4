//! construir-gitlab end to end: GitLab's job API on loopback
//! (`gitlab-runner-mock`), a real git repository, `construir-gitlab run`,
//! a real construir server and host booting the mini image.

use std::fs;
use std::path::Path;
use std::time::Duration;

use construir_e2e::gitlab::{construir_id, enqueue, repo, trace, until, unzip, CiJob, Repo, Runner};
use construir_e2e::server::{add_account, api, client, Server};
use construir_e2e::{qemu_pids, sh, Queue, Spawned};
use gitlab_runner_mock::{GitlabRunnerMock, MockJob, MockJobState};

/// A server with one account, a host taking its jobs, and a repository.
struct Farm {
    q: Queue,
    server: Server,
    token: String,
    _host: Spawned,
    repo: Repo,
}

fn farm() -> Farm {
    let q = Queue::new();
    let db = q.root.path().join("server.db");
    let token = add_account(&db, "ci");
    let server = Server::start(&q, &db, &[]);
    let host = q.spawn("h", &q.host_id, &["--workers", "3"]);
    let repo = repo(&q.root.path().join("repo"), REPO);
    Farm { q, server, token, _host: host, repo }
}

const REPO: &[(&str, &str)] = &[
    ("version.txt", "v1.2.3\n"),
    (
        "build.sh",
        "#!/bin/sh\nmkdir -p out\necho \"built from $(cat version.txt) by $CI_JOB_NAME\" > out/hello.txt\necho \"build output: $(cat out/hello.txt)\"\n",
    ),
];

impl Farm {
    fn runner(&self, mock: &GitlabRunnerMock, tag: &str) -> Runner {
        let token_file = self.q.root.path().join("account-token");
        construir_e2e::gitlab::write_secret(&token_file, &self.token);
        let to = ["--server", &self.server.url, "--token-file", token_file.to_str().expect("utf8")];
        Runner::start(self.q.root.path(), tag, mock, &to, &[])
    }

    /// The construir job `id` as the server shows it to the account.
    fn job(&self, id: &str) -> serde_json::Value {
        api(&self.server.addr(), &self.token, "GET", &format!("/v1/jobs/{id}"), b"").json()
    }
}

async fn ended(job: &MockJob, limit: Duration, runner: &Runner) {
    let done = until(limit, || job.finished()).await;
    assert!(
        done,
        "GitLab job {} did not end: {:?}\ntrace:\n{}\nrunner:\n{}",
        job.id(),
        job.state(),
        trace(job),
        runner.log()
    );
}

/// A passing job (its trace shows the build, its artifacts are the
/// result's files with the provenance), a failing one (the build's
/// failure), and two construir refuses (a system failure; a docker image:
/// the job's own mistake), through one runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_jobs_pass_and_fail_as_gitlab_expects_and_artifacts_are_the_checked_result() {
    let f = farm();
    let mock = GitlabRunnerMock::start().await;
    let pass = enqueue(
        &mock,
        &f.repo,
        &CiJob {
            name: "pass",
            script: &[
                "./build.sh",
                "echo \"secret=${SECRET:-absent} visible=$VISIBLE wanted=$WANTED token=${CI_JOB_TOKEN:-absent}\"",
                "test ! -e /job/.gitlab-ci/env && echo the variables file is gone",
            ],
            after_script: &["echo \"after saw: $(cat out/hello.txt)\"", "echo after > out/after.txt"],
            vars: &[
                ("CONSTRUIR_IMAGE", "0", false),
                ("CONSTRUIR_JOB_SIZE", "4M", false),
                ("SECRET", "masked-value", true),
                ("WANTED", "yes-please", true),
                ("CONSTRUIR_VM_VARIABLES", "WANTED", false),
                ("VISIBLE", "seen", false),
            ],
            artifacts: &["out/", "construir-provenance.intoto.jsonl"],
            needs: &[],
        },
    );
    let fail = enqueue(
        &mock,
        &f.repo,
        &CiJob {
            name: "fail",
            script: &["echo about to fail", "false", "echo never here"],
            vars: &[("CI_JOB_IMAGE", "construir:0", false), ("CONSTRUIR_JOB_SIZE", "1M", false)],
            ..CiJob::default()
        },
    );
    let no_image = enqueue(
        &mock,
        &f.repo,
        &CiJob {
            name: "noimage",
            script: &["true"],
            vars: &[("CI_JOB_IMAGE", "construir:77", false)],
            ..CiJob::default()
        },
    );
    let docker = enqueue(
        &mock,
        &f.repo,
        &CiJob {
            name: "docker",
            script: &["true"],
            vars: &[("CI_JOB_IMAGE", "debian:bookworm", false)],
            ..CiJob::default()
        },
    );
    // A later stage's job, given the passing job's artifacts in its checkout.
    let later = enqueue(
        &mock,
        &f.repo,
        &CiJob {
            name: "later",
            script: &[
                "cat out/hello.txt out/after.txt",
                "test ! -e construir-provenance.intoto.jsonl || echo provenance too",
            ],
            vars: &[("CONSTRUIR_IMAGE", "0", false), ("CONSTRUIR_JOB_SIZE", "1M", false)],
            needs: &[&pass],
            ..CiJob::default()
        },
    );
    let runner = f.runner(&mock, "a");
    for job in [&pass, &fail, &no_image, &docker, &later] {
        ended(job, Duration::from_secs(240), &runner).await;
    }

    let t = trace(&pass);
    assert_eq!(pass.state(), MockJobState::Success, "{t}\n{}", runner.log());
    for shown in [
        "Running with construir-gitlab",
        "construir: image i0, job size 4.0 MiB",
        "construir: kept out of the VM: ",
        "$ ./build.sh",
        "build output: built from v1.2.3 by custom",
        "secret=absent visible=seen wanted=yes-please token=absent",
        "the variables file is gone",
        "Running after_script in a second VM",
        "after saw: built from v1.2.3 by custom",
        "construir: its result is verified: ",
    ] {
        assert!(t.contains(shown), "the trace lacks {shown:?}:\n{t}");
    }
    assert!(!t.contains("masked-value") && !t.contains("job-token-"), "a secret reached the trace:\n{t}");
    // The artifacts: what after_script's result holds, and its provenance, which the server signed off.
    let after_id = construir_id(&t, 1).expect("after_script's construir job");
    let fetched = f.q.root.path().join("fetched");
    let (code, _, err) = client(
        &f.server,
        &f.token,
        f.q.root.path(),
        &["fetch", &after_id, "--unpack", fetched.to_str().expect("utf8")],
    );
    assert_eq!(code, 0, "{err}");
    let uploaded: Vec<_> = pass.uploaded_artifacts().collect();
    assert_eq!(uploaded.len(), 1, "one archive: {uploaded:?}");
    let files = unzip(&uploaded[0].data);
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(names, ["construir-provenance.intoto.jsonl", "out/after.txt", "out/hello.txt"]);
    assert_eq!(files["out/hello.txt"], b"built from v1.2.3 by custom\n");
    assert_eq!(files["out/hello.txt"], fs::read(fetched.join("src/out/hello.txt")).expect("the result's file"));
    assert_eq!(files["out/after.txt"], b"after\n");
    let result =
        Queue::list(f.q.root.path()).into_iter().find(|n| n.ends_with(".intoto.jsonl")).expect("fetched provenance");
    assert_eq!(files["construir-provenance.intoto.jsonl"], fs::read(f.q.root.path().join(result)).expect("provenance"));
    // Neither the masked value nor the job's token is anywhere in the result.
    let found = sh("grep -rl -e masked-value -e job-token- . || true", &fetched);
    assert_eq!(found.trim(), "", "a secret came back in the result");

    let t = trace(&later);
    assert_eq!(later.state(), MockJobState::Success, "{t}");
    assert!(t.contains("construir: the artifacts of pass: 3 files"), "{t}");
    assert!(t.contains("built from v1.2.3 by custom\nafter\n") && t.contains("provenance too"), "{t}");

    let t = trace(&fail);
    assert_eq!(fail.state(), MockJobState::Failed, "{t}");
    assert!(t.contains("$ false") && t.contains("about to fail") && !t.contains("never here"), "{t}");
    assert!(t.contains("ERROR: Job failed: exit code 1\n") && !t.contains("system failure"), "{t}");
    let id = construir_id(&t, 0).expect("submitted");
    assert_eq!(f.job(&id)["status"]["result"], "failed", "{}", f.job(&id));
    assert!(!t.contains("after_script"), "{t}");

    let t = trace(&no_image);
    assert_eq!(no_image.state(), MockJobState::Failed, "{t}");
    assert!(
        t.contains("ERROR: Job failed (system failure): construir did not take the job: ")
            && t.contains("no image i77"),
        "{t}"
    );
    let t = trace(&docker);
    assert_eq!(docker.state(), MockJobState::Failed, "{t}");
    assert!(t.contains("ERROR: Job failed: image: debian:bookworm is not a construir image"), "{t}");
    assert!(construir_id(&t, 0).is_none(), "a job that asked for a docker image was submitted");
}

/// A job cancelled in GitLab, and one past its GitLab timeout, are
/// cancelled in construir: their VMs stop and construir says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_job_cancelled_in_gitlab_or_past_its_timeout_is_cancelled_in_construir() {
    let f = farm();
    let mock = GitlabRunnerMock::start().await;
    let ticking = ["echo started", "while true; do echo tick; sleep 1; done"];
    let common = [("CONSTRUIR_IMAGE", "0", false), ("CONSTRUIR_JOB_SIZE", "1M", false)];
    let cancelled =
        enqueue(&mock, &f.repo, &CiJob { name: "cancelled", script: &ticking, vars: &common, ..CiJob::default() });
    let timeout_vars = [common[0], common[1], ("CI_JOB_TIMEOUT", "25", false)];
    let slow =
        enqueue(&mock, &f.repo, &CiJob { name: "slow", script: &ticking, vars: &timeout_vars, ..CiJob::default() });
    let runner = f.runner(&mock, "b");
    assert!(
        until(Duration::from_secs(180), || trace(&cancelled).contains("tick")).await,
        "the job never ran:\n{}\n{}",
        trace(&cancelled),
        runner.log()
    );
    cancelled.cancel();
    let id = construir_id(&trace(&cancelled), 0).expect("submitted");
    let gone = until(Duration::from_secs(60), || f.job(&id)["state"] == "failed").await;
    assert!(gone, "the construir job did not stop: {}\n{}", f.job(&id), runner.log());
    let reason = f.job(&id)["place"]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("cancel"), "{reason}");
    // GitLab takes no more of a cancelled job's trace: what construir did is on construir's side.
    assert_eq!(cancelled.state(), MockJobState::Cancelled);

    ended(&slow, Duration::from_secs(180), &runner).await;
    let t = trace(&slow);
    assert_eq!(slow.state(), MockJobState::Failed, "{t}");
    assert!(t.contains("ERROR: Job failed: execution took longer than the job's timeout of 25 s"), "{t}");
    let id = construir_id(&t, 0).expect("submitted");
    assert_eq!(f.job(&id)["state"], "failed", "{}", f.job(&id));
    assert!(
        until(Duration::from_secs(30), || qemu_pids(&f.q.host_id).is_empty()).await,
        "a VM outlived its cancelled job"
    );
}

/// A runner killed while its job runs: started again, it finishes the job
/// in GitLab from its journal, and construir ran the job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_mid_job_finishes_it_after_a_restart_without_submitting_it_twice() {
    let f = farm();
    let mock = GitlabRunnerMock::start().await;
    let job = enqueue(
        &mock,
        &f.repo,
        &CiJob {
            name: "long",
            script: &["echo started", "sleep 6", "echo finished"],
            vars: &[("CONSTRUIR_IMAGE", "0", false), ("CONSTRUIR_JOB_SIZE", "1M", false)],
            ..CiJob::default()
        },
    );
    let mut first = f.runner(&mock, "first");
    assert!(
        until(Duration::from_secs(180), || trace(&job).contains("started")).await,
        "{}\n{}",
        trace(&job),
        first.log()
    );
    first.child.kill().expect("kill");
    let _ = first.child.wait();
    let journal = first.state.join("journal");
    assert_eq!(Queue::list(&journal).len(), 1, "the job in hand is not in the journal");
    let second = f.runner(&mock, "second");
    ended(&job, Duration::from_secs(120), &second).await;
    assert_eq!(job.state(), MockJobState::Success, "{}", second.log());
    assert!(
        second.log().contains(&format!("GitLab job {} was in hand when the runner stopped", job.id())),
        "{}",
        second.log()
    );
    let list = api(&f.server.addr(), &f.token, "GET", "/v1/jobs", b"").json();
    let named: Vec<_> =
        list["jobs"].as_array().expect("jobs").iter().filter(|j| j["name"] == format!("gl{}", job.id())).collect();
    assert_eq!(named.len(), 1, "submitted {} times: {list}", named.len());
    assert!(
        until(Duration::from_secs(10), || Queue::list(&journal).is_empty()).await,
        "the journal kept the finished job"
    );
}

/// Straight to a local queue: no server, the host's published key checks the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_on_a_local_queue_runs_a_job_and_checks_its_result_with_the_hosts_key() {
    let q = Queue::new();
    let _host = q.spawn("h", &q.host_id, &[]);
    let repo = repo(&q.root.path().join("repo"), REPO);
    let mock = GitlabRunnerMock::start().await;
    let job = enqueue(
        &mock,
        &repo,
        &CiJob {
            name: "local",
            script: &["./build.sh"],
            vars: &[("CONSTRUIR_IMAGE", "0", false), ("CONSTRUIR_JOB_SIZE", "1M", false)],
            artifacts: &["out/hello.txt"],
            ..CiJob::default()
        },
    );
    let runner = Runner::start(q.root.path(), "q", &mock, &["--queue", q.queue.to_str().expect("utf8")], &[]);
    ended(&job, Duration::from_secs(180), &runner).await;
    let t = trace(&job);
    assert_eq!(job.state(), MockJobState::Success, "{t}\n{}", runner.log());
    assert!(t.contains("build output: built from v1.2.3") && t.contains(&format!("(host {})", q.host_id)), "{t}");
    let files = unzip(&job.uploaded_artifacts().next().expect("an archive").data);
    assert_eq!(files.keys().collect::<Vec<_>>(), ["out/hello.txt"]);
    assert!(Path::new(&q.done).join(format!("gl{}_d0.tar.xz", job.id())).exists());
}
