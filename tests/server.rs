//! The front door end to end: a real construir-server on loopback, a real
//! build host running real VMs beside it, and the `construir` client.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;

use std::time::Duration;

use construir_e2e::browser::Browser;
use construir_e2e::server::{add_account, client, job_dir, raw, server_cmd, upload_files, Server};
use construir_e2e::{bin, signal, wait_for, Queue};

/// A queue with a server on it, accounts for `names` (their tokens, in
/// order), and a home directory for the submitter's jobs.
struct Served {
    q: Queue,
    db: std::path::PathBuf,
    tokens: Vec<String>,
    s: Server,
    work: std::path::PathBuf,
}

fn served(names: &[&str], extra: &[&str]) -> Served {
    let q = Queue::new();
    let db = q.root.path().join("server.db");
    let tokens = names.iter().map(|n| add_account(&db, n)).collect();
    let s = Server::start(&q, &db, extra);
    let work = q.root.path().join("home");
    fs::create_dir_all(&work).expect("mkdir");
    Served { q, db, tokens, s, work }
}

#[test]
fn submit_wait_fetch_cancel_and_limits_through_the_server_with_a_real_host() {
    let Served { q, db, tokens, s, work } = served(&["alice", "bob"], &[]);
    let (alice, bob) = (tokens[0].clone(), tokens[1].clone());

    // Waiting, while no host runs: position in the queue, then cancelled.
    let dir = job_dir(&work, "early", "#!/bin/sh\necho never runs\n");
    let (code, id_early, err) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
    assert_eq!(code, 0, "{err}");
    let id_early = id_early.trim().to_owned();
    assert!(err.contains("waiting: position 1 of 1"), "{err}");
    let (code, out, _) = client(&s, &alice, &work, &["status", &id_early]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["state"], "waiting");
    assert_eq!(status["place"]["position"], 1);
    // Another account's id is no job at all.
    let (code, _, err) = client(&s, &bob, &work, &["status", &id_early]);
    assert_eq!(code, 2);
    assert!(err.contains("404") && err.contains("no such job"), "{err}");
    let (code, _, err) = client(&s, &bob, &work, &["cancel", &id_early]);
    assert!(code == 2 && err.contains("404"), "{err}");
    let (code, _, err) = client(&s, &alice, &work, &["cancel", &id_early]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("failed: cancelled by alice"), "{err}");
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id_early]);
    assert_eq!(code, 1, "a cancelled job is not ok: {err}");

    // Run for real: a host beside the server.
    let mut host = q.spawn("host", &format!("{}-srv", q.host_id), &[]);
    let dir = job_dir(
        &work,
        "hello",
        "#!/bin/sh\necho hello through the server\nmkdir -p out && echo built > out/artifact\n",
    );
    let (code, out, err) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "2M", "--wait"]);
    assert_eq!(code, 0, "the job's result is ok: {err}\n{}", q.log("host"));
    let id = out.trim().to_owned();
    assert!(err.contains("running on ") && err.contains("done: ok (exit code 0)"), "{err}");
    let (code, out, err) = client(&s, &alice, &work, &["fetch", &id, "--unpack", "unpacked"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "hello_d0.tar.xz");
    // Its provenance came with it, and checks against the host's key (as the server publishes it).
    let host_key = std::process::Command::new(construir_e2e::bin("construir-host"))
        .args(["key", q.queue.to_str().expect("utf8"), "--host-id", &format!("{}-srv", q.host_id)])
        .output()
        .expect("construir-host key");
    let host_key = String::from_utf8_lossy(&host_key.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    assert!(err.contains(&format!("verified: signed by {host_key}")), "{err}");
    assert!(work.join("hello_d0.intoto.jsonl").exists());
    // Offline, with only the key: the result checks; a changed copy or another key does not.
    let (code, out, err) = client(&s, &alice, &work, &["verify", "hello_d0.tar.xz", "--key", &host_key]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("the result and its") && out.contains("image i0"), "{out}");
    let mut bytes = fs::read(work.join("hello_d0.tar.xz")).expect("result");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::create_dir_all(work.join("changed")).expect("mkdir");
    fs::write(work.join("changed/hello_d0.tar.xz"), &bytes).expect("write");
    fs::copy(work.join("hello_d0.intoto.jsonl"), work.join("changed/hello_d0.intoto.jsonl")).expect("copy");
    let (code, _, err) = client(&s, &alice, &work, &["verify", "changed/hello_d0.tar.xz", "--key", &host_key]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not verified") && err.contains("is not the one the host signed"), "{err}");
    let other = "ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let out = std::process::Command::new(construir_e2e::bin("construir-host"))
        .args(["job", "verify", "hello_d0.tar.xz", "--key", other])
        .current_dir(&work)
        .output()
        .expect("job verify");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no signature is by a key given"), "{err}");
    assert_eq!(fs::read_to_string(work.join("unpacked/job_output.txt")).expect("output"), "hello through the server\n");
    assert_eq!(fs::read_to_string(work.join("unpacked/out/artifact")).expect("artifact"), "built\n");
    let fetched = fs::read(work.join("hello_d0.tar.xz")).expect("fetched");
    assert!(fetched.len() < 2 << 20, "the zero padding is not sent: {} bytes", fetched.len());
    let (_, log, _) = client(&s, &alice, &work, &["log", &id]);
    assert!(log.contains("hello through the server") && log.contains("construir-host: verdict: ok"), "{log}");
    let (_, out, _) = client(&s, &alice, &work, &["status", &id]);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["status"]["result"], "ok");
    assert_eq!(status["status"]["exit_code"], 0);
    // Range requests on the result.
    let (code, body) = raw(&s.addr(), format!("GET /v1/jobs/{id}/result HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nRange: bytes=1-4\r\nConnection: close\r\n\r\n").as_bytes());
    assert_eq!((code, body.as_bytes()), (206, &b"7zXZ"[..]));
    let (code, _) = raw(&s.addr(), format!("GET /v1/jobs/{id}/result HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nRange: bytes=99999999-\r\nConnection: close\r\n\r\n").as_bytes());
    assert_eq!(code, 416);
    // A failing job: the client's exit code follows the result.
    let dir = job_dir(&work, "fails", "#!/bin/sh\necho about to fail\nexit 3\n");
    let (code, _, err) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--wait"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("done: failed (exit code 3)"), "{err}");
    let (_, list, _) = client(&s, &alice, &work, &["list"]);
    assert_eq!(list.lines().count(), 3, "{list}");
    let (_, list, _) = client(&s, &bob, &work, &["list"]);
    assert_eq!(list, "", "bob sees none of alice's jobs");
    // The audit log has the submission and each change of state the server saw.
    let audit = String::from_utf8(server_cmd(&db, &["audit", "--limit", "500"]).stdout).expect("utf8");
    let has = |words: &[&str]| {
        audit.lines().any(|l| {
            let l: Vec<&str> = l.split_whitespace().collect();
            l.windows(words.len()).any(|w| w == words)
        })
    };
    assert!(has(&["alice", "submitted", &id, &format!("alice.{id}.hello_i0.tar.xz")]), "{audit}");
    assert!(has(&["state", &id, "running", "->", "done"]), "{audit}");
    assert!(has(&["alice", "cancelled", &id_early]), "{audit}");

    // Limits: each a clear 4xx saying what and by how much.
    let out = server_cmd(&db, &["account", "limits", "bob", "--max-job-size", "100K", "--max-waiting", "1"]);
    assert!(out.status.success());
    let dir = job_dir(&work, "big", "#!/bin/sh\ntrue\n");
    let (code, _, err) =
        client(&s, &bob, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
    assert_eq!(code, 2);
    assert!(err.contains("413") && err.contains("larger than the 102400 bytes allowed"), "{err}");
    signal(&host, libc::SIGSTOP); // keep bob's first job waiting
    let (code, _, err) =
        client(&s, &bob, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "64K"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) =
        client(&s, &bob, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "64K"]);
    assert_eq!(code, 2);
    assert!(err.contains("429") && err.contains("1 of your jobs are not finished; the limit is 1"), "{err}");
    signal(&host, libc::SIGCONT);
    let carol = add_account(&db, "carol");
    assert!(server_cmd(&db, &["account", "limits", "carol", "--max-job-size", "100K"]).status.success());
    let (code, body) = raw(&s.addr(), format!("POST /v1/jobs?name=x&image=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {carol}\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n").as_bytes());
    assert_eq!(code, 413, "refused before the upload, on its declared length: {body}");
    assert!(body.contains("\"over_by\":4897600"), "{body}");
    // Not a job file; an unknown image; a bad name.
    let (code, body) = raw(&s.addr(), format!("POST /v1/jobs?name=x&image=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 70000\r\nConnection: close\r\n\r\n{}", "a".repeat(70000)).as_bytes());
    assert!(code == 400 && body.contains("does not start with an xz stream"), "{code} {body}");
    let (code, body) = raw(&s.addr(), format!("POST /v1/jobs?name=x&image=7 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes());
    assert!(code == 400 && body.contains("no image i7"), "{code} {body}");
    let (code, body) = raw(&s.addr(), format!("POST /v1/jobs?name=../x&image=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes());
    assert!(code == 400 && body.contains("bad job name"), "{code} {body}");
    // An upload cut off half way leaves no file behind.
    {
        let mut sock = TcpStream::connect(s.addr()).expect("connect");
        sock.write_all(format!("POST /v1/jobs?name=cut&image=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 200000\r\n\r\n").as_bytes()).expect("send");
        sock.write_all(&[0xfd, b'7', b'z', b'X', b'Z', 0]).expect("send");
        sock.write_all(&[0u8; 50_000]).expect("send");
        assert!(wait_for(Duration::from_secs(10), || !upload_files(&q).is_empty()), "the upload never began");
    }
    assert!(wait_for(Duration::from_secs(10), || upload_files(&q).is_empty()), "{:?}", upload_files(&q));

    // Bad tokens: refused and logged; past ten a minute from one address they are
    // answered 429, but a good token from that address is never refused.
    for i in 0..10 {
        let (code, _) = raw(
            &s.addr(),
            format!(
                "GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cst1.1.{:064x}\r\nConnection: close\r\n\r\n",
                i
            )
            .as_bytes(),
        );
        assert_eq!(code, 401);
    }
    let bad = format!(
        "GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cst1.1.{:064x}\r\nConnection: close\r\n\r\n",
        99
    );
    assert_eq!(raw(&s.addr(), bad.as_bytes()).0, 429, "the eleventh bad token this minute");
    let (code, body) = raw(
        &s.addr(),
        format!("GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(code, 200, "a good token is never refused for others' failures: {body}");
    assert!(s.log().contains("refused a request from 127.0.0.1: bad token"), "{}", s.log());
    let (code, _) = raw(&s.addr(), b"GET /v1/jobs/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(code == 404 || code == 400 || code == 429, "{code}");

    let _ = host.kill();
    let _ = host.wait();
}

#[test]
fn a_restart_loses_nothing_a_lost_database_gives_no_one_the_jobs_a_backup_restores_them_and_retention_deletes_old_results(
) {
    let q = Queue::new();
    let db = q.root.path().join("server.db");
    let alice = add_account(&db, "alice");
    let work = q.root.path().join("home");
    fs::create_dir_all(&work).expect("mkdir");
    let s = Server::start(&q, &db, &[]);
    let dir = job_dir(&work, "kept", "#!/bin/sh\necho kept across restarts\n");
    let (code, id, err) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    drop(s);

    // The server is down while a host runs the job; a new server finds it done, and
    // removes the upload a killed server left half-written.
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    // One idle past twice --idle-timeout (cut off long ago), one written now (another
    // server sharing the directories may be receiving it): only the first goes.
    fs::write(q.queue.join(".upload.00000000deadbeef.part"), b"\xfd7zXZ\0half").expect("write");
    construir_e2e::sh("touch -d '-2 min' .upload.00000000deadbeef.part", &q.queue);
    fs::write(q.queue.join(".upload.00000000feedface.part"), b"\xfd7zXZ\0live").expect("write");
    let s = Server::start(&q, &db, &[]);
    assert_eq!(upload_files(&q), [".upload.00000000feedface.part"]);
    fs::remove_file(q.queue.join(".upload.00000000feedface.part")).expect("rm");
    assert!(
        wait_for(Duration::from_secs(5), || s.log().contains("removed 1 unfinished upload(s) left by the last run")),
        "{}",
        s.log()
    );
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("done: ok"), "{err}");
    drop(s);

    // The database is lost. A new one knows nothing of the job: the server never takes
    // a file for an account's by its name, so the new alice does not inherit it.
    // A backup of a stopped server: the database file and its write-ahead log.
    let backup = q.root.path().join("backup");
    fs::create_dir_all(&backup).expect("mkdir");
    for ext in ["", "-wal"] {
        let _ = fs::copy(q.root.path().join(format!("server.db{ext}")), backup.join(format!("server.db{ext}")));
    }
    let lose = || {
        fs::remove_file(&db).expect("rm");
        for ext in ["-wal", "-shm"] {
            let _ = fs::remove_file(q.root.path().join(format!("server.db{ext}")));
        }
    };
    lose();
    let new_alice = add_account(&db, "alice");
    let s = Server::start(&q, &db, &[]);
    assert!(s.log().contains("1 job file(s) in the directories have a server-style name but no record"), "{}", s.log());
    let (_, list, _) = client(&s, &new_alice, &work, &["list"]);
    assert!(list.trim().is_empty(), "{list}");
    let (code, _, err) = client(&s, &new_alice, &work, &["status", &id]);
    assert!(code != 0 && err.contains("404"), "{err}");
    drop(s);

    // Restored from its backup, the database has the job again, and its result.
    lose();
    for ext in ["", "-wal"] {
        let _ = fs::copy(backup.join(format!("server.db{ext}")), q.root.path().join(format!("server.db{ext}")));
    }
    let s = Server::start(&q, &db, &[]);
    let (_, list, _) = client(&s, &alice, &work, &["list"]);
    assert!(list.starts_with(&id) && list.contains("done: ok"), "{list}");
    let (code, _, _) = client(&s, &alice, &work, &["fetch", &id, "--unpack", "again"]);
    assert_eq!(code, 0);
    assert_eq!(fs::read_to_string(work.join("again/job_output.txt")).expect("out"), "kept across restarts\n");

    // Retention of 0 days: the next sweep deletes the result and its log, and says so.
    let kept_input = q.root.path().join("server-inputs").join(format!("{id}.tar.xz"));
    assert!(kept_input.exists(), "the job file is kept for reruns as long as its result");
    let out = server_cmd(&db, &["account", "limits", "alice", "--retention-days", "0"]);
    assert!(out.status.success());
    assert!(
        wait_for(Duration::from_secs(15), || !q.done.join(format!("alice.{id}.kept_d0.tar.xz")).exists()),
        "{}",
        s.log()
    );
    assert!(!q.done.join(format!("alice.{id}.kept_d0.log")).exists());
    assert!(!kept_input.exists(), "the kept job file goes with the result");
    let (code, _, err) = client(&s, &alice, &work, &["rerun", &id]);
    assert!(code == 2 && err.contains("409") && err.contains("no longer kept"), "{err}");
    let (_, out, _) = client(&s, &alice, &work, &["status", &id]);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(status["deleted"].is_string(), "{status}");
    let audit = String::from_utf8(server_cmd(&db, &["audit"]).stdout).expect("utf8");
    assert!(audit.contains("retention_deleted"), "{audit}");
}

#[test]
fn a_running_job_is_followed_live_and_cancelled_within_seconds() {
    let Served { q, tokens, s, work, .. } = served(&["alice"], &[]);
    let alice = tokens[0].clone();
    let mut host = q.spawn("host", &format!("{}-live", q.host_id), &[]);

    // The live console while it runs: the first step is there, the second not yet.
    let dir = job_dir(&work, "steps", "#!/bin/sh\necho step one\nsleep 12\necho step two\n");
    let (code, id, err) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    let mut live = String::new();
    assert!(
        wait_for(Duration::from_secs(60), || {
            live = client(&s, &alice, &work, &["log", &id]).1;
            live.contains("step one")
        }),
        "no live console: {live}\n{}",
        q.log("host")
    );
    assert!(!live.contains("step two") && !live.contains("construir-host: verdict"), "{live}");
    // Following prints the rest as it comes, then the end of the log.
    let (code, followed, err) = client(&s, &alice, &work, &["log", &id, "--follow"]);
    assert_eq!(code, 0, "{err}");
    assert!(followed.contains("step two") && followed.contains("construir-host: verdict: ok"), "{followed}");

    // Cancelled while it runs: its VM stops within seconds, it lands in failed/ with its partial log.
    let dir = job_dir(&work, "long", "#!/bin/sh\necho started sleeping\nsleep 600\necho never\n");
    let (code, id, _) =
        client(&s, &alice, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
    assert_eq!(code, 0);
    let id = id.trim().to_owned();
    assert!(
        wait_for(Duration::from_secs(60), || client(&s, &alice, &work, &["log", &id]).1.contains("started sleeping")),
        "{}",
        q.log("host")
    );
    let asked = std::time::Instant::now();
    let (code, _, err) = client(&s, &alice, &work, &["cancel", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("cancel requested"), "{err}");
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("failed: cancelled at its submitter's request"), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(20), "took {:?}", asked.elapsed());
    let (_, log, _) = client(&s, &alice, &work, &["log", &id]);
    assert!(log.contains("started sleeping") && !log.contains("never"), "{log}");
    assert!(log.contains("construir-host: verdict: failed: cancelled"), "{log}");
    let running = q.root.path().join("running");
    assert!(!running.join(".cancel").join(format!("alice.{id}.long_i0.tar.xz")).exists(), "the request is cleared");
    signal(&host, libc::SIGTERM);
    assert!(host.wait().expect("host").success(), "{}", q.log("host"));
}

/// Headless Chromium, as a person's browser: `--dump-dom` or `--screenshot=FILE` of `url`.
#[test]
fn the_accounts_page_shows_its_jobs_in_a_real_browser() {
    let Served { q, db, tokens, s, work } = served(&["alice", "bob"], &[]);
    let (alice, bob) = (tokens[0].clone(), tokens[1].clone());
    let submit = |token: &str, name: &str, script: &str| {
        let dir = job_dir(&work, name, script);
        let (code, id, err) =
            client(&s, token, &work, &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"]);
        assert_eq!(code, 0, "{err}");
        id.trim().to_owned()
    };
    let built = submit(&alice, "built", "#!/bin/sh\necho built fine\n");
    let broke = submit(&alice, "broke", "#!/bin/sh\nexit 4\n");
    let run = q.run(&[]);
    assert!(run.success, "{}", run.log);
    // The same directory again, once its result is kept: served from the result cache.
    let stored = || {
        let (_, out, _) = client(&s, &alice, &work, &["status", &built]);
        out.contains("\"result_cache\": \"stored\"")
    };
    assert!(wait_for(Duration::from_secs(20), stored), "{}", s.log());
    let dir = work.join("built").to_str().expect("utf8").to_owned();
    let (code, again, err) = client(&s, &alice, &work, &["submit", &dir, "--image", "0", "--size", "1M"]);
    assert_eq!(code, 0, "{err}");
    let again = again.trim().to_owned();
    assert!(err.contains(&format!("(from cache: the result of job {built} of ")), "{err}");
    let waiting = submit(&alice, "later", "#!/bin/sh\ntrue\n");
    submit(&bob, "bobsjob", "#!/bin/sh\ntrue\n");

    let link = client(&s, &alice, &work, &["page"]).1.trim().to_owned();
    assert!(link.starts_with(&format!("{}/page/login/", s.url)), "{link}");
    // Opening the link signs nothing in: it names the account and asks.
    let mut browser = Browser::start(q.root.path(), 1100, 420);
    browser.open(&link);
    let dom = browser.dom();
    assert!(dom.contains("Sign in as <b>alice</b>?") && !dom.contains(&built), "{dom}");
    browser.open(&format!("{}/page", s.url));
    assert!(browser.dom().contains("Not signed in"), "the link alone signed the browser in");
    // A person reads what it asks (a screenshot is kept with the test's artifacts), and clicks.
    let artifacts = bin("construir-server").parent().expect("dir").join("test-artifacts");
    fs::create_dir_all(&artifacts).expect("mkdir");
    browser.open(&link);
    browser.screenshot(&artifacts.join("server-sign-in.png"));
    browser.click_and_wait("button");
    let dom = browser.dom();
    for want in [
        "alice <small>4 job(s)</small>",
        &format!("<code>{built}</code>"),
        &format!("<code>{again}</code>"),
        &format!("(from cache: the result of job {built} of "),
        &format!("<code>{broke}</code>"),
        &format!("<code>{waiting}</code>"),
        "ok (exit code 0)",
        "failed (exit code 4)",
        "position 1 of 2",
        &format!(r#"<a href="/page/jobs/{built}/result">result</a>"#),
        &format!(r#"<a href="/page/jobs/{again}/result">result</a>"#),
    ] {
        assert!(dom.contains(want), "{want:?} not on the page:\n{dom}");
    }
    assert!(!dom.contains("bobsjob"), "another account's job is on alice's page");
    // A screenshot for people to look at, kept with the test's artifacts.
    let shot = artifacts.join("server-page.png");
    let _ = fs::remove_file(&shot);
    browser.screenshot(&shot);
    let png = fs::read(&shot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());

    // A link works once.
    let mut other = Browser::start(q.root.path(), 1100, 420);
    other.open(&link);
    let again = other.dom();
    assert!(again.contains("This link has been used or has expired") && !again.contains(&built), "{again}");

    // A new token ends every session made with the old one.
    let out = server_cmd(&db, &["account", "token", "alice"]);
    assert!(out.status.success());
    browser.open(&format!("{}/page", s.url));
    assert!(browser.dom().contains("Not signed in"), "a session outlived its token");
}

#[test]
fn hostile_clients_are_cut_off_and_leave_nothing_behind() {
    let q = Queue::new();
    let db = q.root.path().join("server.db");
    let alice = add_account(&db, "alice");
    let s = Server::start(&q, &db, &["--idle-timeout", "2s", "--max-uploads", "8"]);
    let (code, body) = raw(
        &s.addr(),
        format!("GET /v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert!(code == 200 && body.contains(r#""account":"alice""#) && body.contains(r#""max_waiting":100"#), "{body}");

    // A stalled upload: cut off after the idle timeout, its partial file removed.
    let mut sock = TcpStream::connect(s.addr()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    sock.write_all(format!("POST /v1/jobs?name=slow&image=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n").as_bytes()).expect("send");
    sock.write_all(b"\xfd7zXZ\0").expect("send");
    assert!(wait_for(Duration::from_secs(5), || !upload_files(&q).is_empty()), "the upload never began");
    let mut answer = String::new();
    let _ = sock.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("sent nothing for 2 s"), "{answer}");
    assert!(upload_files(&q).is_empty(), "{:?}", upload_files(&q));

    // Eight uploads at once: each its own id and file.
    let work = q.root.path().join("home");
    fs::create_dir_all(&work).expect("mkdir");
    let dir = job_dir(&work, "same", "#!/bin/sh\ntrue\n");
    let ids: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let (code, id, err) = client(
                        &s,
                        &alice,
                        &work,
                        &["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"],
                    );
                    assert_eq!(code, 0, "{err}");
                    id.trim().to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 8, "{ids:?}");
    let queued = fs::read_dir(&q.queue)
        .expect("ls")
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().contains(".same_i0")))
        .count();
    assert_eq!(queued, 8);

    // Oversized headers, path-like ids, junk: refused, and the server stays up.
    let many: String = (0..200).map(|i| format!("X-Junk-{i}: {}\r\n", "y".repeat(100))).collect();
    let (code, _) = raw(&s.addr(), format!("GET /v1/jobs HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes());
    assert!(code == 431 || code == 400 || code == 0, "{code}");
    for path in [
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/jobs/%2e%2e",
        "/v1/jobs/0123456789abcdeg/log",
        "/v1/jobs/0123456789abcdef/result",
    ] {
        let (code, _) = raw(
            &s.addr(),
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(code, 404, "{path}");
    }
    let (code, _) = raw(&s.addr(), b"\x16\x03\x01garbage\r\n\r\n");
    assert!(code == 400 || code == 0, "{code}");
    let (code, _) = raw(
        &s.addr(),
        format!("GET /v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(code, 200, "the server is still up");
}

#[test]
fn tls_with_certificate_and_key_files_serves_the_client_and_refuses_plain_http() {
    let q = Queue::new();
    let db = q.root.path().join("server.db");
    let alice = add_account(&db, "alice");
    // A CA of our own and a server certificate it signed, as an operator's would be.
    let (cert, key, ca) = (q.root.path().join("cert.pem"), q.root.path().join("key.pem"), q.root.path().join("ca.pem"));
    fs::write(
        q.root.path().join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    construir_e2e::sh(
        &format!(
            "openssl req -x509 {ec} -days 1 -subj /CN=test-ca -keyout ca.key -out ca.pem 2>&1 \
             && openssl req {ec} -subj /CN=localhost -keyout key.pem -out leaf.csr 2>&1 \
             && openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out cert.pem 2>&1"
        ),
        q.root.path(),
    );
    let s =
        Server::start(&q, &db, &["--tls-cert", cert.to_str().expect("utf8"), "--tls-key", key.to_str().expect("utf8")]);
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);
    let work = q.root.path().join("home");
    fs::create_dir_all(&work).expect("mkdir");
    let dir = job_dir(&work, "secure", "#!/bin/sh\ntrue\n");
    let ca = ca.to_str().expect("utf8");
    let (code, id, err) = client(
        &s,
        &alice,
        &work,
        &["--ca-cert", ca, "submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = client(&s, &alice, &work, &["--ca-cert", ca, "status", id.trim()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""state": "waiting""#), "{out}");
    // Without trusting the certificate the client refuses the server.
    let (code, _, err) = client(&s, &alice, &work, &["status", id.trim()]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach"), "{err}");
    // Plain HTTP on the TLS port gets no answer a client could take for one.
    let (code, _) = raw(
        &s.addr(),
        format!("GET /v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_ne!(code, 200);
    // Under TLS the page's session cookie is Secure (curl with the token in a header file,
    // never on its command line).
    let (_, link, _) = client(&s, &alice, &work, &["--ca-cert", ca, "page"]);
    let secret = link.trim().rsplit('/').next().expect("secret").to_owned();
    let auth = q.root.path().join("form");
    fs::write(&auth, format!("link={secret}")).expect("write");
    let headers = construir_e2e::sh(
        &format!(
            "curl -sS -o /dev/null -D - --cacert {ca} -H 'Sec-Fetch-Site: same-origin' --data-binary @form {}/page/login",
            s.url
        ),
        q.root.path(),
    );
    let cookie = headers.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap_or_default();
    assert!(cookie.contains("HttpOnly") && cookie.contains("; Secure"), "{headers}");
}

#[test]
fn the_api_schema_is_served_to_anyone_is_the_one_in_docs_and_names_every_route() {
    use construir_e2e::server::{api, http};
    let q = Queue::new();
    let db = q.root.path().join("server.db");
    let alice = add_account(&db, "alice");
    let s = Server::start(&q, &db, &[]);
    let kept =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).expect("docs/openapi.json");
    let served = http(&s.addr(), "GET", "/v1/openapi.json", &[], b"");
    assert_eq!(served.code, 200, "{served:?}");
    assert_eq!(served.header("content-type").as_deref(), Some("application/json"));
    assert!(served.body == kept, "the served schema is not docs/openapi.json");
    let printed = server_cmd(&db, &["openapi"]);
    assert!(printed.status.success() && String::from_utf8_lossy(&printed.stdout) == kept, "{printed:?}");

    let doc: serde_json::Value = serde_json::from_str(&kept).expect("the schema is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    // Every operation it names is there, asks for a token, and refuses without one as it says.
    let mut operations = 0;
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("operations") {
            let concrete = path
                .replace("{id}", "0123456789abcdef")
                .replace("{image}", "0")
                .replace("{file}", "image.toml")
                .replace("{key}", &"0".repeat(64));
            let answer = http(&s.addr(), &method.to_uppercase(), &concrete, &[], b"");
            assert_eq!(answer.code, 401, "{method} {path}: {answer:?}");
            let error: wire::ErrorBody = serde_json::from_str(&answer.body).expect("an error body");
            assert!(error.error.contains("token"), "{method} {path}: {error:?}");
            assert_eq!(op["security"][0]["bearer"], serde_json::json!([]), "{method} {path}");
            assert_eq!(
                op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
            operations += 1;
        }
    }
    assert_eq!(operations, 29, "{:?}", paths.keys().collect::<Vec<_>>());
    // Every /v1 route the router serves is in it (the schema itself aside).
    let router = include_str!("../server/src/http/mod.rs");
    let routes: Vec<&str> = router
        .split(".route(")
        .skip(1)
        .filter_map(|r| r.trim_start().strip_prefix('"')?.split('"').next())
        .filter(|r| r.starts_with("/v1/") && *r != "/v1/openapi.json")
        .collect();
    assert_eq!(routes.len(), paths.len(), "{routes:?}");
    for r in &routes {
        assert!(paths.contains_key(*r), "{r} is served but not in the schema");
    }
    // What the server answers reads as the types the schema names.
    let who: wire::Whoami =
        serde_json::from_str(&api(&s.addr(), &alice, "GET", "/v1/whoami", b"").body).expect("whoami");
    assert_eq!(who.account, "alice");
    assert_eq!(who.limits.max_waiting, Some(100));
    let list: wire::JobList = serde_json::from_str(&api(&s.addr(), &alice, "GET", "/v1/jobs", b"").body).expect("jobs");
    assert!(list.jobs.is_empty());
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in ["Job", "Place", "LeaseRequest", "LeaseAnswer", "Renewed", "Delivered", "HostList", "ErrorBody"] {
        assert!(schemas.contains_key(name), "no schema for {name}");
    }
}

#[test]
fn a_verified_rebuild_runs_on_two_hosts_and_names_the_files_that_differ() {
    let Served { q, tokens, s, work, .. } = served(&["alice"], &[]);
    let alice = tokens[0].clone();
    // Two hosts of one VM each: the second run of each pair is kept off the host that took the first.
    let ((a, mut host_a), (b, mut host_b)) = q.spawn_two();
    let running = q.root.path().join("running");

    // What the job makes depends only on its inputs and the fixed environment.
    let repro = job_dir(
        &work,
        "repro",
        "#!/bin/sh\nmkdir -p out\necho \"$SOURCE_DATE_EPOCH\" > out/epoch\necho \"$CONSTRUIR_JOB $TZ\" > out/env\n\
         date -u -d \"@$SOURCE_DATE_EPOCH\" +%Y-%m-%d > out/day\nprintf 'built\\n' > out/tool && chmod 755 out/tool\necho built for \"$SOURCE_DATE_EPOCH\"\n",
    );
    // And one that writes the time it ran into a file, and the boot it ran in.
    // (busybox's date has no %N: the time to the nanosecond is a new file's mtime. A guest's
    // clock moves in ticks from a boot time in whole seconds, so two runs booted together on two
    // hosts can read the same time; the boot id, new at every boot, never repeats.)
    let clock = job_dir(
        &work,
        "clock",
        "#!/bin/sh\nmkdir -p out\necho same > out/same\ntouch out/.now && stat -c %y out/.now > out/when && rm out/.now\n\
         cat /proc/sys/kernel/random/boot_id >> out/when\n",
    );
    let mut ids = Vec::new();
    for dir in [&repro, &clock] {
        let args = ["submit", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--verify-on", "2"];
        let (code, id, err) = client(&s, &alice, &work, &args);
        assert_eq!(code, 0, "{err}");
        ids.push(id.trim().to_owned());
    }
    let (code, _, err) = client(&s, &alice, &work, &["wait", &ids[0]]);
    assert_eq!(code, 0, "ok and reproducible: {err}\n{}\n{}\n{}", q.log("a"), q.log("b"), s.log());
    assert!(err.contains("verified rebuild: reproducible: all 7 files the same on "), "{err}");
    let (_, out, _) = client(&s, &alice, &work, &["status", &ids[0]]);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    let verdict = &status["rebuild"]["verdict"];
    assert_eq!(verdict["outcome"], "reproducible", "{status}");
    assert_eq!(verdict["same_host"], false, "{status}");
    let hosts: Vec<&str> = verdict["hosts"].as_array().expect("hosts").iter().filter_map(|h| h.as_str()).collect();
    assert!(hosts.len() == 2 && hosts.contains(&a.as_str()) && hosts.contains(&b.as_str()), "{hosts:?}");
    assert!(err.contains(&format!("on {} and {}", hosts[0], hosts[1])), "{err}");
    let epoch = status["rebuild"]["epoch"].as_u64().expect("epoch");
    // Both results, each with its own provenance, checked as they are fetched.
    for (run, file) in [("1", "repro_d0.tar.xz"), ("2", "repro_d0.run2.tar.xz")] {
        let dir = format!("run{run}");
        let (code, out, err) = client(&s, &alice, &work, &["fetch", &ids[0], "--run", run, "--unpack", &dir]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim(), file);
        assert!(err.contains("verified: signed by"), "{err}");
        assert_eq!(fs::read_to_string(work.join(&dir).join("out/epoch")).expect("epoch"), format!("{epoch}\n"));
        assert_eq!(fs::read_to_string(work.join(&dir).join("out/env")).expect("env"), "repro UTC\n");
    }
    let provenance = fs::read_to_string(work.join("repro_d0.run2.intoto.jsonl")).expect("provenance");
    let envelope: serde_json::Value = serde_json::from_str(provenance.lines().next().expect("a line")).expect("json");
    use base64::Engine;
    let payload =
        base64::engine::general_purpose::STANDARD.decode(envelope["payload"].as_str().expect("payload")).expect("b64");
    let statement: serde_json::Value = serde_json::from_slice(&payload).expect("statement");
    let rebuild = &statement["predicate"]["buildDefinition"]["externalParameters"]["rebuild"];
    assert_eq!(rebuild["sourceDateEpoch"], epoch, "{statement}");
    assert_eq!(rebuild["name"], "repro");

    // The job that writes the time: not reproducible, and the file named.
    let (code, _, err) = client(&s, &alice, &work, &["wait", &ids[1]]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("done: ok") && err.contains("NOT reproducible: 1 of 5 files differ on "), "{err}");
    assert!(err.contains("out/when (content)"), "{err}");
    let (_, out, _) = client(&s, &alice, &work, &["status", &ids[1]]);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["rebuild"]["verdict"]["differing"], serde_json::json!([{"path": "out/when", "what": "content"}]));
    let (_, list, _) = client(&s, &alice, &work, &["list"]);
    assert_eq!(list.lines().count(), 2, "the second runs are no jobs of their own in the list: {list}");
    assert!(list.contains("; reproducible") && list.contains("; NOT reproducible (1 of 5 files differ)"), "{list}");
    let (code, _, err) = client(&s, &alice, &work, &["log", &ids[1], "--run", "2"]);
    assert_eq!(code, 0, "{err}");
    // The pair's terms are gone once it is decided.
    let pins: Vec<String> = construir_e2e::Queue::list(&running.join(".pins"));
    assert!(pins.iter().all(|p| !p.ends_with(".rebuild") && !p.ends_with(".ranon")), "{pins:?}");

    // With one host left, both runs share it, and the verdict says so.
    signal(&host_b, libc::SIGTERM);
    assert!(host_b.wait().expect("host b").success(), "{}", q.log("b"));
    let (code, id, err) = client(
        &s,
        &alice,
        &work,
        &["submit", repro.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--verify-on", "2", "--wait"],
    );
    assert_eq!(code, 0, "{err}\n{}", q.log("a"));
    assert!(
        err.contains(&format!("reproducible: all 7 files the same both runs on {a} (the farm had one host)")),
        "{err}"
    );
    // Cancelled: the waiting second run goes with the running first.
    let sleeper = job_dir(&work, "sleeper", "#!/bin/sh\necho started sleeping\nsleep 600\n");
    let (code, id2, err) = client(
        &s,
        &alice,
        &work,
        &["submit", sleeper.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--verify-on", "2"],
    );
    assert_eq!(code, 0, "{err}");
    let id2 = id2.trim().to_owned();
    assert!(
        wait_for(Duration::from_secs(60), || client(&s, &alice, &work, &["log", &id2]).1.contains("started sleeping")),
        "{}",
        q.log("a")
    );
    let (code, _, err) = client(&s, &alice, &work, &["cancel", &id2]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = client(&s, &alice, &work, &["wait", &id2]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("verified rebuild: not compared: the first run failed: cancelled"), "{err}");
    let (_, out, _) = client(&s, &alice, &work, &["status", &id2]);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["rebuild"]["second"]["state"], "failed", "{status}");
    assert!(
        status["rebuild"]["second"]["reason"].as_str().unwrap_or_default().starts_with("cancelled by alice"),
        "{status}"
    );
    let _ = id;
    signal(&host_a, libc::SIGTERM);
    assert!(host_a.wait().expect("host a").success(), "{}", q.log("a"));
}
