//! Jobs through a real queue and real VMs (TCG), as a build machine runs them.

use std::fs;
use std::time::Duration;

use construir_e2e::{job_log, job_status, job_tool, sh, Queue};

#[test]
fn a_hand_made_job_comes_back_in_done_with_its_output() {
    let q = Queue::new();
    let script = "#!/bin/sh\necho \"hello from $CONSTRUIR_JOB on $(hostname)\"\nuname -s\necho built > artifact.txt\necho \"lo $(cat /sys/class/net/lo/operstate) $(ls /sys/class/net | tr '\\n' ' ')\" > net.txt\n";
    q.add_job("hello_i0.tar.xz", script, "10m", &[("src/input.txt", b"input data\n")]);
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    assert_eq!(Queue::list(&q.queue), Vec::<String>::new());
    assert_eq!(Queue::list(&q.done), ["hello_d0.intoto.jsonl", "hello_d0.log", "hello_d0.tar.xz"]);
    assert_eq!(Queue::list(&q.failed), Vec::<String>::new());
    let result = q.done("hello_d0.tar.xz");
    // Signed by this host's key, made at its first start beside the queue.
    let key = std::process::Command::new(construir_e2e::bin("construir-host"))
        .arg("key")
        .arg(&q.queue)
        .args(["--host-id", &q.host_id])
        .output()
        .expect("construir-host key");
    let key = String::from_utf8_lossy(&key.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    let verified = std::process::Command::new(construir_e2e::bin("construir-host"))
        .args(["job", "verify"])
        .arg(&result)
        .args(["--key", &key])
        .output()
        .expect("job verify");
    let said = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "{said}{}", String::from_utf8_lossy(&verified.stderr));
    assert!(
        said.contains(&format!("signed by {key} (construir-host:{})", q.host_id)) && said.contains("image i0"),
        "{said}"
    );
    assert_eq!(String::from_utf8(job_log(&result)).expect("utf8"), "hello from hello on construir\nLinux\n");
    let status = job_status(&result);
    assert_eq!((status["result"].as_str(), status["exit_code"].as_i64()), (Some("ok"), Some(0)));
    assert_eq!(status["job"], "hello");
    assert_eq!(status["image"], "0");
    // The whole of /job comes back, trimmed of its padding, readable by GNU tar.
    let size = fs::metadata(&result).expect("stat").len();
    assert!(size < 64 << 10, "trailing zeros trimmed: {size} bytes");
    let listing = sh(&format!("tar -tJf '{}'", result.display()), q.root.path());
    assert_eq!(
        listing,
        "job_status.json\njob_output.txt\nartifact.txt\nbin/\nbin/construir\nnet.txt\nsrc/\nsrc/input.txt\n"
    );
    // Loopback is up and is the only interface.
    let net = sh(&format!("tar -xJOf '{}' net.txt", result.display()), q.root.path());
    assert_eq!(net, "lo unknown lo \n");
    let log = fs::read_to_string(q.done("hello_d0.log")).expect("log");
    assert!(log.contains("hello from hello on construir"), "{log}");
    assert!(log.lines().last().expect("verdict").starts_with("construir-host: verdict: ok (exit code 0)"), "{log}");
    assert!(
        run.log.contains("job hello_i0.tar.xz: claimed") && run.log.contains("job hello_i0.tar.xz: done: ok"),
        "{}",
        run.log
    );
}

#[test]
fn a_host_started_under_a_restrictive_umask_still_runs_its_jailed_vms() {
    // A service's UMask=0027, or a batch job's inherited umask: the jail's root must stay searchable.
    let q = Queue::new();
    q.add_job("masked_i0.tar.xz", "#!/bin/sh\necho under umask 027\n", "1m", &[]);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 027 && exec \"$0\" run \"$1\" --once --accel tcg --memory 1G --cpus 1 --host-id \"$2\" --images \"$3\"")
        .arg(construir_e2e::bin("construir-host"))
        .arg(&q.queue)
        .arg(&q.host_id)
        .arg(construir_e2e::images())
        .output()
        .expect("construir-host");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(String::from_utf8(job_log(&q.done("masked_d0.tar.xz"))).expect("utf8"), "under umask 027\n", "{log}");
}

#[test]
fn a_script_that_exits_3_is_failed_with_its_output_delivered() {
    let q = Queue::new();
    q.add_job("three_i0.tar.xz", "#!/bin/sh\necho about to fail\necho on stderr >&2\nexit 3\n", "1m", &[]);
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    let result = q.done("three_d0.tar.xz");
    let status = job_status(&result);
    assert_eq!(
        (status["result"].as_str(), status["exit_code"].as_i64(), status["timed_out"].as_bool()),
        (Some("failed"), Some(3), Some(false))
    );
    assert_eq!(String::from_utf8(job_log(&result)).expect("utf8"), "about to fail\non stderr\n");
}

#[test]
fn a_job_past_its_timeout_is_killed_and_its_output_kept() {
    let q = Queue::new();
    q.add_job("slow_i0.tar.xz", "#!/bin/sh\necho before the sleep\nsleep 600\necho after the sleep\n", "1m", &[]);
    let run = q.run(&["--timeout", "20s", "--grace", "60s"]);
    assert!(run.success, "{}", run.log);
    assert!(run.elapsed < Duration::from_secs(80), "the VM outlived timeout plus grace: {:?}", run.elapsed);
    assert!(run.elapsed >= Duration::from_secs(20), "the job did not get its 20 s: {:?}", run.elapsed);
    let result = q.done("slow_d0.tar.xz");
    let status = job_status(&result);
    assert_eq!(
        (status["result"].as_str(), status["timed_out"].as_bool(), status["signal"].as_i64()),
        (Some("timed_out"), Some(true), Some(9))
    );
    let ran = status["duration_secs"].as_f64().expect("duration");
    assert!((19.5..30.0).contains(&ran), "ran {ran} s");
    // No packages: the guest's stages alone, the job's as long as it ran.
    let stages = status["stages"].as_array().expect("stages");
    let names: Vec<&str> = stages.iter().filter_map(|s| s["stage"].as_str()).collect();
    assert_eq!(names, ["boot", "unpack", "job"], "{status}");
    assert_eq!(stages[2]["secs"].as_f64(), Some(ran));
    assert!(stages[0]["secs"].as_f64().is_some_and(|b| b > 0.0 && b < 60.0), "{status}");
    assert_eq!(String::from_utf8(job_log(&result)).expect("utf8"), "before the sleep\n");
}

#[test]
fn output_larger_than_the_file_comes_back_as_output_too_large_with_its_tail() {
    let q = Queue::new();
    let script = "#!/bin/sh\nhead -c 2000000 /dev/urandom > noise.bin\ni=0\nwhile [ $i -lt 3000 ]; do echo \"line $i\"; i=$((i+1)); done\necho last line\n";
    q.add_job("big_i0.tar.xz", script, "256k", &[]);
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    let result = q.done("big_d0.tar.xz");
    let status = job_status(&result);
    assert_eq!((status["result"].as_str(), status["exit_code"].as_i64()), (Some("output_too_large"), Some(0)));
    // Packing stopped at 2 x 256 KiB + 1 MiB, well before the 2 MB of noise: the figure is an estimate.
    let needed = status["needed_bytes"].as_u64().expect("needed_bytes");
    assert!(needed.abs_diff(2_050_000) < 200_000, "needed {needed}");
    assert_eq!(status["needed_bytes_estimated"], true, "{status}");
    assert_eq!(status["capacity_bytes"].as_u64(), Some(256 << 10));
    let log = String::from_utf8(job_log(&result)).expect("utf8");
    assert!(
        log.ends_with("line 2999\nlast line\n"),
        "the tail of the output is kept: {:?}",
        &log[log.len().saturating_sub(40)..]
    );
    let listing = String::from_utf8(job_tool("list", &result).stdout).expect("utf8");
    assert_eq!(listing.lines().count(), 2, "only the status and the output: {listing}");
    assert!(fs::metadata(&result).expect("stat").len() <= 64 << 10);
}

#[test]
fn bad_names_unknown_images_and_bad_files_are_refused_without_booting() {
    let q = Queue::new();
    q.add_job("bad name_i0.tar.xz", "#!/bin/sh\necho x\n", "1m", &[]);
    q.add_job("noimage_i7.tar.xz", "#!/bin/sh\necho x\n", "1m", &[]);
    fs::write(q.queue.join("tiny_i0.tar.xz"), b"too small").expect("write");
    fs::create_dir(q.queue.join("adir_i0.tar.xz")).expect("mkdir");
    fs::write(q.queue.join("notes.txt"), b"not a job").expect("write");
    // Uploads in progress are left alone.
    fs::write(q.queue.join(".partial_i0.tar.xz"), b"uploading").expect("write");
    fs::write(q.queue.join("upload_i0.tar.xz.part"), b"uploading").expect("write");
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    assert!(!run.log.contains("booting"), "no VM may boot: {}", run.log);
    assert_eq!(Queue::list(&q.queue), ["upload_i0.tar.xz.part"]);
    assert!(q.queue.join(".partial_i0.tar.xz").exists());
    assert_eq!(Queue::list(&q.done), Vec::<String>::new());
    let reason = |name: &str| q.reason(name);
    assert!(reason("bad name_i0.tar.xz").contains("bad job file name: job name contains ' '"));
    assert!(reason("noimage_i7.tar.xz").contains("unknown image i7"));
    assert!(reason("tiny_i0.tar.xz").contains("9 bytes is too small"));
    assert!(reason("adir_i0.tar.xz").contains("a directory"));
    assert!(reason("notes.txt").contains("does not end in .tar.xz"));
    assert!(q.refusal("adir_i0.tar.xz").0.is_dir(), "moved, not deleted");
}

#[test]
fn three_jobs_with_two_workers_all_finish_and_two_run_at_once() {
    let q = Queue::new();
    for i in 1..=3 {
        q.add_job(&format!("par{i}_i0.tar.xz"), &format!("#!/bin/sh\nsleep 3\necho job {i}\n"), "1m", &[]);
    }
    let run = q.run(&["--workers", "2"]);
    assert!(run.success, "{}", run.log);
    for i in 1..=3 {
        assert_eq!(
            String::from_utf8(job_log(&q.done(&format!("par{i}_d0.tar.xz")))).expect("utf8"),
            format!("job {i}\n")
        );
    }
    // Two VMs booted before the first job was done.
    let first_done = run.log.find(": done:").expect("a done line");
    assert_eq!(run.log[..first_done].matches(": booting image").count(), 2, "{}", run.log);
    assert_eq!(run.log.matches(": booting image").count(), 3, "{}", run.log);
}

#[test]
fn renamed_in_jobs_are_claimed_at_once_in_arrival_order_and_files_written_in_place_settle() {
    let q = Queue::new();
    let staging = q.root.path().join("staging");
    fs::create_dir(&staging).expect("mkdir");
    for name in ["zulu", "mike", "alpha", "inplace"] {
        let queued = q.add_job(&format!("{name}_i0.tar.xz"), &format!("#!/bin/sh\necho {name}\n"), "1m", &[]);
        let staged = staging.join(format!("{name}_i0.tar.xz"));
        fs::rename(&queued, &staged).expect("out of the queue");
        sh(&format!("touch '{}'", staged.display()), q.root.path()); // written just now
    }
    // An hour's settle: only a rename into the queue can be claimed within this test.
    let mut host = q.spawn("order", &q.host_id, &["--workers", "1", "--settle", "1h"]);
    assert!(
        construir_e2e::wait_for(Duration::from_secs(30), || q.log("order").contains("watching")),
        "{}",
        q.log("order")
    );
    for name in ["zulu", "mike", "alpha"] {
        fs::rename(staging.join(format!("{name}_i0.tar.xz")), q.queue.join(format!("{name}_i0.tar.xz"))).expect("mv");
    }
    // Written in place (a copy, not a rename): it must wait for the settle time.
    fs::copy(staging.join("inplace_i0.tar.xz"), q.queue.join("inplace_i0.tar.xz")).expect("cp");
    let all_done = construir_e2e::wait_for(Duration::from_secs(240), || {
        ["zulu", "mike", "alpha"].iter().all(|n| q.done(&format!("{n}_d0.tar.xz")).exists())
    });
    construir_e2e::signal(&host, libc::SIGTERM);
    let status = host.wait().expect("wait");
    let log = q.log("order");
    assert!(all_done && status.success(), "{log}");
    let claims: Vec<&str> = log.lines().filter_map(|l| l.split("job ").nth(1)?.strip_suffix(": claimed")).collect();
    assert_eq!(claims, ["zulu_i0.tar.xz", "mike_i0.tar.xz", "alpha_i0.tar.xz"], "{log}");
    for name in ["zulu", "mike", "alpha"] {
        assert_eq!(
            String::from_utf8(job_log(&q.done(&format!("{name}_d0.tar.xz")))).expect("utf8"),
            format!("{name}\n")
        );
    }
    assert_eq!(Queue::list(&q.queue), ["inplace_i0.tar.xz"], "a file written in place waits to settle: {log}");
    assert_eq!(Queue::list(&q.failed), Vec::<String>::new(), "nothing is refused while it is written: {log}");
}

#[test]
fn a_flood_of_output_keeps_the_host_log_within_its_cap() {
    let q = Queue::new();
    let script = "#!/bin/sh\nyes 'a line of flood output, forty-odd bytes' | head -c 20971520\necho END\n";
    q.add_job("flood_i0.tar.xz", script, "4m", &[]);
    let run = q.run(&["--log-limit", "64k"]);
    assert!(run.success, "{}", run.log);
    let log_size = fs::metadata(q.done("flood_d0.log")).expect("log").len();
    assert!(log_size <= (64 << 10) + 1024, "the host's log is {log_size} bytes");
    let log = fs::read_to_string(q.done("flood_d0.log")).expect("log");
    assert!(log.contains("bytes of console output dropped here]"), "the cut is marked");
    assert!(
        log.ends_with('\n') && log.lines().last().expect("line").starts_with("construir-host: verdict: ok"),
        "{}",
        &log[log.len() - 300..]
    );
    // The result itself has every byte.
    let output = job_log(&q.done("flood_d0.tar.xz"));
    assert_eq!(output.len(), 20_971_520 + 4);
    assert!(output.ends_with(b"END\n"));
}

#[test]
fn processes_a_job_leaves_running_are_killed_before_packing() {
    let q = Queue::new();
    // Two tickers (one ignores SIGTERM), one in a session of its own, and a
    // sleeper. At exit the script records how far the tickers got; if init
    // did not stop them they would go on ticking while it packs.
    let script = "#!/bin/sh
tick() { while true; do echo tick >> $1; sleep 0.1; done; }
tick ticks.txt &
(trap '' TERM; tick stubborn.txt) &
setsid sh -c 'sleep 500; echo escaped > escaped.txt' &
(sleep 600; echo late > late.txt) &
sleep 2
wc -l < ticks.txt > ticks_at_exit.txt
wc -l < stubborn.txt > stubborn_at_exit.txt
echo started four background jobs
";
    q.add_job("bg_i0.tar.xz", script, "1m", &[]);
    let run = q.run(&["--timeout", "5m"]);
    assert!(run.success, "{}", run.log);
    assert!(run.elapsed < Duration::from_secs(60), "init waited for the background processes: {:?}", run.elapsed);
    let result = q.done("bg_d0.tar.xz");
    let status = job_status(&result);
    assert_eq!(status["result"], "ok");
    let killed = status["killed_leftovers"].as_u64().expect("killed_leftovers");
    assert!(killed >= 4, "killed {killed} leftover processes");
    assert_eq!(String::from_utf8(job_log(&result)).expect("utf8"), "started four background jobs\n");
    let out = q.root.path().join("out");
    let unpacked = job_tool_unpack(&result, &out);
    assert!(unpacked, "job unpack");
    let read = |f: &str| fs::read_to_string(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let lines = |f: &str| read(f).lines().count() as i64;
    let number = |f: &str| -> i64 { read(f).trim().parse().expect("number") };
    let (ticks, ticks_at_exit) = (lines("ticks.txt"), number("ticks_at_exit.txt"));
    let (stubborn, stubborn_at_exit) = (lines("stubborn.txt"), number("stubborn_at_exit.txt"));
    // SIGTERM stops the first ticker at once; the stubborn one lasts until SIGKILL, 2 s later.
    assert!(ticks - ticks_at_exit <= 3, "ticker ran on: {ticks_at_exit} at exit, {ticks} packed");
    assert!(
        (stubborn - stubborn_at_exit) <= 30,
        "stubborn ticker ran on: {stubborn_at_exit} at exit, {stubborn} packed"
    );
    assert!(!out.join("late.txt").exists() && !out.join("escaped.txt").exists());
}

fn job_tool_unpack(result: &std::path::Path, dir: &std::path::Path) -> bool {
    std::process::Command::new(construir_e2e::bin("construir-host"))
        .args(["job", "unpack"])
        .arg(result)
        .arg(dir)
        .status()
        .expect("run")
        .success()
}

#[test]
fn bytes_after_the_stream_in_the_input_do_not_survive_in_the_result() {
    let q = Queue::new();
    let file = q.add_job("pad_i0.tar.xz", "#!/bin/sh\necho small\n", "2m", &[]);
    // Non-zero bytes where the padding should be: the guest must not carry them out.
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open")
        .write_all_at(b"SECRET-LEFTOVER-BYTES", 1 << 20)
        .expect("write");
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    let result = fs::read(q.done("pad_d0.tar.xz")).expect("result");
    assert!(result.len() < 64 << 10, "{} bytes: something after the stream survived", result.len());
    assert!(!result.windows(6).any(|w| w == b"SECRET"));
    assert_eq!(job_status(&q.done("pad_d0.tar.xz"))["result"], "ok");
}

#[test]
fn a_job_without_a_script_and_a_file_that_is_no_archive_come_back_with_a_status() {
    let q = Queue::new();
    let dir = q.root.path().join("noscript");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("README"), "no bin/construir here\n").expect("write");
    sh(&format!("tar -cJf ../noscript_i0.tar.xz . && truncate --size 1m ../noscript_i0.tar.xz && mv ../noscript_i0.tar.xz '{}'", q.queue.display()), &dir);
    sh(&format!("head -c 200000 /dev/urandom > '{}/junk_i0.tar.xz'", q.queue.display()), q.root.path());
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    let status = job_status(&q.done("noscript_d0.tar.xz"));
    assert_eq!(status["result"], "no_job_script");
    let status = job_status(&q.done("junk_d0.tar.xz"));
    assert_eq!(status["result"], "bad_archive");
    assert!(status["message"].as_str().expect("message").contains("not an xz file"), "{status}");
}

#[test]
fn a_vm_killed_at_the_hard_deadline_sends_the_job_to_failed_with_its_log() {
    let q = Queue::new();
    q.add_job("stuck_i0.tar.xz", "#!/bin/sh\necho never runs\n", "1m", &[]);
    // A guest that hangs before init's own watchdog exists (an init that only sleeps):
    // with the boot deadline out of the way, the host's hard limit (8 s + 1 s grace) ends it.
    let images = construir_e2e::never_booting_images(q.root.path());
    let run = q.run_with_images(&images, &["--timeout", "8s", "--grace", "1s", "--boot-timeout", "5m"]);
    assert!(run.success, "{}", run.log);
    assert_eq!(Queue::list(&q.done), Vec::<String>::new());
    assert_eq!(Queue::list(&q.failed), ["stuck_i0.tar.xz", "stuck_i0.tar.xz.log", "stuck_i0.tar.xz.reason"]);
    let reason = fs::read_to_string(q.failed.join("stuck_i0.tar.xz.reason")).expect("reason");
    assert!(reason.contains("VM killed after 9") && reason.contains("without a clean power-off"), "{reason}");
    let log = fs::read_to_string(q.failed.join("stuck_i0.tar.xz.log")).expect("log");
    assert!(log.lines().last().expect("verdict").starts_with("construir-host: verdict: failed: no result"), "{log}");
    // The job file itself is kept unchanged for the submitter.
    assert_eq!(job_tool("list", &q.failed.join("stuck_i0.tar.xz")).status.code(), Some(0));
}

#[test]
fn a_root_disk_that_never_appears_ends_the_vm_with_the_reason_and_the_job_disk_untouched() {
    let q = Queue::new();
    // The mini image, told to switch to a root disk this VM does not have.
    let images = q.root.path().join("images");
    let image = images.join("i7");
    fs::create_dir_all(&image).expect("mkdir");
    for entry in fs::read_dir(construir_e2e::images().join("i0")).expect("i0") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), image.join(entry.file_name())).expect("copy");
    }
    let manifest = fs::read_to_string(image.join("image.toml")).expect("manifest");
    let changed =
        manifest.replace("cmdline = \"rdinit=/init\"", "cmdline = \"rdinit=/init root=/dev/vdz construir.wait=2\"");
    assert_ne!(manifest, changed, "the mini image's command line moved");
    fs::write(image.join("image.toml"), changed).expect("write");
    q.add_job("noroot_i7.tar.xz", "#!/bin/sh\necho ran anyway\n", "1m", &[]);
    let run = q.run_with_images(&images, &[]);
    assert!(run.success, "{}", run.log);
    let reason = q.reason("noroot_i7.tar.xz");
    assert!(reason.contains("no job_status.json"), "{reason}");
    let log = fs::read_to_string(q.failed.join("noroot_i7.tar.xz.log")).expect("log");
    assert!(
        log.contains("cannot set up the VM: the root disk /dev/vdz did not appear within 2 s; powering off without running the job"),
        "{log}"
    );
    assert!(!log.contains("ran anyway"), "{log}");
}

/// `construir-host run-one FILE`: one job without a queue, its result
/// beside the file, the exit code following the job.
#[test]
fn run_one_runs_a_single_job_file_and_exits_as_the_job_did() {
    use std::process::Command;
    let q = Queue::new();
    let jobs = q.root.path().join("jobs");
    fs::create_dir_all(&jobs).expect("mkdir");
    let out = q.root.path().join("out");
    let mut files = Vec::new();
    for (name, script) in
        [("good", "#!/bin/sh\necho \"good job on $(hostname)\"\n"), ("bad", "#!/bin/sh\necho failing\nexit 3\n")]
    {
        let file = format!("{name}_i0.tar.xz");
        let queued = q.add_job(&file, script, "1M", &[]);
        fs::rename(&queued, jobs.join(&file)).expect("out of the queue");
        files.push(jobs.join(&file));
    }
    let run_one = |file: &std::path::Path, extra: &[&str]| {
        Command::new(construir_e2e::bin("construir-host"))
            .arg("run-one")
            .arg(file)
            .args(["--accel", "tcg", "--memory", "1G", "--cpus", "1", "--host-id", &q.host_id, "--images"])
            .arg(construir_e2e::images())
            .args(extra)
            .output()
            .expect("run-one")
    };
    let before = fs::read(&files[0]).expect("read");
    let good = run_one(&files[0], &[]);
    assert_eq!(good.status.code(), Some(0), "{}", String::from_utf8_lossy(&good.stderr));
    assert_eq!(String::from_utf8_lossy(&good.stdout).trim(), jobs.join("good_d0.tar.xz").display().to_string());
    assert!(String::from_utf8_lossy(&good.stderr).contains("good_i0.tar.xz: ok (exit code 0)"));
    assert_eq!(fs::read(&files[0]).expect("read"), before, "the job file is left as it was");
    assert_eq!(String::from_utf8(job_log(&jobs.join("good_d0.tar.xz"))).expect("utf8"), "good job on construir\n");
    assert!(fs::read_to_string(jobs.join("good_d0.log")).expect("log").contains("verdict: ok (exit code 0)"));

    let bad = run_one(&files[1], &["--out", out.to_str().expect("utf8")]);
    assert_eq!(bad.status.code(), Some(1), "{}", String::from_utf8_lossy(&bad.stderr));
    let status = job_status(&out.join("bad_d0.tar.xz"));
    assert_eq!((status["result"].as_str(), status["exit_code"].as_i64()), (Some("failed"), Some(3)));
    assert!(String::from_utf8(job_log(&out.join("bad_d0.tar.xz"))).expect("utf8").contains("failing"));

    // A result in the way, a bad name, a missing file: it could not run (2), and says why.
    let again = run_one(&files[0], &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    fs::write(jobs.join("no-image-number.tar.xz"), b"x").expect("write");
    let misnamed = run_one(&jobs.join("no-image-number.tar.xz"), &[]);
    assert_eq!(misnamed.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&misnamed.stderr).contains("not a job file name"));
    assert_eq!(run_one(&jobs.join("missing_i0.tar.xz"), &[]).status.code(), Some(2));
    let configured = run_one(&files[1], &["--config", "/dev/null"]);
    assert_eq!(configured.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&configured.stderr).contains("reads no config file"));
    // No spool left behind.
    assert!(construir_e2e::qemu_pids(&q.host_id).is_empty());
}
