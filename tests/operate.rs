//! What an operator sees: `construir-host status` and the metrics file,
//! read while a host runs real VMs, after it was killed, and after a
//! restart finished its work.

use std::fs;
use std::time::Duration;

use construir_e2e::{bin, job_log, signal, wait_for, Queue};

fn status(q: &Queue) -> serde_json::Value {
    let out = std::process::Command::new(bin("construir-host"))
        .arg("status")
        .arg(&q.queue)
        .args(["--json", "--config", "/dev/null"])
        .output()
        .expect("status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

#[test]
fn status_and_metrics_follow_real_jobs_through_a_host_kill_and_a_restart() {
    let q = Queue::new();
    q.add_job("first_i0.tar.xz", "#!/bin/sh\nsleep 6\necho first done\n", "1m", &[]);
    q.add_job("second_i0.tar.xz", "#!/bin/sh\necho second done\n", "1m", &[]);
    fs::write(q.queue.join("bad name_i0.tar.xz"), vec![0u8; 70_000]).expect("bad name");
    let metrics = q.root.path().join("construir.prom");
    let host_id = format!("{}-op", q.host_id);
    let mut host = q.spawn("first", &host_id, &["--metrics-file", metrics.to_str().expect("utf8")]);

    // While the first job runs: it is shown running on a live host, the other waits.
    assert!(
        wait_for(Duration::from_secs(60), || status(&q)["running"].as_array().is_some_and(|r| r.len() == 1)),
        "{}",
        q.log("first")
    );
    let s = status(&q);
    let running = &s["running"][0];
    // Both were renamed in before the host started: claimed by arrival, then name.
    assert_eq!(running["name"], "first_i0.tar.xz", "{s}");
    assert_eq!(s["waiting"]["count"], 1, "{s}");
    assert_eq!(s["waiting"]["by_image"]["i0"], 1, "{s}");
    assert_eq!(running["host"], host_id.as_str());
    assert_eq!(running["attempt"], 1);
    assert_eq!(s["hosts"][0]["id"], host_id.as_str());
    assert_eq!(s["hosts"][0]["alive"], true);
    assert_eq!(s["hosts"][0]["pid"], host.id());
    assert_eq!(s["stuck"].as_array().map(Vec::len), Some(0));
    // Metrics scraped mid-run: one VM, the bad name refused.
    assert!(
        wait_for(Duration::from_secs(15), || fs::read_to_string(&metrics)
            .is_ok_and(|t| metric(&t, &format!("construir_vms_running{{host=\"{host_id}\"}}")) == Some(1.0))),
        "{:?}",
        fs::read_to_string(&metrics)
    );
    let text = fs::read_to_string(&metrics).expect("metrics");
    assert_eq!(
        metric(&text, &format!("construir_jobs_refused_total{{host=\"{host_id}\",reason=\"bad_name\"}}")),
        Some(1.0),
        "{text}"
    );

    // Killed mid-job: its claim is stuck, its host gone.
    signal(&host, libc::SIGKILL);
    host.wait().expect("reaped");
    let s = status(&q);
    assert_eq!(s["running"].as_array().map(Vec::len), Some(0), "{s}");
    assert_eq!(s["stuck"][0]["name"], "first_i0.tar.xz", "{s}");
    assert_eq!(s["stuck"][0]["host"], host_id.as_str());
    assert_eq!(s["hosts"][0]["alive"], false);
    assert!(s["hosts"][0]["stopped"].is_null(), "a killed host did not stop cleanly: {s}");
    let text = construir_e2e::sh(
        &format!("{} status {} --config /dev/null", bin("construir-host").display(), q.queue.display()),
        q.root.path(),
    );
    assert!(text.contains("stuck: 1 (their host is not running"), "{text}");
    assert!(text.contains(&format!("{host_id:<20} gone")), "{text}");

    // Restarted: everything finishes; the results and their verdicts are listed.
    let mut again = q.spawn("again", &host_id, &["--once", "--metrics-file", metrics.to_str().expect("utf8")]);
    assert!(again.wait().expect("host").success(), "{}", q.log("again"));
    let s = status(&q);
    assert_eq!(s["waiting"]["count"], 0, "{s}");
    assert_eq!(s["stuck"].as_array().map(Vec::len), Some(0), "{s}");
    assert_eq!(s["hosts"][0]["alive"], false, "{s}");
    assert!(s["hosts"][0]["stopped"].as_str().is_some_and(|t| t.ends_with('Z')), "a clean stop is noted: {s}");
    assert_eq!(s["hosts"][0]["pid"], again.id());
    let recent = s["recent"].as_array().expect("recent");
    let done: Vec<_> = recent.iter().filter(|r| r["outcome"] == "done").collect();
    assert_eq!(done.len(), 2, "{s}");
    for r in &done {
        assert!(r["verdict"].as_str().is_some_and(|v| v.starts_with("ok (exit code 0)")), "{r}");
    }
    assert!(
        recent
            .iter()
            .any(|r| r["outcome"] == "failed"
                && r["verdict"].as_str().is_some_and(|v| v.starts_with("bad job file name"))),
        "{s}"
    );
    assert_eq!(String::from_utf8(job_log(&q.done("first_d0.tar.xz"))).expect("utf8"), "first done\n");
    let text = fs::read_to_string(&metrics).expect("metrics");
    let h = format!("host=\"{host_id}\"");
    assert_eq!(metric(&text, &format!("construir_vms_running{{{h}}}")), Some(0.0), "{text}");
    assert_eq!(metric(&text, &format!("construir_queue_depth{{{h}}}")), Some(0.0), "{text}");
    let ok = metric(&text, &format!("construir_jobs_finished_total{{{h},image=\"0\",result=\"ok\"}}"));
    assert_eq!(ok, Some(2.0), "the restarted host ran both: {text}");
    let boots = metric(&text, &format!("construir_vm_boot_seconds_count{{{h},image=\"0\"}}"));
    assert_eq!(boots, Some(2.0), "{text}");
    let runs = metric(&text, &format!("construir_job_run_seconds_sum{{{h},image=\"0\"}}")).expect("runs");
    assert!(runs >= 6.0, "the first job slept 6 s: {text}");
}

fn doctor(q: &Queue, images: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(bin("construir-host"))
        .arg("doctor")
        .arg(&q.queue)
        .args(["--config", "/dev/null", "--accel", "tcg", "--images"])
        .arg(images)
        .args(extra)
        .output()
        .expect("doctor");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), String::from_utf8(out.stdout).expect("utf8"))
}

#[test]
fn doctor_passes_a_sound_host_and_names_each_failure_with_its_fix() {
    let q = Queue::new();
    let (passed, text) = doctor(&q, construir_e2e::images(), &[]);
    assert!(passed, "{text}");
    for line in ["ok    qemu       qemu-system-x86_64 is QEMU", "ok    image      i0: mini, kernel ", "ok    dirs "] {
        assert!(text.lines().any(|l| l.starts_with(line)), "no {line:?} in:\n{text}");
    }
    // Whether free space is "ok" or "warn" is the machine's, not ours (the levels have their unit test).
    for dir in ["work", "done"] {
        let line = text.lines().find(|l| l.contains(&format!("space      {dir}: "))).unwrap_or_default();
        assert!(
            (line.starts_with("ok    ") || line.starts_with("warn  ")) && line.contains(" free on "),
            "no space line for {dir} in:\n{text}"
        );
    }
    assert!(text.contains("checksums match"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("warn  kvm        not used (accel = tcg)")), "{text}");
    assert!(text.ends_with("warning(s)\n") && text.contains("ready to run"), "{text}");

    // A damaged image: one byte of its initrd changed.
    let images = q.root.path().join("images");
    fs::create_dir_all(images.join("i0")).expect("mkdir");
    for entry in fs::read_dir(construir_e2e::images().join("i0")).expect("ls") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), images.join("i0").join(entry.file_name())).expect("copy");
    }
    let initrd = images.join("i0/initrd.img");
    let mut bytes = fs::read(&initrd).expect("read");
    bytes[100] ^= 1;
    fs::write(&initrd, bytes).expect("write");
    let (passed, text) = doctor(&q, &images, &[]);
    assert!(!passed, "{text}");
    assert!(text.contains("FAIL  image      i0: ") && text.contains("initrd.img does not match image.toml"), "{text}");
    assert!(text.contains("fix: rebuild it with image-builder"), "{text}");
    assert!(text.contains("1 problem(s) stop `construir-host run`"), "{text}");

    // No QEMU; a uid range holding an account; no queue directory.
    let (passed, text) = doctor(&q, construir_e2e::images(), &["--qemu", "/nonexistent/qemu"]);
    assert!(!passed && text.contains("FAIL  qemu       cannot run /nonexistent/qemu"), "{text}");
    assert!(text.contains("fix: apt-get install qemu-system-x86 qemu-utils"), "{text}");
    let (passed, text) = doctor(&q, construir_e2e::images(), &["--vm-ids", "65530:10"]);
    assert!(!passed && text.contains("FAIL  vm uids") && text.contains("lies inside the VM uid range"), "{text}");
    fs::remove_dir(&q.queue).expect("rmdir");
    let (passed, text) = doctor(&q, construir_e2e::images(), &[]);
    assert!(!passed && text.contains("FAIL  dirs") && text.contains("does not exist"), "{text}");
}
