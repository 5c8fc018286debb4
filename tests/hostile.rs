//! construir against hostile jobs, hostile queue entries, and a host that
//! is killed: the host holds, nothing is lost, nothing runs twice.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use construir_e2e::{job_log, job_status, proc_status, qemu_pids, signal, wait_for, Queue};

fn user_id(name: &str) -> (String, String) {
    let passwd = fs::read_to_string("/etc/passwd").expect("passwd");
    let line =
        passwd.lines().find(|l| l.starts_with(&format!("{name}:"))).expect("user exists (scripts/test creates it)");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].to_owned(), f[3].to_owned())
}

#[test]
fn qemu_runs_unprivileged_without_groups_capabilities_or_new_privileges() {
    let q = Queue::new();
    q.add_job("jailed_i0.tar.xz", "#!/bin/sh\necho sleeping\nsleep 60\n", "1m", &[]);
    let host_id = format!("{}-jail", q.host_id);
    let mut host = q.spawn("jail", &host_id, &["--stop-timeout", "2s"]);
    assert!(
        wait_for(Duration::from_secs(30), || !qemu_pids(&host_id).is_empty()),
        "no QEMU started: {}",
        q.log("jail")
    );
    let pid = qemu_pids(&host_id)[0];
    let (uid, gid) = user_id("construir");
    assert_eq!(proc_status(pid, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(proc_status(pid, "Gid"), format!("{gid}\t{gid}\t{gid}\t{gid}"));
    assert_eq!(proc_status(pid, "Groups"), "");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert_eq!(proc_status(pid, "Seccomp"), "2");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        if caps == "CapBnd" {
            continue; // the bounding set is inherited; with no effective or permitted caps it grants nothing
        }
        assert_eq!(proc_status(pid, caps), "0000000000000000", "{caps}");
    }
    let environ = fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let vars: Vec<&[u8]> = environ.split(|&b| b == 0).filter(|v| !v.is_empty()).collect();
    assert_eq!(vars.len(), 1, "only TMPDIR: {:?}", String::from_utf8_lossy(&environ));
    assert!(vars[0].starts_with(b"TMPDIR="));
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).expect("core line");
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit(") ").next().expect("fields").split(' ').collect();
    assert_eq!(fields[3], pid.to_string(), "QEMU leads its own session (sid)");
    // Files are passed as descriptors: no path of ours on its command line.
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(!cmdline
        .windows(q.root.path().as_os_str().len())
        .any(|w| w == q.root.path().as_os_str().as_encoded_bytes()));

    // SIGTERM: no new claims; the running job may go on for --stop-timeout, then back to the queue.
    signal(&host, libc::SIGTERM);
    let status = host.wait().expect("host exits");
    assert!(status.success(), "{}", q.log("jail"));
    assert!(qemu_pids(&host_id).is_empty(), "QEMU outlived the host");
    assert_eq!(Queue::list(&q.queue), ["jailed_i0.tar.xz"], "{}", q.log("jail"));
    assert!(q.log("jail").contains("back in the queue"));
}

#[test]
fn sigkill_of_the_host_takes_qemu_with_it_and_a_restart_finishes_the_job_once() {
    let q = Queue::new();
    q.add_job("survivor_i0.tar.xz", "#!/bin/sh\nsleep 5\necho finished\n", "1m", &[]);
    let host_id = format!("{}-kill", q.host_id);
    let mut host = q.spawn("first", &host_id, &[]);
    assert!(wait_for(Duration::from_secs(30), || !qemu_pids(&host_id).is_empty()), "{}", q.log("first"));
    signal(&host, libc::SIGKILL);
    host.wait().expect("reaped");
    assert!(
        wait_for(Duration::from_secs(10), || qemu_pids(&host_id).is_empty()),
        "QEMU survived a SIGKILL of its host"
    );
    let running = q.root.path().join("running").join(&host_id);
    assert_eq!(Queue::list(&running), ["survivor_i0.tar.xz"], "the claim stays where it was");

    let out = std::process::Command::new(construir_e2e::bin("construir-host"))
        .arg("run")
        .arg(&q.queue)
        .args(["--once", "--accel", "tcg", "--memory", "1G", "--cpus", "1", "--host-id", &host_id, "--images"])
        .arg(construir_e2e::images())
        .output()
        .expect("restart");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("unfinished at the last stop (attempt 1); back in the queue"), "{log}");
    assert_eq!(Queue::list(&q.done), ["survivor_d0.log", "survivor_d0.tar.xz"]);
    assert_eq!(String::from_utf8(job_log(&q.done("survivor_d0.tar.xz"))).expect("utf8"), "finished\n");
    assert_eq!(Queue::list(&running), Vec::<String>::new());
    assert_eq!(Queue::list(&q.queue), Vec::<String>::new());
    assert_eq!(log.matches("survivor_i0.tar.xz: claimed").count(), 1);
}

#[test]
fn a_job_whose_host_keeps_dying_goes_to_failed_after_its_attempts() {
    let q = Queue::new();
    let host_id = q.host_id.clone();
    let running = q.root.path().join("running").join(&host_id);
    fs::create_dir_all(&running).expect("mkdir");
    let file = q.add_job("crashy_i0.tar.xz", "#!/bin/sh\necho hi\n", "1m", &[]);
    fs::rename(&file, running.join("crashy_i0.tar.xz")).expect("as if claimed");
    let attempts = q.root.path().join("running/.attempts");
    fs::create_dir_all(&attempts).expect("mkdir");
    fs::write(attempts.join("crashy_i0.tar.xz.attempts"), "2\n").expect("write");
    let run = q.run(&["--max-attempts", "3"]);
    assert!(run.success, "{}", run.log);
    assert!(!run.log.contains("booting"), "{}", run.log);
    let reason = fs::read_to_string(q.failed.join("crashy_i0.tar.xz.reason")).expect("reason");
    assert!(reason.contains("the host stopped 3 times while running this job"), "{reason}");
    assert!(!attempts.join("crashy_i0.tar.xz.attempts").exists(), "the count is forgotten once the job is settled");
}

#[test]
fn two_hosts_on_one_queue_run_every_job_exactly_once() {
    let q = Queue::new();
    for i in 1..=4 {
        q.add_job(&format!("shared{i}_i0.tar.xz"), &format!("#!/bin/sh\nsleep 2\necho job {i}\n"), "1m", &[]);
    }
    let hosts: Vec<_> =
        ["a", "b"].iter().map(|t| (t, q.spawn(t, &format!("{}-{t}", q.host_id), &["--once"]))).collect();
    let mut claims = 0;
    for (tag, mut child) in hosts {
        assert!(child.wait().expect("host").success(), "{}", q.log(tag));
        claims += q.log(tag).matches(": claimed").count();
    }
    assert_eq!(claims, 4, "host a:\n{}\nhost b:\n{}", q.log("a"), q.log("b"));
    for i in 1..=4 {
        assert_eq!(
            String::from_utf8(job_log(&q.done(&format!("shared{i}_d0.tar.xz")))).expect("utf8"),
            format!("job {i}\n")
        );
    }
    assert_eq!(Queue::list(&q.done).len(), 8);
    assert_eq!(Queue::list(&q.failed), Vec::<String>::new());
}

#[test]
fn hostile_queue_entries_are_refused_without_touching_what_they_point_to() {
    let q = Queue::new();
    let outside = q.root.path().join("precious");
    fs::write(&outside, vec![7u8; 100_000]).expect("write");
    fs::hard_link(&outside, q.queue.join("hardlink_i0.tar.xz")).expect("hardlink");
    std::os::unix::fs::symlink(&outside, q.queue.join("symlink_i0.tar.xz")).expect("symlink");
    nix_mkfifo(&q.queue.join("fifo_i0.tar.xz"));
    let _sock = std::os::unix::net::UnixListener::bind(q.queue.join("sock_i0.tar.xz")).expect("socket");
    fs::write(q.queue.join("empty_i0.tar.xz"), b"").expect("empty");
    let huge = fs::File::create(q.queue.join("huge_i0.tar.xz")).expect("create");
    huge.set_len(100 << 30).expect("sparse 100 GiB");
    fs::write(q.queue.join("esc\x1b[31mred_i0.tar.xz"), vec![0u8; 70_000]).expect("control chars");
    use std::os::unix::ffi::OsStrExt;
    fs::write(q.queue.join(std::ffi::OsStr::from_bytes(b"invalid\xff\xfe_i0.tar.xz")), vec![0u8; 70_000])
        .expect("invalid utf-8");
    // A job whose size is not a multiple of 512 still runs.
    let odd = q.add_job("odd_i0.tar.xz", "#!/bin/sh\necho odd size\n", "100001", &[]);
    assert_eq!(fs::metadata(&odd).expect("stat").len(), 100_001);
    // A result of the same name is already in done/: it is never replaced.
    fs::create_dir_all(&q.done).expect("mkdir");
    fs::write(q.done("taken_d0.tar.xz"), b"an earlier result").expect("write");
    q.add_job("taken_i0.tar.xz", "#!/bin/sh\necho second run\n", "1m", &[]);
    for p in [q.root.path(), &q.queue] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    let run = q.run(&["--max-size", "64G"]);
    assert!(run.success, "{}", run.log);
    assert!(!run.log.contains('\x1b'), "an escape sequence reached the host's log");
    assert_eq!(fs::read(&outside).expect("precious"), vec![7u8; 100_000]);
    let reason = |name: &str| {
        fs::read_to_string(q.failed.join(format!("{name}.reason"))).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert!(reason("hardlink_i0.tar.xz").contains("hardlinked"));
    assert!(reason("symlink_i0.tar.xz").contains("a symlink"));
    assert!(reason("fifo_i0.tar.xz").contains("not a regular file"));
    assert!(reason("sock_i0.tar.xz").contains("not a regular file"));
    assert!(reason("empty_i0.tar.xz").contains("0 bytes is too small"));
    assert!(reason("huge_i0.tar.xz").contains("larger than this host accepts"));
    assert!(reason("esc\x1b[31mred_i0.tar.xz").contains("bad job file name"));
    assert!(fs::read_dir(&q.failed).expect("ls").any(|e| e
        .expect("e")
        .file_name()
        .to_string_lossy()
        .contains("invalid")));
    assert!(fs::symlink_metadata(q.failed.join("symlink_i0.tar.xz")).expect("moved").file_type().is_symlink());
    assert_eq!(String::from_utf8(job_log(&q.done("odd_d0.tar.xz"))).expect("utf8"), "odd size\n");
    assert_eq!(fs::read(q.done("taken_d0.tar.xz")).expect("kept"), b"an earlier result");
    assert!(reason("taken_d0.tar.xz").contains("already exists"), "the second result is kept in failed/");
    assert_eq!(Queue::list(&q.queue), Vec::<String>::new());
}

fn nix_mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn a_file_still_being_written_is_not_claimed_until_it_settles() {
    let q = Queue::new();
    let complete = q.add_job("slowupload_i0.tar.xz", "#!/bin/sh\necho uploaded whole\n", "1m", &[]);
    let bytes = fs::read(&complete).expect("read");
    fs::remove_file(&complete).expect("rm");
    // Write the first half now, the rest 2 s later: a claim in between would see a broken archive.
    let path = q.queue.join("slowupload_i0.tar.xz");
    fs::write(&path, &bytes[..bytes.len() / 2]).expect("first half");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&bytes[bytes.len() / 2..]).expect("second half");
    });
    let run = q.run(&["--settle", "3s"]);
    writer.join().expect("writer");
    assert!(run.success, "{}", run.log);
    let result = q.done("slowupload_d0.tar.xz");
    assert_eq!(job_status(&result)["result"], "ok", "{}", run.log);
    assert_eq!(String::from_utf8(job_log(&result)).expect("utf8"), "uploaded whole\n");
}

#[test]
fn hostile_guests_end_in_a_verdict_and_the_host_holds() {
    let q = Queue::new();
    let jobs: [(&str, &str); 6] = [
        ("reboots", "#!/bin/sh\necho rebooting\nreboot -f\nsleep 60\n"),
        ("panics", "#!/bin/sh\necho crashing the kernel\necho c > /proc/sysrq-trigger\nsleep 60\n"),
        ("scribbles", "#!/bin/sh\necho scribbling\nhead -c 2000000 /dev/urandom > /dev/vda\nsync\npoweroff -f\nsleep 60\n"),
        ("forkbomb", "#!/bin/sh\necho bombing\nb() { b | b & }; b\nsleep 600\n"),
        ("hog", "#!/bin/sh\necho eating memory\nawk 'BEGIN { s = \"x\"; while (1) s = s s }'\necho awk ended: $?\necho hog survived\n"),
        ("escapes", "#!/bin/sh\ni=0\nwhile [ $i -lt 200 ]; do printf '\\033[2J\\033]0;pwned\\007\\033[31mred\\033[0m\\r\\n'; i=$((i+1)); done\necho done escaping\n"),
    ];
    for (name, script) in jobs {
        q.add_job(&format!("{name}_i0.tar.xz"), script, "8m", &[]);
    }
    let run = q.run(&["--workers", "2", "--timeout", "40s", "--grace", "60s"]);
    assert!(run.success, "{}", run.log);
    let reason = |name: &str| {
        fs::read_to_string(q.failed.join(format!("{name}_i0.tar.xz.reason")))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", run.log))
    };
    assert!(reason("reboots").contains("VM powered off"), "{}", reason("reboots"));
    assert!(reason("panics").contains("the guest kernel panicked"), "{}", reason("panics"));
    assert!(reason("scribbles").contains("no job_status.json"), "{}", reason("scribbles"));
    for name in ["reboots", "panics", "scribbles"] {
        let log = fs::read_to_string(q.failed.join(format!("{name}_i0.tar.xz.log"))).expect("log");
        assert!(log.lines().last().expect("verdict").starts_with("construir-host: verdict: failed"), "{log}");
    }
    // The bomb's shell either fails to fork (exit 2) or runs to the timeout; either way
    // init kills and reaps every process it left before packing.
    let bomb = job_status(&q.done("forkbomb_d0.tar.xz"));
    assert!(bomb["result"] == "failed" || bomb["result"] == "timed_out", "{bomb}");
    assert!(bomb["timed_out"] == true || bomb["killed_leftovers"].as_u64().expect("count") > 100, "{bomb}");
    // The OOM killer takes the hog (SIGKILL, 137); the script, init and the host go on.
    let hog = job_status(&q.done("hog_d0.tar.xz"));
    assert_eq!(hog["result"], "ok", "{hog}");
    let hog_log = String::from_utf8(job_log(&q.done("hog_d0.tar.xz"))).expect("utf8");
    assert!(hog_log.contains("awk ended: 137\nhog survived\n"), "{hog_log}");
    let esc_log = fs::read(q.done("escapes_d0.log")).expect("log");
    assert!(!esc_log.iter().any(|&b| b == 0x1b || b == 0x07 || b == b'\r'), "control bytes in the host's log");
    assert!(String::from_utf8_lossy(&esc_log).contains("done escaping"));
    assert_eq!(Queue::list(&q.queue), Vec::<String>::new());
}

#[test]
fn a_job_cannot_forge_or_hide_its_status() {
    let q = Queue::new();
    // A fake status in /job, and a status name that is a link: the real status (from init's memory) wins.
    q.add_job(
        "forger_i0.tar.xz",
        "#!/bin/sh\necho '{\"result\":\"ok\",\"exit_code\":0}' > job_status.json\nexit 5\n",
        "1m",
        &[],
    );
    q.add_job("hider_i0.tar.xz", "#!/bin/sh\nln -s /etc/passwd job_status.json\nexit 6\n", "1m", &[]);
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    for (name, code) in [("forger", 5), ("hider", 6)] {
        let result = q.done(&format!("{name}_d0.tar.xz"));
        let status = job_status(&result);
        assert_eq!(
            (status["result"].as_str(), status["exit_code"].as_i64()),
            (Some("failed"), Some(code)),
            "{name}: {status}"
        );
        let listing = String::from_utf8(construir_e2e::job_tool("list", &result).stdout).expect("utf8");
        assert_eq!(listing.matches("job_status.json").count(), 1, "{listing}");
    }
}

#[test]
fn a_silent_vm_is_ended_after_the_silence_timeout() {
    let q = Queue::new();
    q.add_job("quiet_i0.tar.xz", "#!/bin/sh\nsleep 120\n", "1m", &[]);
    let run = q.run(&["--silence-timeout", "15s", "--timeout", "10m"]);
    assert!(run.success, "{}", run.log);
    assert!(run.elapsed < Duration::from_secs(70), "{:?}", run.elapsed);
    let reason = fs::read_to_string(q.failed.join("quiet_i0.tar.xz.reason")).expect("reason");
    assert!(reason.contains("no console output for 15 s"), "{reason}");
    // Ended for the job's silence, not a slow boot's: the job had started.
    let log = fs::read_to_string(q.failed.join("quiet_i0.tar.xz.log")).expect("log");
    assert!(log.contains("running bin/construir"), "{log}");
}

#[test]
fn the_host_keeps_flat_memory_while_a_guest_floods_it() {
    let q = Queue::new();
    let flood = "#!/bin/sh\ni=0\nwhile [ $i -lt 100000 ]; do printf '\\033[2J%s\\r\\n' \"$i flooding the console with escapes and text\"; i=$((i+1)); done\n";
    q.add_job("flood_i0.tar.xz", flood, "4m", &[]);
    q.add_job("other_i0.tar.xz", "#!/bin/sh\necho unaffected\n", "1m", &[]);
    let host_id = format!("{}-mem", q.host_id);
    let mut host = q.spawn("mem", &host_id, &["--once", "--workers", "2", "--log-limit", "1M", "--timeout", "5m"]);
    let mut peak_kib = 0u64;
    while host.try_wait().expect("wait").is_none() {
        if let Ok(rss) = fs::read_to_string(format!("/proc/{}/status", host.id())) {
            let kib = rss
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok());
            peak_kib = peak_kib.max(kib.unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = fs::read(q.done("flood_d0.log")).expect("log");
    assert!(log.len() <= (1 << 20) + 1024, "log of {} bytes", log.len());
    assert!(!log.contains(&0x1b));
    assert_eq!(String::from_utf8(job_log(&q.done("other_d0.tar.xz"))).expect("utf8"), "unaffected\n");
    eprintln!("host peak resident memory: {peak_kib} KiB");
    assert!(peak_kib > 0 && peak_kib < 64 << 10, "the host's memory grew to {peak_kib} KiB");
}
