//! construir against hostile jobs, hostile queue entries, and a host that
//! is killed: the host holds, nothing is lost, nothing runs twice.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use construir_e2e::{job_log, job_status, never_booting_images, proc_status, qemu_pids, signal, wait_for, Queue};

/// The default range VMs' uids come from (`--vm-ids`).
const VM_IDS: std::ops::RangeInclusive<u32> = 1_879_048_192..=1_879_048_447;

fn uid_of(pid: u32) -> u32 {
    proc_status(pid, "Uid").split_whitespace().next().expect("uid").parse().expect("number")
}

fn ns(pid: &str, kind: &str) -> std::path::PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("ns link")
}

#[test]
fn qemu_runs_unprivileged_without_groups_capabilities_or_new_privileges() {
    let q = Queue::new();
    q.add_job("jailed_i0.tar.xz", "#!/bin/sh\necho sleeping\nsleep 60\n", "1m", &[]);
    let host_id = format!("{}-jail", q.host_id);
    // The host inherits descriptor 9 (no close-on-exec), as from a careless parent: QEMU must not.
    let marker = q.root.path().join("inherited-marker");
    fs::write(&marker, b"not for QEMU").expect("marker");
    let inherited = fs::File::open(&marker).expect("open marker");
    let mut cmd = q.host_command("jail", &host_id, &["--stop-timeout", "2s"]);
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = inherited.as_raw_fd();
        // SAFETY: dup2 between fork and exec; it leaves the new descriptor without close-on-exec.
        unsafe {
            cmd.pre_exec(move || if libc::dup2(fd, 9) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
        }
    }
    let mut host = construir_e2e::Spawned(cmd.spawn().expect("host"));
    assert!(
        wait_for(Duration::from_secs(30), || !qemu_pids(&host_id).is_empty()),
        "no QEMU started: {}",
        q.log("jail")
    );
    let pid = qemu_pids(&host_id)[0];
    let uid = uid_of(pid);
    assert!(VM_IDS.contains(&uid), "uid {uid} is from the VM range");
    let fds_of = |pid: u32| -> Vec<std::path::PathBuf> {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .collect()
    };
    assert!(fds_of(host.id()).contains(&marker), "the host holds the inherited descriptor");
    assert!(!fds_of(pid).contains(&marker), "an inherited descriptor reached QEMU: {:?}", fds_of(pid));
    assert_eq!(proc_status(pid, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(proc_status(pid, "Gid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(proc_status(pid, "Groups"), "");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    // QEMU installs its seccomp filter (-sandbox) itself, early in its start-up.
    assert!(wait_for(Duration::from_secs(10), || proc_status(pid, "Seccomp") == "2"), "no seccomp filter");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        if caps == "CapBnd" {
            continue; // the bounding set is inherited; with no effective or permitted caps it grants nothing
        }
        assert_eq!(proc_status(pid, caps), "0000000000000000", "{caps}");
    }
    let environ = fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let vars: Vec<&[u8]> = environ.split(|&b| b == 0).filter(|v| !v.is_empty()).collect();
    assert_eq!(vars, [&b"TMPDIR=/var/tmp"[..]], "only TMPDIR, its own scratch directory");
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).expect("core line");
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit(") ").next().expect("fields").split(' ').collect();
    // QEMU is PID 1 of its own pid namespace, under a keeper that leads its own session.
    assert_eq!(fields[3], fields[1], "QEMU's session is its keeper's, not the host's");
    assert_eq!(proc_status(pid, "NSpid").split_whitespace().last(), Some("1"), "PID 1 of its namespace");
    for kind in ["mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(ns(&pid.to_string(), kind), ns("self", kind), "QEMU has its own {kind} namespace");
    }
    // Its root holds only what QEMU reads: binaries, libraries, firmware, devices, its /proc and /var/tmp.
    let mut top: Vec<String> = fs::read_dir(format!("/proc/{pid}/root/"))
        .expect("QEMU's root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    for name in &top {
        assert!(
            ["dev", "lib", "lib64", "proc", "usr", "var"].contains(&name.as_str()),
            "{name} in QEMU's root: {top:?}"
        );
    }
    let mut devs: Vec<String> = fs::read_dir(format!("/proc/{pid}/root/dev"))
        .expect("dev")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    assert_eq!(devs, ["null", "urandom"], "TCG: no /dev/kvm");
    assert!(!std::path::Path::new(&format!("/proc/{pid}/root/etc")).exists());
    assert!(!std::path::Path::new(&format!("/proc/{pid}/root/usr/share/qemu/../../../etc/passwd")).exists());
    let log = q.log("jail");
    assert!(log.contains("namespaces mnt,pid,ipc,uts,net (empty); minimal root on"), "{log}");
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
    assert_eq!(Queue::list(&q.done), ["survivor_d0.intoto.jsonl", "survivor_d0.log", "survivor_d0.tar.xz"]);
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
fn a_host_killed_between_delivering_a_result_and_ending_the_claim_does_not_run_the_job_again() {
    use std::os::unix::fs::MetadataExt;
    let q = Queue::new();
    let host_id = q.host_id.clone();
    let running = q.root.path().join("running").join(&host_id);
    fs::create_dir_all(&running).expect("mkdir");
    let file = q.add_job("once_i0.tar.xz", "#!/bin/sh\necho must not run twice\n", "1m", &[]);
    fs::rename(&file, running.join("once_i0.tar.xz")).expect("as if claimed");
    // As a host before notes named the provenance left it when killed right
    // after the result landed (it landed the result first then): the result in
    // done/, its log still staged, the delivery noted beside the claim.
    fs::create_dir_all(&q.done).expect("mkdir");
    fs::write(q.done.join("once_d0.tar.xz"), b"the result").expect("result");
    let staged_log = format!(".once_d0.log.{host_id}.1.2.0.tmp");
    fs::write(q.done.join(&staged_log), b"the log\n").expect("log");
    // Its provenance, signed and staged before the note, under the same tag.
    let staged_provenance = format!(".once_d0.intoto.jsonl.{host_id}.1.2.0.tmp");
    fs::write(q.done.join(&staged_provenance), b"{\"signed\": true}\n").expect("provenance");
    let ino = fs::metadata(q.done.join("once_d0.tar.xz")).expect("stat").ino();
    fs::write(
        running.join(".delivering.once_i0.tar.xz"),
        format!("{ino}\n.once_d0.tar.xz.{host_id}.1.2.0.tmp\n{staged_log}\n"),
    )
    .expect("note");
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    assert!(!run.log.contains("booting"), "the job ran again: {}", run.log);
    assert!(run.log.contains("before the last stop and has landed now; the job is not run again"), "{}", run.log);
    assert_eq!(fs::read(q.done.join("once_d0.tar.xz")).expect("result"), b"the result");
    assert_eq!(fs::read(q.done.join("once_d0.log")).expect("log"), b"the log\n");
    let left: Vec<_> = fs::read_dir(&running).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(left, [".host"], "claim and note are gone; the host's own file stays");
    assert!(!q.done.join(&staged_log).exists(), "the staged log landed");
    assert_eq!(fs::read(q.done.join("once_d0.intoto.jsonl")).expect("provenance"), b"{\"signed\": true}\n");
    assert_eq!(Queue::list(&q.queue), Vec::<String>::new());
    assert_eq!(Queue::list(&q.done), ["once_d0.intoto.jsonl", "once_d0.log", "once_d0.tar.xz"]);
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
    assert_eq!(Queue::list(&q.done).len(), 12, "a result, its log and its provenance for each of 4");
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
    // Files that would look host-written if they kept their names in failed/.
    fs::write(q.queue.join("victim_i0.tar.xz.log"), b"a forged log").expect("write");
    fs::write(q.queue.join("victim_i0.tar.xz.reason"), b"a forged reason").expect("write");
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
    // Refused entries are in failed/ under names the host chose, their own name inside the .reason.
    let refused = |shown: &str| q.refusal(shown);
    let reason = |name: &str| q.reason(name);
    for forged in ["victim_i0.tar.xz.log", "victim_i0.tar.xz.reason"] {
        assert!(!q.failed.join(forged).exists(), "{forged} kept its name in failed/");
        let (moved, why) = refused(forged);
        assert!(why.starts_with("bad job file name"), "{why}");
        assert!(fs::read(moved).expect("moved").starts_with(b"a forged"));
    }
    assert!(refused("hardlink_i0.tar.xz").1.contains("hardlinked"));
    assert!(reason("symlink_i0.tar.xz").contains("a symlink"));
    assert!(reason("fifo_i0.tar.xz").contains("not a regular file"));
    assert!(reason("sock_i0.tar.xz").contains("not a regular file"));
    assert!(reason("empty_i0.tar.xz").contains("0 bytes is too small"));
    assert!(reason("huge_i0.tar.xz").contains("larger than this host accepts"));
    assert!(refused("esc\\x1b[31mred_i0.tar.xz").1.contains("bad job file name"));
    assert!(refused("invalid\\xff\\xfe_i0.tar.xz").1.contains("bad job file name"));
    assert!(fs::symlink_metadata(refused("symlink_i0.tar.xz").0).expect("moved").file_type().is_symlink());
    for entry in fs::read_dir(&q.failed).expect("ls") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|x| x == "reason") {
            assert!(!fs::read_to_string(&path).expect("reason").contains('\x1b'), "an escape in {}", path.display());
        }
    }
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
    // The host settles for 6 s, so the writer may be 4 s late on a loaded machine.
    let path = q.queue.join("slowupload_i0.tar.xz");
    fs::write(&path, &bytes[..bytes.len() / 2]).expect("first half");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&bytes[bytes.len() / 2..]).expect("second half");
    });
    let run = q.run(&["--settle", "6s"]);
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
    // Timeout and grace are generous: under TCG on a loaded 2-core machine the hog once took
    // over 40 s to meet the OOM killer, and a fork bomb's teardown and packing over 20 s
    // (init's watchdog fires at timeout + grace/2).
    let run = q.run(&["--workers", "2", "--timeout", "60s", "--grace", "120s"]);
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

#[test]
fn each_vm_has_its_own_uid_and_an_escaped_qemu_reaches_neither_the_host_nor_the_other_vm() {
    use std::os::unix::process::CommandExt;
    let q = Queue::new();
    // World-searchable, as an operator's directories may be: the job directories themselves must hold.
    fs::set_permissions(q.root.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    q.add_job("first_i0.tar.xz", "#!/bin/sh\necho first\nsleep 60\n", "1m", &[]);
    q.add_job("second_i0.tar.xz", "#!/bin/sh\necho second\nsleep 60\n", "1m", &[]);
    let host_id = format!("{}-two", q.host_id);
    let mut host = q.spawn("two", &host_id, &["--workers", "2", "--stop-timeout", "1s"]);
    assert!(wait_for(Duration::from_secs(60), || qemu_pids(&host_id).len() == 2), "{}", q.log("two"));
    let pids = qemu_pids(&host_id);
    let (a, b) = (pids[0], pids[1]);
    let (ua, ub) = (uid_of(a), uid_of(b));
    assert_ne!(ua, ub, "two live VMs never share a uid");
    assert!(VM_IDS.contains(&ua) && VM_IDS.contains(&ub));

    let work = q.root.path().join("work");
    let running = q.root.path().join("running").join(&host_id);
    let job_dirs: Vec<std::path::PathBuf> =
        fs::read_dir(&work).expect("work").filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    assert_eq!(job_dirs.len(), 2, "{job_dirs:?}");
    let shadow_before = fs::read("/etc/shadow").expect("shadow");
    // Each attempt runs as VM a's uid and gid, on the host, while both VMs run.
    let attempts = [
        ("plant a link in its own job directory", format!("ln -s /etc/shadow '{}/disk2'", job_dirs[0].display())),
        ("plant a link in the other job's directory", format!("ln -s /etc/shadow '{}/disk2'", job_dirs[1].display())),
        (
            "swap a working copy for a link",
            format!("mv -f '{0}/disk' '{0}/x' || rm -f '{0}/disk'", job_dirs[1].display()),
        ),
        ("plant a future job's directory", format!("ln -s /etc '{}/{host_id}.third_i0.tar.xz'", work.display())),
        ("read a working copy", format!("cat '{}/disk'", job_dirs[0].display())),
        ("read a claimed job file", format!("cat '{}/first_i0.tar.xz'", running.display())),
        ("signal the other VM", format!("kill -0 {b}")),
        ("read the other VM's environment", format!("cat /proc/{b}/environ")),
        ("read the other VM's memory map", format!("cat /proc/{b}/maps")),
    ];
    for (what, script) in &attempts {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .uid(ua)
            .gid(ua)
            .current_dir("/")
            .output()
            .expect("run as the VM's uid");
        assert!(!out.status.success(), "an escaped QEMU could {what}: {script}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ermission denied") || err.contains("not permitted"), "{what}: {err}");
    }
    assert!(job_dirs.iter().all(|d| d.join("disk").exists() && !d.join("disk2").exists()));
    assert!(!work.join(format!("{host_id}.third_i0.tar.xz")).exists());
    assert_eq!(fs::read("/etc/shadow").expect("shadow"), shadow_before);

    signal(&host, libc::SIGTERM);
    assert!(host.wait().expect("host exits").success(), "{}", q.log("two"));
    assert_eq!(Queue::list(&q.queue), ["first_i0.tar.xz", "second_i0.tar.xz"], "{}", q.log("two"));
}

#[test]
fn a_vm_that_never_boots_is_killed_at_the_boot_deadline_retried_once_then_failed_with_its_console() {
    let q = Queue::new();
    let images = never_booting_images(q.root.path());
    q.add_job("stuck_i0.tar.xz", "#!/bin/sh\necho never runs\n", "1m", &[]);
    let run = q.run_with_images(&images, &["--boot-timeout", "8s"]);
    assert!(run.success, "{}", run.log);
    assert_eq!(run.log.matches("job stuck_i0.tar.xz: booting image").count(), 2, "{}", run.log);
    assert!(
        run.log.contains("the VM did not boot within 8 s; killed, and the job goes back to the queue once"),
        "{}",
        run.log
    );
    let reason = fs::read_to_string(q.failed.join("stuck_i0.tar.xz.reason")).expect("reason");
    assert!(reason.contains("the VM did not boot within 8 s, twice in a row"), "{reason}");
    let log = fs::read_to_string(q.failed.join("stuck_i0.tar.xz.log")).expect("console log");
    assert!(log.contains("verdict: failed: the VM did not boot within 8 s"), "{log}");
    // The boot failures did not count as attempts, and nothing of them is left behind.
    assert!(Queue::list(&q.root.path().join("running/.attempts")).is_empty());
    assert!(Queue::list(&q.queue).is_empty() && Queue::list(&q.done).is_empty());
}

#[test]
fn pid_1s_watchdog_ends_a_vm_whose_packing_outlives_the_deadline_and_no_half_result_is_delivered() {
    let q = Queue::new();
    // 64 MB of noise takes xz far longer to pack under TCG (over 30 s) than the watchdog allows.
    q.add_job(
        "slowpack_i0.tar.xz",
        "#!/bin/sh\nhead -c 64000000 /dev/urandom > /job/noise\necho made noise\n",
        "96m",
        &[],
    );
    // The guest's watchdog: timeout + half the grace = 25 s after its kernel started (some 3 s
    // after QEMU did, under TCG); the host would kill at 40 s after QEMU started.
    let run = q.run(&["--timeout", "10s", "--grace", "30s"]);
    assert!(run.success, "{}", run.log);
    let reason = fs::read_to_string(q.failed.join("slowpack_i0.tar.xz.reason")).expect("reason");
    assert!(reason.contains("the guest kernel panicked"), "{reason}");
    assert!(reason.contains("without a clean power-off the job disk is not read"), "{reason}");
    let log = fs::read_to_string(q.failed.join("slowpack_i0.tar.xz.log")).expect("console log");
    assert!(log.contains("construir-init: watchdog: 25 s since boot"), "{log}");
    assert!(Queue::list(&q.done).is_empty(), "a half-packed result is never delivered");
}

#[test]
fn a_job_file_dated_in_the_future_still_settles_and_once_ends() {
    let q = Queue::new();
    let job = q.add_job("future_i0.tar.xz", "#!/bin/sh\necho from the future\n", "1m", &[]);
    construir_e2e::sh(&format!("touch -d '+1 year' '{}'", job.display()), q.root.path());
    let run = q.run(&["--settle", "2s"]);
    assert!(run.success, "{}", run.log);
    assert_eq!(String::from_utf8(job_log(&q.done("future_d0.tar.xz"))).expect("utf8"), "from the future\n");
}

#[test]
fn the_kvm_probe_is_jailed_and_dies_with_a_killed_host() {
    if fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        construir_e2e::skipped(
            "the_kvm_probe_is_jailed_and_dies_with_a_killed_host",
            "no /dev/kvm to open: the host runs no KVM probe here, so there is nothing to kill",
        );
        return;
    }
    let q = Queue::new();
    let probe_pids = || {
        fs::read_dir("/proc")
            .expect("proc")
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(19).any(|w| w == b"construir.kvm-probe"))
            })
            .collect::<Vec<u32>>()
    };
    // --accel auto (the default): with no answer cached in this fresh work/, the host probes KVM first.
    let host_id = format!("{}-probe", q.host_id);
    let log = fs::File::create(q.log_path("probe")).expect("log");
    let mut host = std::process::Command::new(construir_e2e::bin("construir-host"))
        .arg("run")
        .arg(&q.queue)
        .args(["--host-id", &host_id, "--images"])
        .arg(construir_e2e::images())
        .stderr(log)
        .spawn()
        .map(construir_e2e::Spawned)
        .expect("host");
    if !wait_for(Duration::from_secs(20), || !probe_pids().is_empty()) {
        // The probe ended before it could be seen: KVM works (it booted at once), or QEMU
        // failed at once (seen here: an MSR assertion under -cpu host), and the log says which.
        let _ = host.kill();
        let _ = host.wait();
        let log = q.log("probe");
        assert!(log.contains("kvm acceleration") || log.contains("KVM probe: QEMU said: "), "{log}");
        eprintln!("the KVM probe ended at once here, so its death with the host could not be watched: {log}");
        return;
    }
    let pid = probe_pids()[0];
    assert!(VM_IDS.contains(&uid_of(pid)), "the probe runs as a VM uid");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert_ne!(ns(&pid.to_string(), "mnt"), ns("self", "mnt"), "in its own mount namespace");
    assert_ne!(ns(&pid.to_string(), "pid"), ns("self", "pid"), "in its own pid namespace");
    signal(&host, libc::SIGKILL);
    let _ = host.wait();
    assert!(wait_for(Duration::from_secs(5), || probe_pids().is_empty()), "the KVM probe outlived its host");
}
