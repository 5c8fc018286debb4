//! The Slurm executor end to end: a real one-node Slurm cluster (Debian's
//! slurm-wlm and munge) on this machine, construir-server handing it jobs,
//! `construir-host run-one` running them in real VMs on its node, and the
//! `construir` client following them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use construir_e2e::server::{add_account, client, job_dir, server_cmd, Server};
use construir_e2e::slurm::{Cluster, NODE};
use construir_e2e::{arm64_mini_images, bin, qemu_pids, sh, wait_for, Queue};

/// The server's Slurm options for this cluster.
fn slurm_args(q: &Queue) -> Vec<String> {
    let root = q.root.path();
    vec![
        "--executor".into(),
        "slurm".into(),
        "--slurm-dir".into(),
        root.join("shared").to_string_lossy().into_owned(),
        "--slurm-construir-host".into(),
        bin("construir-host").to_string_lossy().into_owned(),
        "--slurm-host-key".into(),
        root.join("node-keys/node1.key").to_string_lossy().into_owned(),
        "--slurm-node-dir".into(),
        root.join("node-local").to_string_lossy().into_owned(),
        "--slurm-memory".into(),
        "1G".into(),
        "--slurm-timeout".into(),
        "5m".into(),
        "--slurm-run-arg=--accel".into(),
        "--slurm-run-arg=tcg".into(),
        "--max-attempts".into(),
        "2".into(),
        // The node offers the features amd64 and arm64 (scripts/slurm-cluster): each job asks for its own.
        "--slurm-constraint".into(),
        "amd64=amd64".into(),
        "--slurm-constraint".into(),
        "arm64=arm64".into(),
    ]
}

/// The server's images: i0 (amd64) and i7 (arm64), hard links to the shared builds.
fn images(q: &Queue) -> PathBuf {
    let images = q.root.path().join("images");
    for (from, name) in [(construir_e2e::images(), "i0"), (arm64_mini_images(), "i7")] {
        fs::create_dir_all(images.join(name)).expect("mkdir");
        for e in fs::read_dir(from.join(name)).expect("ls") {
            let e = e.expect("entry");
            fs::hard_link(e.path(), images.join(name).join(e.file_name())).expect("link");
        }
    }
    images
}

fn start(q: &Queue, db: &Path, cluster: &Cluster) -> Server {
    let args = slurm_args(q);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with_env(q, db, &q.root.path().join("images"), &args, &[("SLURM_CONF", &cluster.conf)])
}

fn status(s: &Server, token: &str, work: &Path, id: &str) -> serde_json::Value {
    let (code, out, err) = client(s, token, work, &["status", id]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("json")
}

/// Waits until the job runs on the node and its console shows `line`; its Slurm job's id.
fn running(s: &Server, token: &str, work: &Path, cluster: &Cluster, id: &str, attempt: u64, line: &str) -> String {
    let mut seen = (serde_json::Value::Null, String::new());
    let ok = wait_for(Duration::from_secs(120), || {
        seen = (status(s, token, work, id), client(s, token, work, &["log", id]).1);
        seen.0["place"]["host"].as_str().is_some_and(|h| h.starts_with(&format!("{NODE} (slurm job ")))
            && seen.1.contains(line)
    });
    assert!(ok, "not running with {line:?}: {}\n{}\n{}\n{}", seen.0, seen.1, s.log(), cluster.logs());
    let (slurm_id, state, node) = cluster.job_named(&format!("construir.{id}.{attempt}")).expect("its Slurm job");
    assert_eq!((state.as_str(), node.as_str()), ("RUNNING", NODE));
    slurm_id
}

#[test]
fn jobs_run_on_a_real_slurm_cluster_are_cancelled_go_back_when_killed_and_survive_a_server_restart() {
    let q = Queue::new();
    let cluster = Cluster::start(&q.root.path().join("slurm"));
    let db = q.root.path().join("server.db");
    let alice = add_account(&db, "alice");
    // The node's key lives on the node; the operator pins its public half.
    let key = q.root.path().join("node-keys/node1.key");
    let out = Command::new(bin("construir-host"))
        .arg("key")
        .arg(q.root.path().join("queue"))
        .args(["--host-id", NODE, "--host-key"])
        .arg(&key)
        .output()
        .expect("construir-host key");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8(out.stdout).expect("utf8");
    let out = server_cmd(&db, &["slurm", "pin-key", NODE, public.trim()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A constraint no node can meet is refused at start, before any job waits on it.
    let mut serve = Command::new("timeout");
    serve.args(["60", bin("construir-server").to_str().expect("utf8"), "--db"]).arg(&db).arg("serve").arg(&q.queue);
    serve.args(["--listen", "127.0.0.1:0", "--images"]).arg(images(&q));
    let mut args = slurm_args(&q);
    args.truncate(args.len() - 2);
    let out = serve
        .args(args)
        .args(["--slurm-constraint", "arm64=gpu"])
        .env("SLURM_CONF", &cluster.conf)
        .output()
        .expect("construir-server serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Slurm cannot place a job of --slurm-constraint arm64=gpu")
            && err.contains("Invalid feature specification"),
        "{err}"
    );
    let mut s = start(&q, &db, &cluster);
    let work = q.root.path().join("home");
    fs::create_dir_all(&work).expect("mkdir");
    let submit = |s: &Server, name: &str, script: &str| {
        let dir = job_dir(&work, name, script);
        let (code, id, err) =
            client(s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
        assert_eq!(code, 0, "{err}");
        id.trim().to_owned()
    };

    // A debug session has no way back from a node: refused at submit, saying why.
    let dir = job_dir(&work, "debugged", "#!/bin/sh\nexit 1\n");
    let (code, _, err) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--debug"]);
    assert!(code == 2 && err.contains("400") && err.contains("under Slurm"), "{err}");

    // Done: the node shown as its host, the console live, the result signed by the node and verified.
    let id = submit(&s, "steps", "#!/bin/sh\necho step one\nsleep 5\necho step two\n");
    let slurm_id = running(&s, &alice, &work, &cluster, &id, 1, "step one");
    // Its image is amd64, so Slurm was asked for the nodes with that feature.
    let shown = cluster.run("scontrol", &["show", "job", &slurm_id]).expect("scontrol show job");
    assert!(shown.contains(" Features=amd64 "), "{shown}");
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id]);
    assert_eq!(code, 0, "{err}\n{}", s.log());
    assert!(err.contains(&format!("running on {NODE} (slurm job ")) && err.contains("done: ok (exit code 0)"), "{err}");
    let (code, _, err) = client(&s, &alice, &work, &["fetch", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("verified: signed by ed25519:") && err.contains(&format!("construir-host:{NODE}")), "{err}");
    let (_, log, _) = client(&s, &alice, &work, &["log", &id]);
    assert!(log.contains("step one") && log.contains("step two") && log.contains("verdict: ok"), "{log}");
    let keys = construir_e2e::server::api(&s.addr(), &alice, "GET", "/v1/hosts/keys", b"").json();
    assert_eq!(keys["keys"][0]["host"], format!("{NODE} (slurm)"), "{keys}");
    let runs = q.root.path().join("shared/runs");
    assert!(wait_for(Duration::from_secs(5), || fs::read_dir(&runs).map(|d| d.count()).unwrap_or(0) == 0));
    assert!(q.root.path().join("shared/images/i0/image.toml").exists(), "the image reached the shared directory");
    // The node booted a checked copy on its own disk, and worked there.
    let manifest = q.root.path().join("shared/images/i0/image.toml");
    let checksum = jobfile::image::sha256_file(&manifest).expect("checksum");
    let kept = q.root.path().join("node-local/construir-images").join(&checksum).join("i0/image.toml");
    assert!(kept.exists(), "no checked copy at {}", kept.display());

    // A job on the arm64 image: Slurm is asked for arm64's nodes, and the node runs it on aarch64.
    let dir = job_dir(&work, "arm", "#!/bin/sh\necho \"machine $(uname -m)\"\nsleep 5\n");
    let (code, id, err) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "7", "--size", "1M"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    let slurm_id = running(&s, &alice, &work, &cluster, &id, 1, "machine aarch64");
    let shown = cluster.run("scontrol", &["show", "job", &slurm_id]).expect("scontrol show job");
    assert!(shown.contains(" Features=arm64 "), "{shown}");
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id]);
    assert_eq!(code, 0, "{err}\n{}", s.log());
    let (code, _, err) = client(&s, &alice, &work, &["fetch", &id]);
    assert!(code == 0 && err.contains("verified: signed by ed25519:"), "{err}");

    // Cancelled while it runs on the node: the VM stops, the console so far comes back.
    let id = submit(&s, "sleeper", "#!/bin/sh\necho started sleeping\nsleep 600\n");
    running(&s, &alice, &work, &cluster, &id, 1, "started sleeping");
    let asked = Instant::now();
    let (code, _, err) = client(&s, &alice, &work, &["cancel", &id]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("failed: cancelled at its submitter's request"), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(40), "took {:?}", asked.elapsed());
    let (_, log, _) = client(&s, &alice, &work, &["log", &id]);
    assert!(log.contains("started sleeping"), "{log}");
    assert!(
        wait_for(Duration::from_secs(20), || cluster
            .job_named(&format!("construir.{id}.1"))
            .is_none_or(|(_, state, _)| state != "RUNNING")),
        "its Slurm job still runs"
    );

    // Its Slurm job cancelled from outside: the job goes back to the queue and runs again.
    let id = submit(&s, "again", "#!/bin/sh\necho attempt\nsleep 8\necho finished\n");
    let slurm_id = running(&s, &alice, &work, &cluster, &id, 1, "attempt");
    cluster.run("scancel", &[&slurm_id]).expect("scancel");
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id]);
    assert_eq!(code, 0, "{err}\n{}", s.log());
    assert_eq!(status(&s, &alice, &work, &id)["attempts"], 2);
    assert!(
        s.log().contains(&format!(
            "Slurm job {slurm_id} ended CANCELLED on {NODE} without a result; back in the queue (attempt 1 of 2)"
        )),
        "{}",
        s.log()
    );
    assert!(client(&s, &alice, &work, &["log", &id]).1.contains("finished"));

    // The node's run-one killed, on every attempt: the job fails, saying why.
    let id = submit(&s, "doomed", "#!/bin/sh\necho doomed\nsleep 600\n");
    for attempt in 1..=2 {
        running(&s, &alice, &work, &cluster, &id, attempt, "doomed");
        // ("[.]": the pattern matches run-one's command line, not this shell's.)
        sh(&format!("pkill -KILL -f 'run-one [.]/alice.{id}.doomed_i0'"), Path::new("/"));
        if attempt == 1 {
            assert!(
                wait_for(Duration::from_secs(30), || status(&s, &alice, &work, &id)["attempts"] == 2),
                "{}",
                s.log()
            );
        }
    }
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("run-one on the node could not run it (exit 137)"), "{err}");
    assert!(err.contains("it came back from Slurm 2 times, the most allowed"), "{err}");

    // The server killed and started again while a job runs on Slurm: it follows it again, one result.
    let id = submit(&s, "survivor", "#!/bin/sh\necho before\nsleep 10\necho after the restart\n");
    running(&s, &alice, &work, &cluster, &id, 1, "before");
    drop(s);
    s = start(&q, &db, &cluster);
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id]);
    assert_eq!(code, 0, "{err}\n{}", s.log());
    assert!(client(&s, &alice, &work, &["log", &id]).1.contains("after the restart"));
    assert_eq!(status(&s, &alice, &work, &id)["attempts"], 1, "never handed out twice");
    let results: Vec<String> = Queue::list(&q.done).into_iter().filter(|f| f.contains(&id)).collect();
    assert_eq!(results.len(), 3, "one result, its log and its provenance: {results:?}");
    assert!(qemu_pids(NODE).is_empty(), "a VM outlived its job");
}
