//! Debug sessions end to end (`jobfile::debug`): a failed debug job's VM
//! keeps a root shell for its owner, reached in a real terminal (tmux)
//! through the server (`construir debug ID`) or on the host itself
//! (`construir-host debug FILE`); the result is the job's own whatever the
//! session does; nobody else gets in; a session nobody attaches ends at
//! `--debug-wait`; a job that ends ok opens none; operators can refuse them.

use std::fs;
use std::path::Path;
use std::time::Duration;

use construir_e2e::server::{add_account, client, job_dir, server_cmd, Server};
use construir_e2e::{bin, qemu_pids, wait_for, Queue, Terminal};

/// Writes a marker, says so, and fails.
const FAILS: &str = "#!/bin/sh\necho marker-content > marker.txt\necho about to fail\nexit 3\n";

/// The shell's prompt in a session.
const PROMPT: &str = "construir-debug:/job#";

/// `construir ... debug ID` as a shell line, for a terminal.
fn attach_line(s: &Server, token_file: &Path, cwd: &Path, id: &str) -> String {
    format!(
        "cd '{}' && '{}' --server {} --token-file '{}' debug {id}",
        cwd.display(),
        bin("construir").display(),
        s.url,
        token_file.display()
    )
}

#[test]
fn a_failed_debug_job_gives_its_owner_alone_a_shell_and_its_result_stays_its_own() {
    let q = Queue::new();
    let db = q.root.path().join("server.db");
    let (alice, bob) = (add_account(&db, "alice"), add_account(&db, "bob"));
    let s = Server::start(&q, &db, &[]);
    let work = q.root.path().join("home");
    fs::create_dir_all(&work).expect("mkdir");
    let token_file = work.join("alice.token");
    fs::write(&token_file, &alice).expect("token");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).expect("chmod");
    let host_id = format!("{}-dbg", q.host_id);
    let _host = q.spawn("host", &host_id, &["--debug-wait", "90s"]);

    // A debug job that ends ok opens no session.
    let ok = job_dir(&work, "fine", "#!/bin/sh\necho all good\n");
    let (code, out, err) = client(
        &s,
        &alice,
        &work,
        &["submit", ok.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--debug", "--wait"],
    );
    assert_eq!(code, 0, "{err}\n{}", q.log("host"));
    assert!(err.contains("done: ok (exit code 0)") && !err.contains("debug session"), "{err}");
    let (_, status, _) = client(&s, &alice, &work, &["status", out.trim()]);
    assert!(!status.contains("\"debug\""), "{status}");

    // One that fails without asking keeps nothing; run again as a debug job (the server kept
    // its file), it keeps its VM: `wait` says so and how to get in.
    let dir = job_dir(&work, "broken", FAILS);
    let (code, out, err) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--wait"]);
    assert_eq!(code, 1, "the job failed: {err}\n{}", q.log("host"));
    assert!(err.contains("done: failed (exit code 3)") && !err.contains("debug session"), "{err}");
    let first = out.trim().to_owned();
    let (code, _, err) = client(&s, &bob, &work, &["rerun", &first, "--debug"]);
    assert!(code == 2 && err.contains("404"), "another account's job is no job: {err}");
    let (code, out, err) = client(&s, &alice, &work, &["rerun", &first, "--debug", "--wait"]);
    assert_eq!(code, 1, "the job failed again: {err}\n{}", q.log("host"));
    let id = out.trim().to_owned();
    assert!(err.contains(&format!("job {first} runs again as {id} (a debug run)")), "{err}");
    assert!(err.contains("done: failed (exit code 3)"), "{err}");
    assert!(
        err.contains(&format!(
            "a debug session is open on host {host_id} (waiting for you): `construir debug {id}` before"
        )),
        "{err}"
    );
    let (_, status, _) = client(&s, &alice, &work, &["status", &id]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(status["debug"]["host"], host_id.as_str(), "{status}");
    assert_eq!(status["debug"]["attached"], false, "{status}");
    let result_before = fs::read(q.done(&format!("alice.{id}.broken_d0.tar.xz"))).expect("the result landed");

    // Another account: as if the job did not exist.
    let (code, _, err) = client(&s, &bob, &work, &["debug", &id]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("404") && err.contains("no such job"), "{err}");

    // Its owner, in a real terminal.
    let t = Terminal::start(&attach_line(&s, &token_file, &work, &id));
    assert!(t.shows(PROMPT, Duration::from_secs(60)), "no prompt:\n{}\n{}", t.screen(), q.log("host"));
    t.type_text("cat marker.txt; ls /job");
    t.press("Enter");
    assert!(t.shows("marker-content", Duration::from_secs(20)), "{}", t.screen());
    assert!(wait_for(Duration::from_secs(5), || {
        let screen = t.screen();
        screen.contains("job_output.txt") && screen.contains("bin")
    }));
    // A second attach while the first is in: refused.
    let (code, _, err) = client(&s, &alice, &work, &["debug", &id]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("409") && err.contains("attached already"), "{err}");
    // What the session does reaches no result: the files, and the job disk itself.
    t.type_text("echo changed > marker.txt; dd if=/dev/zero of=/dev/vda bs=64k count=4 2>/dev/null; exit");
    t.press("Enter");
    assert!(t.shows("the session ended", Duration::from_secs(30)), "{}", t.screen());
    assert!(t.shows("EXIT=0", Duration::from_secs(5)), "{}", t.screen());
    // The VM is gone with the shell.
    assert!(wait_for(Duration::from_secs(20), || qemu_pids(&host_id).is_empty()), "{}", q.log("host"));
    assert!(
        wait_for(Duration::from_secs(10), || q.log("host").contains("attached after")
            && q.log("host").contains("the VM powered off)")),
        "{}",
        q.log("host")
    );

    let (code, _, err) = client(&s, &alice, &work, &["fetch", &id, "--unpack", "got"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read_to_string(work.join("got/marker.txt")).expect("marker"), "marker-content\n");
    assert!(fs::read_to_string(work.join("got/job_output.txt")).expect("output").contains("about to fail"));
    assert_eq!(fs::read(work.join("broken_d0.tar.xz")).expect("fetched"), trimmed(&result_before));
    // Its provenance says it ran as a debug job.
    let provenance = fs::read_to_string(work.join("broken_d0.intoto.jsonl")).expect("provenance");
    assert!(decoded(&provenance).contains("\"debug\":true"), "{}", decoded(&provenance));
    let (_, status, _) = client(&s, &alice, &work, &["status", &id]);
    assert!(!status.contains("\"debug\""), "the session is over: {status}");
    // Who and when, never what.
    let audit = String::from_utf8_lossy(&server_cmd(&db, &["audit"]).stdout).into_owned();
    let lines: Vec<&str> = audit.lines().filter(|l| l.contains(&id) && l.contains("debug_")).collect();
    assert!(lines.iter().any(|l| l.contains("alice") && l.contains("debug_attached")), "{audit}");
    assert!(lines.iter().any(|l| l.contains("alice") && l.contains("debug_ended")), "{audit}");
    assert!(!audit.contains("marker") && !audit.contains("changed"), "{audit}");

    // While a session is open its job has not finished, for the account's limits; a cancel ends it.
    let (code, out, err) = client(&s, &alice, &work, &["rerun", &first, "--debug", "--wait"]);
    assert_eq!(code, 1, "{err}");
    let third = out.trim().to_owned();
    assert!(err.contains("a debug session is open"), "{err}");
    assert!(server_cmd(&db, &["account", "limits", "alice", "--max-waiting", "1"]).status.success());
    let (code, _, err) =
        client(&s, &alice, &work, &["submit", ok.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
    assert!(
        code == 2 && err.contains("429") && err.contains("1 of your jobs are not finished"),
        "the open session counts: {err}"
    );
    let (code, _, err) = client(&s, &alice, &work, &["cancel", &third]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("its debug session is ended"), "{err}");
    assert!(wait_for(Duration::from_secs(20), || qemu_pids(&host_id).is_empty()), "{}", q.log("host"));
    assert!(
        wait_for(Duration::from_secs(10), || q.log("host").contains("its submitter cancelled it")),
        "{}",
        q.log("host")
    );
    let audit = String::from_utf8_lossy(&server_cmd(&db, &["audit"]).stdout).into_owned();
    assert!(audit.lines().any(|l| l.contains("debug_cancelled") && l.contains(&third)), "{audit}");
    let (code, _, err) =
        client(&s, &alice, &work, &["submit", ok.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
    assert_eq!(code, 0, "with the session gone, the job counts as finished: {err}");

    // A server that takes none says so at submit.
    let q2 = Queue::new();
    let db2 = q2.root.path().join("server.db");
    let carol = add_account(&db2, "carol");
    let s2 = Server::start(&q2, &db2, &["--no-debug"]);
    let (code, _, err) =
        client(&s2, &carol, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--debug"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("400") && err.contains("--no-debug"), "{err}");
}

/// The result without its zero padding, as `construir fetch` writes it.
fn trimmed(bytes: &[u8]) -> Vec<u8> {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    bytes[..end.div_ceil(4) * 4].to_vec()
}

/// A DSSE envelope's payload, decoded.
fn decoded(envelope: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(envelope.lines().next().unwrap_or_default()).expect("json");
    let payload = v["payload"].as_str().unwrap_or_default();
    use base64::Engine;
    String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(payload).unwrap_or_default()).into_owned()
}

#[test]
fn on_the_host_itself_a_session_waits_its_time_takes_one_attach_and_can_be_turned_off() {
    let q = Queue::new();
    let pack = |name: &str, extra: &[&str]| {
        let dir = job_dir(q.root.path(), name, FAILS);
        let out = std::process::Command::new(bin("construir-host"))
            .args(["job", "pack"])
            .arg(&dir)
            .args(["--image", "0", "--size", "1M", "--out"])
            .arg(&q.queue)
            .args(extra)
            .output()
            .expect("job pack");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let running = q.root.path().join("running");
    let record = |name: &str| jobfile::debug::session_file(&running, format!("{name}_i0.tar.xz").as_ref());

    // Nobody attaches: the VM goes at --debug-wait, and the result was delivered at once.
    let host_id = format!("{}-wait", q.host_id);
    let mut host = q.spawn("wait", &host_id, &["--debug-wait", "3s"]);
    pack("alone", &["--debug"]);
    assert!(wait_for(Duration::from_secs(90), || q.done("alone_d0.tar.xz").exists()), "{}", q.log("wait"));
    assert!(wait_for(Duration::from_secs(5), || !record("alone").exists() || q.log("wait").contains("nobody attached")));
    assert!(
        wait_for(Duration::from_secs(30), || q.log("wait").contains("nobody attached within 3 s")),
        "{}",
        q.log("wait")
    );
    assert!(!record("alone").exists());
    assert!(wait_for(Duration::from_secs(10), || qemu_pids(&host_id).is_empty()));
    let log = String::from_utf8_lossy(&construir_e2e::job_log(&q.done("alone_d0.tar.xz"))).into_owned();
    assert!(log.contains("about to fail"), "{log}");
    construir_e2e::signal(&host.0, libc::SIGTERM);
    let _ = host.0.wait();

    // Attached here, with construir-host debug; ~. leaves and the VM goes.
    let host_id = format!("{}-here", q.host_id);
    let _host = q.spawn("here", &host_id, &["--debug-wait", "90s"]);
    pack("here", &["--debug"]);
    assert!(wait_for(Duration::from_secs(90), || record("here").exists()), "{}", q.log("here"));
    let line = format!("'{}' debug '{}'", bin("construir-host").display(), q.queue.join("here_i0.tar.xz").display());
    let t = Terminal::start(&line);
    assert!(t.shows(PROMPT, Duration::from_secs(60)), "{}\n{}", t.screen(), q.log("here"));
    t.type_text("cat marker.txt");
    t.press("Enter");
    assert!(t.shows("marker-content", Duration::from_secs(20)), "{}", t.screen());
    // A second attach on the same session is told so.
    let second = std::process::Command::new(bin("construir-host"))
        .arg("debug")
        .arg(q.queue.join("here_i0.tar.xz"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("construir-host debug");
    assert!(String::from_utf8_lossy(&second.stdout).contains("already attached"), "{second:?}");
    t.press("Enter");
    t.type_text("~.");
    assert!(t.shows("left the session", Duration::from_secs(10)), "{}", t.screen());
    assert!(wait_for(Duration::from_secs(20), || qemu_pids(&host_id).is_empty()), "{}", q.log("here"));
    assert!(wait_for(Duration::from_secs(10), || q.log("here").contains("its owner left")), "{}", q.log("here"));
    assert!(!record("here").exists());
    // Nothing is open now.
    let none = std::process::Command::new(bin("construir-host"))
        .arg("debug")
        .arg(q.queue.join("here_i0.tar.xz"))
        .output()
        .expect("construir-host debug");
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("has no debug session open"), "{none:?}");
}

#[test]
fn a_host_with_no_debug_runs_a_debug_job_as_any_other() {
    let q = Queue::new();
    let dir = job_dir(q.root.path(), "off", FAILS);
    let out = std::process::Command::new(bin("construir-host"))
        .args(["job", "pack"])
        .arg(&dir)
        .args(["--image", "0", "--size", "1M", "--debug", "--out"])
        .arg(&q.queue)
        .output()
        .expect("job pack");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = q.run(&["--no-debug"]);
    assert!(run.success, "{}", run.log);
    let log = run.log;
    assert!(log.contains("it asks for a debug session, but this host runs with --no-debug"), "{log}");
    assert!(!log.contains("debug session open"), "{log}");
    let status = construir_e2e::job_status(&q.done("off_d0.tar.xz"));
    assert_eq!(status["result"], "failed", "{status}");
}
