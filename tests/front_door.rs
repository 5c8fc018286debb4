//! The front door held against hostile clients, queue writers and hosts
//! (issue 17), through the released binaries: a real construir-server on
//! loopback, the `construir` client, and hosts speaking the protocol by
//! hand where what is tried is the protocol itself (the farm tests run real
//! hosts and VMs). Each test names the finding it holds.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use construir_e2e::server::{
    add_account, api, client, connect_from, delivery, http, job_bytes, lease_body, read_answer, result_bytes,
    server_cmd, signed_provenance, submit_raw, test_host_key, upload_files, Answer, Server,
};
use construir_e2e::{wait_for, Queue};

const SECRET: &str = "TOP SECRET: only root reads this";

fn host_account(db: &Path, name: &str) -> String {
    let out = server_cmd(db, &["account", "add", name, "--host"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
}

/// A queue, its database, a submitter alice and a host account.
struct Setup {
    q: Queue,
    db: std::path::PathBuf,
    alice: String,
    host: String,
}

fn setup() -> Setup {
    let q = Queue::new();
    let db = q.root.path().join("server.db");
    let alice = add_account(&db, "alice");
    let host = host_account(&db, "hosta");
    Setup { q, db, alice, host }
}

/// The raw bytes a person would see: none of C0 (but newline and tab), DEL, C1, bidi overrides.
fn assert_clean(what: &str, text: &str) {
    for c in text.chars() {
        let bad = (c.is_control() && c != '\n' && c != '\t')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c);
        assert!(!bad, "{what} shows {:?} raw:\n{text}", c);
    }
}

// Finding 1.
#[test]
fn only_failed_tokens_count_and_a_token_that_verifies_is_never_refused() {
    let Setup { q, db, alice, host } = setup();
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    for _ in 0..30 {
        assert_eq!(http(&addr, "GET", "/v1/jobs", &[], b"").code, 401, "no token: refused, never counted");
    }
    let bad = |i: u32| format!("cst1.1.{i:064x}");
    let codes: Vec<u16> = (0..14).map(|i| api(&addr, &bad(i), "GET", "/v1/jobs", b"").code).collect();
    assert_eq!(&codes[..10], &[401; 10], "{codes:?}");
    assert_eq!(&codes[10..], &[429; 4], "{codes:?}");
    // From the same address, right after: every good token goes through, a host's too.
    assert_eq!(api(&addr, &alice, "GET", "/v1/jobs", b"").code, 200);
    let lease = api(&addr, &host, "POST", "/v1/host/lease", &lease_body(1));
    assert_eq!(lease.code, 200, "{}", lease.body);
    // Another client's failures are its own.
    let mut other = connect_from("127.0.0.2", &addr).expect("connect from 127.0.0.2");
    let req =
        format!("GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", bad(0));
    other.write_all(req.as_bytes()).expect("send");
    assert_eq!(read_answer(&mut other).code, 401);
    // A stranger's bad token naming alice's account id locks nothing either.
    let alice_id = alice.split('.').nth(1).expect("id");
    for i in 0..20 {
        api(&addr, &format!("cst1.{alice_id}.{i:064x}"), "GET", "/v1/jobs", b"");
    }
    assert_eq!(api(&addr, &alice, "GET", "/v1/whoami", b"").code, 200);
    let log = s.log();
    assert!(log.contains("more than 10 bad tokens this minute; answering 429"), "{log}");
    assert!(log.matches("bad token").count() < 30, "failures past the limit are not logged one by one:\n{log}");
}

/// Starts `n` uploads of `len` bytes together: every header and the first bytes
/// are sent before any upload goes on; then each sends the rest. The answers.
fn uploads_together(addr: &str, token: &str, n: usize, len: usize, chunked: bool) -> Vec<Answer> {
    let body = job_bytes(len);
    let mut socks: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr).expect("connect");
            let size = if chunked { "Transfer-Encoding: chunked".to_owned() } else { format!("Content-Length: {len}") };
            let head = format!(
                "POST /v1/jobs?name=together{i}&image=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{size}\r\nConnection: close\r\n\r\n"
            );
            s.write_all(head.as_bytes()).expect("send");
            if chunked {
                s.write_all(format!("{:x}\r\n", 6).as_bytes()).expect("send");
                s.write_all(&body[..6]).expect("send");
                s.write_all(b"\r\n").expect("send");
            } else {
                s.write_all(&body[..6]).expect("send");
            }
            s
        })
        .collect();
    // Every upload is under way (or already refused) before any finishes.
    std::thread::sleep(Duration::from_millis(500));
    socks
        .iter_mut()
        .map(|s| {
            let rest = &body[6..];
            let sent = if chunked {
                s.write_all(format!("{:x}\r\n", rest.len()).as_bytes())
                    .and_then(|()| s.write_all(rest))
                    .and_then(|()| s.write_all(b"\r\n0\r\n\r\n"))
            } else {
                s.write_all(rest)
            };
            let _ = sent;
            read_answer(s)
        })
        .collect()
}

// Finding 2.
#[test]
fn quotas_are_reserved_when_an_upload_starts_so_uploads_started_together_pass_no_check_twice() {
    let Setup { q, db, alice, .. } = setup();
    let out = server_cmd(
        &db,
        &["account", "limits", "alice", "--max-waiting", "1", "--max-stored", "100K", "--max-per-hour", "1"],
    );
    assert!(out.status.success());
    let bob = add_account(&db, "bob");
    let out = server_cmd(&db, &["account", "limits", "bob", "--max-stored", "200K"]);
    assert!(out.status.success());
    let carol = add_account(&db, "carol");
    let s = Server::start(&q, &db, &["--max-uploads", "2"]);
    let addr = s.addr();

    // The finding as it was shown: five slow uploads together, one gets in.
    let answers = uploads_together(&addr, &alice, 5, 90 << 10, false);
    let accepted = answers.iter().filter(|a| a.code == 201).count();
    assert_eq!(accepted, 1, "{answers:#?}");
    for a in answers.iter().filter(|a| a.code != 201) {
        assert_eq!(a.code, 429, "{a:?}");
        let limit = a.json()["limit"].as_str().unwrap_or_default().to_owned();
        assert!(["max_waiting", "max_per_hour", "max_uploads"].contains(&limit.as_str()), "{a:?}");
    }
    let stored: u64 = fs::read_dir(&q.queue)
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("alice."))
        .map(|e| e.metadata().expect("stat").len())
        .sum();
    assert_eq!(stored, 90 << 10, "alice holds one job's bytes");

    // Sent in chunks (no length): an upload reserves all the room it may take.
    let answers = uploads_together(&addr, &bob, 2, 150 << 10, true);
    let codes: Vec<u16> = answers.iter().map(|a| a.code).collect();
    assert!(codes.contains(&201) && codes.contains(&413), "{answers:#?}");
    let refused = answers.iter().find(|a| a.code == 413).expect("refused");
    assert_eq!(refused.json()["limit"], "max_stored_bytes", "{refused:?}");

    // Uploads under way are capped per account.
    let answers = uploads_together(&addr, &carol, 3, 70 << 10, false);
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.code != 201).collect();
    assert_eq!(refused.len(), 1, "{answers:#?}");
    assert_eq!(refused[0].json()["limit"], "max_uploads", "{:?}", refused[0]);
    assert!(refused[0].body.contains("2 of your uploads are under way; the limit is 2"), "{:?}", refused[0]);
    assert!(wait_for(Duration::from_secs(5), || upload_files(&q).is_empty()), "{:?}", upload_files(&q));
    drop(s);

    // A disk that would fall below its reserve takes nothing, and says why.
    let s = Server::start(&q, &db, &["--min-free", "100000000G"]);
    let before = fs::read_dir(&q.queue).expect("ls").count();
    let a = submit_raw(&s.addr(), &carol, "big", &job_bytes(70 << 10));
    assert_eq!(a.code, 507, "{a:?}");
    assert!(a.body.contains("the server's disk is too full") && a.body.contains("are kept free"), "{}", a.body);
    assert_eq!(fs::read_dir(&q.queue).expect("ls").count(), before, "nothing stayed behind");
    let (_, list, _) = client(&s, &carol, q.root.path(), &["list"]);
    assert!(!list.contains("big"), "{list}");
}

// Finding 3.
#[test]
fn a_queue_writer_s_links_and_planted_files_are_never_attributed_leased_listed_or_served() {
    let Setup { q, db, alice, host } = setup();
    let secret = q.root.path().join("secret");
    fs::write(&secret, SECRET).expect("write");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    // Planted before the server starts, and after: links, a second name, a writer's own file.
    let link = |dir: &Path, name: &str| std::os::unix::fs::symlink(&secret, dir.join(name)).expect("symlink");
    link(&q.queue, "alice.0123456789abcdef.pwn_i0.tar.xz");
    fs::hard_link(&secret, q.queue.join("alice.1111111111111111.pwn_i0.tar.xz")).expect("link");
    fs::write(q.queue.join("alice.2222222222222222.mine_i0.tar.xz"), job_bytes(70 << 10)).expect("write");
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    link(&q.done, "alice.3333333333333333.d_d0.tar.xz");
    link(&q.done, "alice.3333333333333333.d_d0.log");
    link(&q.failed, "alice.4444444444444444.f_i0.tar.xz");
    fs::create_dir_all(q.root.path().join("running/h1")).expect("mkdir");
    link(&q.root.path().join("running/h1"), "alice.5555555555555555.r_i0.tar.xz");
    std::thread::sleep(Duration::from_secs(3));
    assert!(s.log().contains("3 job file(s) in the directories have a server-style name but no record"), "{}", s.log());

    let list = api(&addr, &alice, "GET", "/v1/jobs", b"");
    assert_eq!(list.json()["jobs"].as_array().map(Vec::len), Some(0), "{}", list.body);
    for id in ["0123456789abcdef", "1111111111111111", "2222222222222222", "3333333333333333", "4444444444444444"] {
        for what in ["", "/log", "/result"] {
            let a = api(&addr, &alice, "GET", &format!("/v1/jobs/{id}{what}"), b"");
            assert_eq!(a.code, 404, "{id}{what}: {a:?}");
        }
    }
    let lease = api(&addr, &host, "POST", "/v1/host/lease", &lease_body(1));
    assert_eq!(lease.json()["lease"], serde_json::Value::Null, "{}", lease.body);
    for id in ["0123456789abcdef", "1111111111111111", "2222222222222222"] {
        let a = api(&addr, &host, "GET", &format!("/v1/host/jobs/{id}/file?seq=1"), b"");
        assert_eq!(a.code, 409, "{a:?}");
        assert!(!a.body.contains("TOP SECRET"));
    }

    // alice's own job, swapped in the queue for a link and then for another file: never
    // handed out, never served.
    let a = submit_raw(&addr, &alice, "real", &job_bytes(70 << 10));
    assert_eq!(a.code, 201, "{a:?}");
    let id = a.json()["id"].as_str().expect("id").to_owned();
    let file = q.queue.join(format!("alice.{id}.real_i0.tar.xz"));
    assert_eq!(fs::metadata(&file).expect("stat").mode() & 0o777, 0o640, "the server's job files are 0640");
    fs::remove_file(&file).expect("rm");
    std::os::unix::fs::symlink(&secret, &file).expect("symlink");
    assert!(wait_for(Duration::from_secs(5), || api(&addr, &alice, "GET", &format!("/v1/jobs/{id}"), b"").json()
        ["state"]
        == "missing"));
    let lease = api(&addr, &host, "POST", "/v1/host/lease", &lease_body(1));
    assert_eq!(lease.json()["lease"], serde_json::Value::Null, "a link is never leased: {}", lease.body);
    fs::remove_file(&file).expect("rm");
    fs::write(&file, job_bytes(70 << 10)).expect("another inode");
    let lease = api(&addr, &host, "POST", "/v1/host/lease", &lease_body(1));
    assert_eq!(lease.json()["lease"], serde_json::Value::Null, "another inode is never leased: {}", lease.body);
    assert_eq!(fs::read_to_string(&secret).expect("read"), SECRET, "the secret is untouched");
    assert!(!s.log().contains("TOP SECRET"));
}

// Finding 4.
#[test]
fn a_reused_account_name_inherits_nothing_and_conflicting_names_never_stop_the_server() {
    let Setup { q, db, alice, .. } = setup();
    let s = Server::start(&q, &db, &[]);
    let a = submit_raw(&s.addr(), &alice, "old", &job_bytes(70 << 10));
    assert_eq!(a.code, 201, "{a:?}");
    let id = a.json()["id"].as_str().expect("id").to_owned();
    drop(s);
    let out = server_cmd(&db, &["account", "remove", "alice"]);
    assert!(out.status.success());
    let alice = add_account(&db, "alice");
    // Names that collide with recorded ones, and a crafted id.
    fs::write(q.queue.join(format!("bob.{id}.x_i0.tar.xz")), job_bytes(70 << 10)).expect("write");
    fs::write(q.done.join(format!("alice.{id}.other_d0.tar.xz")), b"x").expect("write");
    fs::write(q.queue.join("alice.0000000000000000.zero_i0.tar.xz"), job_bytes(70 << 10)).expect("write");
    fs::write(q.queue.join(format!("removed-1-alice.{id}.old_i0.tar.xz")), job_bytes(70 << 10)).expect("write");
    let s = Server::start(&q, &db, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let addr = s.addr();
    let list = api(&addr, &alice, "GET", "/v1/jobs", b"");
    assert_eq!(list.code, 200);
    assert_eq!(list.json()["jobs"].as_array().map(Vec::len), Some(0), "the new alice inherits nothing: {}", list.body);
    assert_eq!(api(&addr, &alice, "GET", &format!("/v1/jobs/{id}"), b"").code, 404);
    // Restarted again with all of it in place: the server starts and keeps following.
    s.kill();
    let s = Server::start(&q, &db, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let log = s.log();
    assert!(!log.contains("cannot follow") && !log.contains("UNIQUE") && !log.contains("error:"), "{log}");
    assert_eq!(api(&s.addr(), &alice, "GET", "/v1/whoami", b"").code, 200);
}

/// Plays a local host for job `file_name` (in the queue): claims it, and
/// delivers `status_json` as its result's job_status.json with `log` as its log.
fn deliver_by_hand(q: &Queue, file_name: &str, status_json: &[u8], log: &[u8]) {
    let job = jobfile::JobName::parse(file_name).expect("name");
    let host = q.root.path().join("running/h1");
    fs::create_dir_all(&host).expect("mkdir");
    fs::rename(q.queue.join(file_name), host.join(file_name)).expect("claim");
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("job_status.json"), status_json).expect("write");
    let result = dir.path().join("r.tar.xz");
    construir_e2e::sh(&format!("tar -cf - job_status.json | xz > '{}'", result.display()), dir.path());
    fs::write(q.done.join(job.done_with_extension("log")), log).expect("log");
    fs::copy(&result, q.done.join(job.done_file_name())).expect("result");
    fs::remove_file(host.join(file_name)).expect("end the claim");
}

// Finding 6.
#[test]
fn the_client_shows_every_byte_a_guest_wrote_escaped_in_every_command_and_format() {
    let Setup { q, db, alice, .. } = setup();
    let s = Server::start(&q, &db, &[]);
    let a = submit_raw(&s.addr(), &alice, "evil", &job_bytes(70 << 10));
    let id = a.json()["id"].as_str().expect("id").to_owned();
    let hostile = "A\u{9b}31mB\u{202e}C\u{7f}D\u{1b}[2JE\u{2066}F";
    let status = serde_json::json!({
        "result": "ok",
        "exit_code": 0,
        "init_version": hostile,
        "job": hostile,
        "image": hostile,
        hostile: hostile,
    });
    let log = format!("out {hostile}\nconstruir-host: verdict: ok {hostile}\n");
    deliver_by_hand(&q, &format!("alice.{id}.evil_i0.tar.xz"), status.to_string().as_bytes(), log.as_bytes());
    let work = q.root.path();
    for args in [vec!["status", &id], vec!["list"], vec!["wait", &id], vec!["log", &id]] {
        let (code, out, err) = client(&s, &alice, work, &args);
        assert!(code == 0, "{args:?}: {err}");
        assert_clean(&format!("construir {args:?} (stdout)"), &out);
        assert_clean(&format!("construir {args:?} (stderr)"), &err);
        assert!(out.contains(r"\u{202e}") || err.contains(r"\u{202e}"), "{args:?}: the escape is shown: {out}{err}");
    }
    let (_, out, _) = client(&s, &alice, work, &["status", &id]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
    assert_eq!(v["status"]["result"], "ok");
}

// Finding 7.
#[test]
fn half_headers_trickled_uploads_and_connection_floods_are_cut_off() {
    let Setup { q, db, alice, .. } = setup();
    let s = Server::start(&q, &db, &["--header-timeout", "2s", "--idle-timeout", "3s", "--upload-timeout", "5s"]);
    let addr = s.addr();
    // Half a header: closed at the header timeout.
    let mut half = TcpStream::connect(&addr).expect("connect");
    half.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthor").expect("send");
    half.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = half.read_to_end(&mut buf);
    assert!(t.elapsed() < Duration::from_secs(8), "half a header held a connection for {:?}", t.elapsed());

    // One byte a second keeps the idle timeout at bay; the whole upload's deadline does not.
    let mut slow = TcpStream::connect(&addr).expect("connect");
    let head = format!("POST /v1/jobs?name=trickle&image=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n");
    slow.write_all(head.as_bytes()).expect("send");
    slow.write_all(b"\xfd7zXZ\0").expect("send");
    let t = Instant::now();
    slow.set_nonblocking(false).expect("blocking");
    let trickle = std::thread::spawn({
        let mut s = slow.try_clone().expect("clone");
        move || {
            for _ in 0..20 {
                if s.write_all(b"\0").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    });
    let answer = read_answer(&mut slow);
    assert_eq!(answer.code, 408, "{answer:?}");
    assert!(answer.body.contains("took longer than the 5 s allowed"), "{}", answer.body);
    assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());
    let _ = trickle.join();
    assert!(wait_for(Duration::from_secs(5), || upload_files(&q).is_empty()), "{:?}", upload_files(&q));

    drop(s);

    // A flood from one address: it gets its share, and others are served.
    let s = Server::start(&q, &db, &["--max-connections", "12", "--max-connections-per-address", "8"]);
    let addr = s.addr();
    let closed_now = |c: &TcpStream| {
        c.set_nonblocking(true).expect("nonblocking");
        let closed = matches!((&*c).read(&mut [0u8; 1]), Ok(0));
        c.set_nonblocking(false).expect("blocking");
        closed
    };
    let flood: Vec<TcpStream> = (0..12).filter_map(|_| connect_from("127.0.0.3", &addr).ok()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed = flood.iter().filter(|c| closed_now(c)).count();
    assert_eq!(closed, 4, "12 from one address, 8 allowed");
    assert_eq!(api(&addr, &alice, "GET", "/v1/whoami", b"").code, 200, "others are still served");
    // The server frees that request's slot just after its answer is sent:
    // give it a moment, or the count below can still include it.
    std::thread::sleep(Duration::from_millis(500));
    // Everyone's: past the total, connections are closed, whoever opens them.
    let more: Vec<TcpStream> = (0..4).filter_map(|_| connect_from("127.0.0.4", &addr).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(more.iter().filter(|c| closed_now(c)).count(), 0, "8 + 4 is within the 12 allowed");
    let late = connect_from("127.0.0.5", &addr).expect("connect");
    std::thread::sleep(Duration::from_millis(300));
    assert!(closed_now(&late), "the thirteenth connection is closed");
    drop((flood, more));
    assert!(wait_for(Duration::from_secs(5), || api(&addr, &alice, "GET", "/v1/whoami", b"").code == 200));
    let log = s.log();
    assert!(
        log.contains("connections from this address, the limit") && log.contains("connections are open, the limit"),
        "{log}"
    );
}

/// The session cookie an answer sets.
fn cookie_of(a: &Answer) -> Option<String> {
    a.header("set-cookie").and_then(|c| c.split(';').next().map(str::to_owned))
}

// Finding 8 (and 12's login links).
#[test]
fn page_sessions_need_a_confirmed_same_origin_sign_in_end_with_the_token_and_send_their_policy() {
    let Setup { q, db, alice, .. } = setup();
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    let link =
        |token: &str| api(&addr, token, "POST", "/v1/page-link", b"").json()["path"].as_str().expect("path").to_owned();
    let path = link(&alice);
    let secret = path.rsplit('/').next().expect("secret").to_owned();
    let shown = http(&addr, "GET", &path, &[], b"");
    assert_eq!(shown.code, 200);
    assert!(shown.body.contains("Sign in as <b>alice</b>?") && shown.header("set-cookie").is_none(), "{shown:?}");
    let csp = shown.header("content-security-policy").expect("a CSP header");
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(shown.header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(shown.header("x-content-type-options").as_deref(), Some("nosniff"));
    let form = format!("link={secret}");
    let post = |headers: &[(&str, &str)]| {
        let mut h = vec![("Content-Type", "application/x-www-form-urlencoded")];
        h.extend_from_slice(headers);
        http(&addr, "POST", "/page/login", &h, form.as_bytes())
    };
    assert_eq!(post(&[("Sec-Fetch-Site", "cross-site")]).code, 403, "a form on another site");
    assert_eq!(post(&[("Origin", "http://evil.example")]).code, 403, "another origin");
    let signed = post(&[("Sec-Fetch-Site", "same-origin")]);
    assert_eq!(signed.code, 303, "{signed:?}");
    let set = signed.header("set-cookie").expect("a cookie");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && !set.contains("Secure"), "{set}");
    let cookie = cookie_of(&signed).expect("cookie");
    assert_eq!(post(&[("Sec-Fetch-Site", "same-origin")]).code, 404, "a link works once");
    let page = http(&addr, "GET", "/page", &[("Cookie", &cookie)], b"");
    assert_eq!(page.code, 200);
    assert!(page.body.contains("alice <small>0 job(s)</small>"), "{}", page.body);
    // A new token ends the session, and every link made with the old one.
    let pending = link(&alice);
    let out = server_cmd(&db, &["account", "token", "alice"]);
    assert!(out.status.success());
    let alice = String::from_utf8(out.stdout).expect("utf8").trim().to_owned();
    assert_eq!(http(&addr, "GET", "/page", &[("Cookie", &cookie)], b"").code, 401, "the session outlived its token");
    assert_eq!(http(&addr, "GET", &pending, &[], b"").code, 404, "a link outlived its token");
    // Links are bounded: of a hundred, the oldest no longer work.
    let first = link(&alice);
    for _ in 0..100 {
        link(&alice);
    }
    assert_eq!(http(&addr, "GET", &first, &[], b"").code, 404);
    // A log is served as text that no browser sniffs into a page.
    let a = submit_raw(&addr, &alice, "l", &job_bytes(70 << 10));
    let id = a.json()["id"].as_str().expect("id").to_owned();
    deliver_by_hand(&q, &format!("alice.{id}.l_i0.tar.xz"), br#"{"result":"ok"}"#, b"<script>x</script>\n");
    let log = api(&addr, &alice, "GET", &format!("/v1/jobs/{id}/log"), b"");
    assert_eq!(log.code, 200);
    assert_eq!(log.header("x-content-type-options").as_deref(), Some("nosniff"));
    assert!(log.header("content-type").is_some_and(|t| t.starts_with("text/plain")));
}

/// A host's lease of the one waiting job: (id, seq).
fn lease_one(addr: &str, host: &str) -> (String, u64) {
    let a = api(addr, host, "POST", "/v1/host/lease", &lease_body(1));
    let lease = &a.json()["lease"];
    assert!(lease.is_object(), "{a:?}");
    (lease["id"].as_str().expect("id").to_owned(), lease["seq"].as_u64().expect("seq"))
}

// Finding 9.
#[test]
fn two_deliveries_on_one_lease_never_share_a_staging_file_and_the_accepted_result_stays_whole() {
    let Setup { q, db, alice, host } = setup();
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    let a = submit_raw(&addr, &alice, "twice", &job_bytes(70 << 10));
    assert_eq!(a.code, 201);
    let (id, seq) = lease_one(&addr, &host);
    let log = b"construir-host: verdict: ok (exit code 0)\n";
    let key = test_host_key();
    let (a_result, b_result) = (result_bytes(&"A".repeat(1000)), result_bytes(&"B".repeat(1000)));
    let (path, a_body) =
        delivery(&id, seq, log, &signed_provenance(&key, "hosta", &job_bytes(70 << 10), &a_result, log), &a_result);
    // The first delivery starts, sends all but the last 100 bytes of its result, and waits.
    let mut first = TcpStream::connect(&addr).expect("connect");
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", a_body.len());
    first.write_all(head.as_bytes()).expect("send");
    first.write_all(&a_body[..a_body.len() - 100]).expect("send");
    std::thread::sleep(Duration::from_millis(500));
    // The second delivers whole and is accepted.
    let (b_path, b_body) =
        delivery(&id, seq, log, &signed_provenance(&key, "hosta", &job_bytes(70 << 10), &b_result, log), &b_result);
    let second = api(&addr, &host, "POST", &b_path, &b_body);
    assert_eq!(second.code, 200, "{second:?}");
    // The first goes on: refused, and the accepted result is untouched.
    first.write_all(&a_body[a_body.len() - 100..]).expect("send");
    let answer = read_answer(&mut first);
    assert_eq!(answer.code, 409, "{answer:?}");
    let result = fs::read(q.done.join(format!("alice.{id}.twice_d0.tar.xz"))).expect("the result");
    assert_eq!(result, b_result);
    // Its provenance beside it is the second's, and verifies.
    let provenance = q.done.join(format!("alice.{id}.twice_d0.intoto.jsonl"));
    let checked = construir_provenance::verify(
        &q.done.join(format!("alice.{id}.twice_d0.tar.xz")),
        &provenance,
        &[key.public()],
        None,
    );
    assert!(checked.is_ok(), "{checked:?}");
    let staged: Vec<String> = fs::read_dir(&q.done)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
}

// Finding 10.
#[test]
fn a_host_s_image_list_is_bounded_and_checked_before_anyone_is_shown_it() {
    let Setup { q, db, alice, host } = setup();
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    let sum = construir_e2e::server::i0_checksum();
    let body = |images: &str, version: &str| {
        format!(r#"{{"images":[{images}],"capacity":1,"running":0,"version":"{version}"}}"#).into_bytes()
    };
    let image = |name: &str, checksum: &str| format!(r#"{{"name":"{name}","checksum":"{checksum}"}}"#);
    let huge = vec![image("0", &sum); 20_000].join(",");
    assert_eq!(api(&addr, &host, "POST", "/v1/host/lease", &body(&huge, "1")).code, 413, "a 1.9 MB list");
    let many = (0..65).map(|i| image(&i.to_string(), &sum)).collect::<Vec<_>>().join(",");
    let a = api(&addr, &host, "POST", "/v1/host/lease", &body(&many, "1"));
    assert!(a.code == 400 && a.body.contains("at most 64"), "{a:?}");
    for (images, version) in [
        (image("0\u{202e}", &sum), "1".to_owned()),
        (image("0", &format!("{}\u{9b}", &sum[..63])), "1".to_owned()),
        (image("0", &sum.to_uppercase()), "1".to_owned()),
        (image("0", &sum), "1\u{9b}2".to_owned()),
        (image("0", &sum), "x".repeat(65)),
    ] {
        let a = api(&addr, &host, "POST", "/v1/host/lease", &body(&images, &version));
        assert_eq!(a.code, 400, "{images} {version}: {a:?}");
    }
    let a = api(&addr, &host, "POST", "/v1/host/lease", &body(&image("0", &sum), "0.1.0"));
    assert_eq!(a.code, 200, "{a:?}");
    let hosts = api(&addr, &alice, "GET", "/v1/hosts", b"");
    assert_clean("/v1/hosts", &hosts.body);
    let v = hosts.json();
    assert_eq!(v["hosts"][0]["images"][0]["name"], "0", "{v}");
    assert_eq!(v["hosts"][0]["version"], "0.1.0");
    assert!(hosts.body.len() < 4096, "{} bytes", hosts.body.len());
}

// Finding 11.
#[test]
fn a_cancel_that_comes_after_the_end_leaves_nothing_behind_and_wait_returns() {
    let Setup { q, db, alice, .. } = setup();
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    let a = submit_raw(&addr, &alice, "ends", &job_bytes(70 << 10));
    let id = a.json()["id"].as_str().expect("id").to_owned();
    let file_name = format!("alice.{id}.ends_i0.tar.xz");
    deliver_by_hand(
        &q,
        &file_name,
        br#"{"result":"ok","exit_code":0}"#,
        b"construir-host: verdict: ok (exit code 0)\n",
    );
    let cancel = api(&addr, &alice, "POST", &format!("/v1/jobs/{id}/cancel"), b"");
    assert_eq!(cancel.code, 409, "{cancel:?}");
    let marker = q.root.path().join("running/.cancel").join(&file_name);
    assert!(!marker.exists(), "no request is left for a job that ended");
    // A request a slow host or an old server left behind: the job is not "running on .cancel".
    fs::create_dir_all(marker.parent().expect("dir")).expect("mkdir");
    fs::write(&marker, b"").expect("write");
    let job = api(&addr, &alice, "GET", &format!("/v1/jobs/{id}"), b"").json();
    assert_eq!(job["state"], "done", "{job}");
    assert!(!marker.exists(), "the stale request is removed once the job is seen ended");
    let (code, _, err) = client(&s, &alice, q.root.path(), &["wait", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("done: ok"), "{err}");
    // A waiting job's marker (planted) does not make it running either.
    let a = submit_raw(&addr, &alice, "waits", &job_bytes(70 << 10));
    let waiting = a.json()["id"].as_str().expect("id").to_owned();
    fs::write(marker.parent().expect("dir").join(format!("alice.{waiting}.waits_i0.tar.xz")), b"").expect("write");
    let job = api(&addr, &alice, "GET", &format!("/v1/jobs/{waiting}"), b"").json();
    assert_eq!(job["state"], "waiting", "{job}");
}

// Finding 12 (modes; the login links are above, the docs in SECURITY.md).
#[test]
fn the_database_its_journal_and_stored_job_files_are_not_readable_by_others() {
    let Setup { q, db, alice, .. } = setup();
    let s = Server::start(&q, &db, &[]);
    let a = submit_raw(&s.addr(), &alice, "m", &job_bytes(70 << 10));
    let id = a.json()["id"].as_str().expect("id").to_owned();
    let mode = |p: &Path| fs::metadata(p).map(|m| m.mode() & 0o777).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(mode(&db), 0o600);
    for ext in ["-wal", "-shm"] {
        let p = q.root.path().join(format!("server.db{ext}"));
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    assert_eq!(mode(&q.queue.join(format!("alice.{id}.m_i0.tar.xz"))), 0o640);
    let help = std::process::Command::new(construir_e2e::bin("construir")).arg("--help").output().expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--token-file") && !help.contains("--token <TOKEN>"), "{help}");
    // A token file others can read works, with a warning; a private one without.
    let token_file = q.root.path().join("token");
    fs::write(&token_file, format!("{alice}\n")).expect("write");
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        fs::set_permissions(&token_file, fs::Permissions::from_mode(mode)).expect("chmod");
        let out = std::process::Command::new(construir_e2e::bin("construir"))
            .args(["--server", &s.url, "--token-file"])
            .arg(&token_file)
            .arg("list")
            .env("HOME", q.root.path())
            .output()
            .expect("construir");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(err.contains("others on this machine can read it"), warned, "{mode:o}: {err}");
        assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "the token file's token was used");
    }
}

/// Provenance at the server: a result whose provenance does not verify
/// against the host's pinned key is refused with the check that failed
/// (tampered result, tampered statement, another key, no signature, none
/// at all); the host's key is pinned at its first request, another key is
/// refused until an operator unpins it; the keys are published; a result
/// that verifies is accepted with its provenance beside it.
#[test]
fn a_result_whose_provenance_does_not_verify_is_refused_saying_which_check_failed() {
    use base64::Engine;
    let Setup { q, db, alice, host } = setup();
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    assert_eq!(submit_raw(&addr, &alice, "signed", &job_bytes(70 << 10)).code, 201);
    let (id, seq) = lease_one(&addr, &host);
    let key = test_host_key();
    let log = b"construir-host: verdict: ok (exit code 0)\n";
    let result = result_bytes("the real result");
    let job = job_bytes(70 << 10);
    let good = signed_provenance(&key, "hosta", &job, &result, log);
    let deliver = |provenance: &[u8], result: &[u8]| {
        let (path, body) = delivery(&id, seq, log, provenance, result);
        api(&addr, &host, "POST", &path, &body)
    };
    // Each refusal says which check failed, and leaves the lease as it was.
    let tampered_result = result_bytes("another result");
    let mut envelope: serde_json::Value = serde_json::from_slice(&good).expect("an envelope");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut statement: serde_json::Value =
        serde_json::from_slice(&b64.decode(envelope["payload"].as_str().expect("payload")).expect("base64"))
            .expect("json");
    statement["predicate"]["buildDefinition"]["externalParameters"]["image"]["name"] = "i7".into();
    let mut changed = envelope.clone();
    changed["payload"] = b64.encode(serde_json::to_vec(&statement).expect("json")).into();
    envelope["signatures"] = serde_json::json!([]);
    let line = |v: &serde_json::Value| {
        let mut l = serde_json::to_vec(v).expect("json");
        l.push(b'\n');
        l
    };
    let other_key = signed_provenance(&construir_provenance::HostKey::from_seed([5; 32]), "hosta", &job, &result, log);
    // Its own key, but signed as another host (one that exists, one that does not).
    let as_hostb = signed_provenance(&key, "hostb", &job, &result, log);
    let as_nobody = signed_provenance(&key, "nobody", &job, &result, log);
    // Its own key and name, but for another job file.
    let other_job = signed_provenance(&key, "hosta", b"another job", &result, log);
    for (what, provenance, body, why) in [
        ("a tampered result", good.clone(), tampered_result.clone(), "the result is not the one the host signed"),
        ("a tampered statement", line(&changed), result.clone(), "the statement or the signature was changed"),
        ("another key", other_key, result.clone(), "no signature is by a key given"),
        ("no signature", line(&envelope), result.clone(), "the envelope has no signature"),
        ("no provenance", Vec::new(), result.clone(), "holds no envelope"),
        ("signed as hostb", as_hostb, result.clone(), "it is signed as construir-host:hostb, not as hosta"),
        ("signed as nobody", as_nobody, result.clone(), "it is signed as construir-host:nobody, not as hosta"),
        ("another job's", other_job, result.clone(), "its statement names the job file"),
    ] {
        let a = deliver(&provenance, &body);
        assert_eq!(a.code, 422, "{what}: {a:?}");
        assert!(a.body.contains("the result is refused: ") && a.body.contains(why), "{what}: {}", a.body);
    }
    let done = q.done.join(format!("alice.{id}.signed_d0.tar.xz"));
    assert!(!done.exists(), "a refused result landed");
    // The one that verifies is taken, its provenance beside it.
    let a = deliver(&good, &result);
    assert_eq!(a.code, 200, "{a:?}");
    assert_eq!(fs::read(&done).expect("the result"), result);
    let checked = construir_provenance::verify(
        &done,
        &q.done.join(format!("alice.{id}.signed_d0.intoto.jsonl")),
        &[key.public()],
        Some(&q.done.join(format!("alice.{id}.signed_d0.log"))),
    );
    assert!(checked.is_ok(), "{checked:?}");
    // The submitter gets it through the API, and the keys are published.
    let p = api(&addr, &alice, "GET", &format!("/v1/jobs/{id}/provenance"), b"");
    assert_eq!((p.code, p.body.as_bytes()), (200, &good[..]), "{p:?}");
    let keys = api(&addr, &alice, "GET", "/v1/hosts/keys", b"").json();
    assert_eq!(keys["keys"], serde_json::json!([{"host": "hosta", "key": key.public().to_string()}]), "{keys}");
    // Another key from the same host is refused, until an operator unpins the old one.
    let other = construir_provenance::HostKey::from_seed([6; 32]).public().to_string();
    let body = String::from_utf8(lease_body(1)).expect("utf8").replace(&key.public().to_string(), &other);
    let refused = api(&addr, &host, "POST", "/v1/host/lease", body.as_bytes());
    assert_eq!(refused.code, 403, "{refused:?}");
    assert!(
        refused.body.contains("is pinned for it") && refused.body.contains("account unpin-key hosta"),
        "{}",
        refused.body
    );
    let out = server_cmd(&db, &["account", "unpin-key", "hosta"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(api(&addr, &host, "POST", "/v1/host/lease", body.as_bytes()).code, 200);
    let keys = api(&addr, &alice, "GET", "/v1/hosts/keys", b"").json();
    assert_eq!(keys["keys"][0]["key"], other.as_str(), "{keys}");
}

#[test]
fn a_verified_rebuild_counts_twice_and_its_second_run_is_leased_to_another_host() {
    let Setup { q, db, alice, host } = setup();
    let hostb = host_account(&db, "hostb");
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    // Both hosts are live before the job comes: the second run is kept apart from the first.
    for h in [&host, &hostb] {
        assert_eq!(api(&addr, h, "POST", "/v1/host/lease", &lease_body(2)).json()["lease"], serde_json::Value::Null);
    }
    // It counts as two jobs: with room for one, the second run is refused and nothing is kept.
    let out = server_cmd(&db, &["account", "limits", "alice", "--max-waiting", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refused = api(&addr, &alice, "POST", "/v1/jobs?name=pair&image=0&verify_on=2", &job_bytes(70 << 10));
    assert_eq!(refused.code, 429, "{refused:?}");
    assert!(refused.body.contains("a verified rebuild's second run counts as a job of its own"), "{}", refused.body);
    assert!(wait_for(Duration::from_secs(5), || upload_files(&q).is_empty()), "{:?}", upload_files(&q));
    let bad = api(&addr, &alice, "POST", "/v1/jobs?name=pair&image=0&verify_on=3", &job_bytes(70 << 10));
    assert_eq!(bad.code, 400, "{bad:?}");
    assert!(bad.body.contains("verify_on=3"), "{}", bad.body);
    let out = server_cmd(&db, &["account", "limits", "alice", "--max-waiting", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = api(&addr, &alice, "POST", "/v1/jobs?name=pair&image=0&verify_on=2", &job_bytes(70 << 10));
    assert_eq!(job.code, 201, "{job:?}");
    let job = job.json();
    let id = job["id"].as_str().expect("id").to_owned();
    assert_eq!(job["place"]["position"], 1, "{job}");
    let epoch = job["rebuild"]["epoch"].as_u64().expect("an epoch");
    assert_eq!(job["rebuild"]["second"]["state"], "waiting", "{job}");
    let listed = api(&addr, &alice, "GET", "/v1/jobs", b"").json();
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(1), "the second run is no job of its own: {listed}");
    assert_eq!(listed["jobs"][0]["rebuild"]["second"]["state"], "waiting", "{listed}");

    // hosta takes one run (either may come first); though it has room, the other is left to hostb.
    let first = api(&addr, &host, "POST", "/v1/host/lease", &lease_body(2)).json();
    assert_eq!(first["lease"]["rebuild"]["name"], "pair", "{first}");
    assert_eq!(first["lease"]["rebuild"]["epoch"], epoch, "{first}");
    assert_eq!(first["lease"]["rebuild"]["apart_until"], 0, "placed already: {first}");
    let again = api(&addr, &host, "POST", "/v1/host/lease", &lease_body(2)).json();
    assert_eq!(again["lease"], serde_json::Value::Null, "hosta ran the other run: {again}");
    let second = api(&addr, &hostb, "POST", "/v1/host/lease", &lease_body(2)).json();
    assert_eq!(second["lease"]["rebuild"]["sibling"], first["lease"]["file_name"], "{second}");
    assert_eq!(first["lease"]["rebuild"]["sibling"], second["lease"]["file_name"], "{first}");
    assert_eq!(second["lease"]["rebuild"]["name"], "pair");
    assert_eq!(second["lease"]["rebuild"]["epoch"], epoch);
    let ids = [first["lease"]["id"].as_str().expect("id"), second["lease"]["id"].as_str().expect("id")];
    assert!(ids.contains(&id.as_str()) && ids[0] != ids[1], "{ids:?}");
    let (first_host, second_host) = if ids[0] == id { ("hosta", "hostb") } else { ("hostb", "hosta") };
    let second_id = if ids[0] == id { ids[1] } else { ids[0] }.to_owned();
    let shown = api(&addr, &alice, "GET", &format!("/v1/jobs/{id}"), b"").json();
    assert_eq!(shown["place"]["host"], first_host, "{shown}");
    assert_eq!(shown["rebuild"]["second"]["host"], second_host, "{shown}");
    // The second run is reached through the first's id, never by its own.
    assert_eq!(api(&addr, &alice, "GET", &format!("/v1/jobs/{second_id}"), b"").code, 404);
    let log = api(&addr, &alice, "GET", &format!("/v1/jobs/{id}/log?run=2"), b"");
    assert_eq!(log.code, 404, "{log:?}");
    assert!(log.body.contains("no log yet"), "{}", log.body);
    assert_eq!(api(&addr, &alice, "GET", &format!("/v1/jobs/{id}/log?run=3"), b"").code, 400);
}

/// A remote host's word about the build caches it holds counts only for
/// caches the server gave it jobs for: one that names alice's cache
/// without ever running her job shows her nothing (her cache list, the
/// hosts' page) and steers nothing.
#[test]
fn a_host_that_claims_caches_it_was_never_given_shows_and_steers_nothing() {
    let Setup { q, db, alice, host } = setup();
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    // alice is the first account: her caches' owner is a1.
    let claimed = format!(
        r#"{{"images":[{{"name":"0","checksum":"{}"}}],"capacity":1,"running":1,"version":"test","key":"{}",
            "caches":[{{"owner":"a1","image":"0","name":"ccache","generation":0,"version":3,"bytes":1000,"used":"2026-12-06T00:00:00Z"}}]}}"#,
        construir_e2e::server::i0_checksum(),
        test_host_key().public()
    );
    let a = api(&addr, &host, "POST", "/v1/host/lease", claimed.as_bytes());
    assert_eq!(a.code, 200, "{a:?}");
    let caches = api(&addr, &alice, "GET", "/v1/caches", b"").json();
    assert_eq!(caches["caches"], serde_json::json!([]), "a cache the host was never given: {caches}");
    let hosts = api(&addr, &alice, "GET", "/v1/hosts", b"").json();
    let shown = hosts["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .flat_map(|h| h["your_caches"].as_array().cloned().unwrap_or_default())
        .count();
    assert_eq!(shown, 0, "{hosts}");
    assert!(s.log().contains("says it holds 1 build cache(s) it was given no job for; not counted"), "{}", s.log());
}

/// A clear of a cache no host holds records nothing: names made up by the
/// thousand cannot grow the generations file every host reads.
#[test]
fn clearing_a_cache_no_host_holds_is_refused_and_records_nothing() {
    let Setup { q, db, alice, .. } = setup();
    let s = Server::start(&q, &db, &[]);
    let addr = s.addr();
    for i in 0..20 {
        let a = api(&addr, &alice, "POST", "/v1/caches/clear", format!(r#"{{"name":"made-up-{i}"}}"#).as_bytes());
        assert_eq!(a.code, 404, "{a:?}");
        assert!(a.body.contains("no host holds a build cache named made-up-"), "{}", a.body);
    }
    let generations = fs::read_to_string(q.root.path().join("running/.caches/generations.json")).unwrap_or_default();
    assert!(!generations.contains("made-up"), "{generations}");
    let bad = api(&addr, &alice, "POST", "/v1/caches/clear", br#"{"name":"Bad/Name"}"#);
    assert_eq!(bad.code, 400, "{bad:?}");
}
