//! The result cache end to end: a real construir-server on loopback, real
//! build hosts running real VMs beside it, and the `construir` client. A job
//! whose inputs are all an earlier ok job's is served that job's result and
//! provenance without a VM; anything else runs; nothing is served that did
//! not come from a host and verify, nor across accounts unless two hosts
//! reproduced it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use construir_e2e::server::{add_account, client, job_dir, server_cmd, Server};
use construir_e2e::{wait_for, Queue};

/// A queue with a server on it, serving `images`, and accounts for `names`.
struct Served {
    q: Queue,
    db: PathBuf,
    tokens: Vec<String>,
    s: Server,
    work: PathBuf,
}

/// On SQLite, or on the PostgreSQL at `postgres` (a URL).
fn served(names: &[&str], images: &Path, postgres: Option<&str>) -> Served {
    let q = Queue::new();
    let db = postgres.map_or_else(|| q.root.path().join("server.db"), PathBuf::from);
    let tokens = names.iter().map(|n| add_account(&db, n)).collect();
    let s = Server::start_with_images(&q, &db, images, &[]);
    let work = q.root.path().join("home");
    fs::create_dir_all(&work).expect("mkdir");
    Served { q, db, tokens, s, work }
}

/// `construir status ID`, as JSON.
fn status(s: &Server, token: &str, work: &Path, id: &str) -> serde_json::Value {
    let (code, out, err) = client(s, token, work, &["status", id]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("status json")
}

/// Submits `file` and waits for it: its id, the exit code and what the client said.
fn submit_wait(s: &Server, token: &str, work: &Path, file: &Path, extra: &[&str]) -> (String, i32, String) {
    let mut args = vec!["submit", file.to_str().expect("utf8"), "--wait"];
    args.extend(extra);
    let (code, out, err) = client(s, token, work, &args);
    (out.lines().next().unwrap_or_default().trim().to_owned(), code, err)
}

/// Waits until the server has decided what the cache does with job `id`'s result.
fn decided(s: &Server, token: &str, work: &Path, id: &str) -> String {
    let mut note = String::new();
    assert!(
        wait_for(Duration::from_secs(30), || {
            note = status(s, token, work, id)["result_cache"].as_str().unwrap_or_default().to_owned();
            note == "stored" || note.starts_with("not stored")
        }),
        "job {id}: {note}\n{}",
        s.log()
    );
    note
}

/// Packs `dir` into `out/` as a 1 MiB job for image `image`: the file's path.
fn pack(s: &Server, token: &str, work: &Path, dir: &Path, out: &Path, extra: &[&str]) -> PathBuf {
    fs::create_dir_all(out).expect("mkdir");
    let mut args = vec!["pack", dir.to_str().expect("utf8"), "--image", "0", "--size", "1M", "--out"];
    args.push(out.to_str().expect("utf8"));
    args.extend(extra);
    let (code, path, err) = client(s, token, work, &args);
    assert_eq!(code, 0, "{err}");
    PathBuf::from(path.trim())
}

/// i0, and i1 that is i0 again under another number (hard links: the same files).
fn two_images(root: &Path) -> PathBuf {
    let images = root.join("images-0-1");
    for n in ["i0", "i1"] {
        fs::create_dir_all(images.join(n)).expect("mkdir");
        for e in fs::read_dir(construir_e2e::images().join("i0")).expect("ls") {
            let e = e.expect("entry");
            fs::hard_link(e.path(), images.join(n).join(e.file_name())).expect("link");
        }
    }
    images
}

/// The job a host ran, by its id, from the host's log.
fn ran(q: &Queue, tags: &[&str], id: &str) -> bool {
    tags.iter().any(|t| q.log(t).contains(&format!(".{id}.")))
}

#[test]
fn the_same_job_again_is_served_from_the_cache_without_a_vm_and_any_change_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = two_images(tmp.path());
    let Served { q, db, tokens, s, work } = served(&["alice", "bob"], &images, None);
    let (alice, bob) = (tokens[0].clone(), tokens[1].clone());
    let _host = q.spawn_with_images("a", &format!("{}-a", q.host_id), &images, &["--workers", "2"]);
    // A job whose result would differ on every run: the boot it ran in.
    let dir = job_dir(
        &work,
        "hello",
        "#!/bin/sh\nmkdir -p out\ncat /proc/sys/kernel/random/boot_id > out/boot\necho \"made $CONSTRUIR_JOB $SOURCE_DATE_EPOCH\"\n",
    );
    let jobs = work.join("jobs");
    let file = pack(&s, &alice, &work, &dir, &jobs, &[]);

    // The first run: a VM, its result stored.
    let (first, code, err) = submit_wait(&s, &alice, &work, &file, &[]);
    assert_eq!(code, 0, "{err}\n{}", q.log("a"));
    assert!(ran(&q, &["a"], &first), "{}", q.log("a"));
    assert_eq!(decided(&s, &alice, &work, &first), "stored");
    let (code, _, err) = client(&s, &alice, &work, &["fetch", &first, "--out", "first.tar.xz"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = client(&s, &alice, &work, &["cache", "results"]);
    assert_eq!(code, 0, "{err}");
    let entry = out.lines().nth(1).unwrap_or_default().to_owned();
    assert!(entry.contains(&first) && entry.contains("hello") && entry.contains(" no "), "{out}");
    let key = entry.split_whitespace().next().expect("a key").to_owned();

    // The same file again: served at once, no VM, the same bytes and provenance, a signed record.
    let (second, code, err) = submit_wait(&s, &alice, &work, &file, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("done: ok (exit code 0)"), "{err}");
    assert!(err.contains(&format!("(from cache: the result of job {first} of ")), "{err}");
    assert!(!ran(&q, &["a"], &second), "a VM ran the hit: {}", q.log("a"));
    let st = status(&s, &alice, &work, &second);
    assert_eq!(st["state"], "done", "{st}");
    assert_eq!(st["from_cache"]["job"], first.as_str(), "{st}");
    assert_eq!(st["from_cache"]["key"], key.as_str(), "{st}");
    assert_eq!(st["status"]["result"], "ok", "{st}");
    let (code, _, err) = client(&s, &alice, &work, &["fetch", &second, "--out", "second.tar.xz"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("verified: signed by"), "{err}");
    assert!(err.contains(&format!("from cache: the result of job {first} of ")), "{err}");
    assert!(err.contains("record signed by the server"), "{err}");
    let read = |name: &str| fs::read(work.join(name)).expect(name);
    assert_eq!(read("second.tar.xz"), read("first.tar.xz"), "the first run's bytes");
    assert_eq!(read("second.intoto.jsonl"), read("first.intoto.jsonl"), "the first run's provenance");
    let record = fs::read_to_string(work.join("second.cache-hit.intoto.jsonl")).expect("the hit's record");
    assert!(record.starts_with("{\"payload\":"), "{record}");
    let (_, list, _) = client(&s, &alice, &work, &["list"]);
    assert!(list.lines().any(|l| l.contains(&second) && l.contains("from cache")), "{list}");
    // A rerun of the hit runs, whatever the cache holds.
    let (code, rerun, err) = client(&s, &alice, &work, &["rerun", &second, "--wait"]);
    assert_eq!(code, 0, "{err}");
    let rerun = rerun.trim().to_owned();
    assert!(ran(&q, &["a"], &rerun) && !err.contains("from cache"), "{err}");
    assert!(decided(&s, &alice, &work, &rerun).starts_with("not stored: it was asked to run whatever the cache holds"));

    // What changes the inputs runs: one byte of the file (its padding), another image, another size.
    let changed = jobs.join("changed").join("hello_i0.tar.xz");
    fs::create_dir_all(changed.parent().expect("dir")).expect("mkdir");
    let mut bytes = fs::read(&file).expect("read");
    let last = bytes.len() - 1;
    bytes[last] = 1;
    fs::write(&changed, &bytes).expect("write");
    let other_image = jobs.join("other").join("hello_i1.tar.xz");
    fs::create_dir_all(other_image.parent().expect("dir")).expect("mkdir");
    fs::copy(&file, &other_image).expect("copy");
    let bigger = jobs.join("bigger").join("hello_i0.tar.xz");
    fs::create_dir_all(bigger.parent().expect("dir")).expect("mkdir");
    fs::copy(&file, &bigger).expect("copy");
    fs::OpenOptions::new().write(true).open(&bigger).expect("open").set_len(2 << 20).expect("grow");
    for (what, path) in [("one byte changed", &changed), ("another image", &other_image), ("another size", &bigger)] {
        let (id, code, err) = submit_wait(&s, &alice, &work, path, &[]);
        assert_eq!(code, 0, "{what}: {err}");
        assert!(!err.contains("from cache"), "{what}: {err}");
        assert!(ran(&q, &["a"], &id), "{what}: no VM ran it");
        assert_eq!(status(&s, &alice, &work, &id)["from_cache"], serde_json::Value::Null, "{what}");
    }

    // Another account: a miss (it never learns of alice's entry), its own entry made.
    let (bobs, code, err) = submit_wait(&s, &bob, &work, &file, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("from cache") && ran(&q, &["a"], &bobs), "{err}");
    assert_eq!(decided(&s, &bob, &work, &bobs), "stored");
    let (_, out, _) = client(&s, &bob, &work, &["cache", "results"]);
    assert!(out.contains(&bobs) && !out.contains(&first), "bob sees his entry alone: {out}");

    // Never cached: a failure, a job with a build cache, a debug job, one marked --no-result-cache.
    let failing = job_dir(&work, "failing", "#!/bin/sh\necho failing on purpose\nexit 3\n");
    let failing = pack(&s, &alice, &work, &failing, &jobs.join("failing"), &[]);
    let cached = pack(&s, &alice, &work, &dir, &jobs.join("cached"), &["--cache", "cc", "--name", "withcache"]);
    let cases: [(&str, &Path, &[&str], &str); 4] = [
        ("a failure", &failing, &[], "not stored: it ended failed"),
        ("a job with a build cache", &cached, &[], "not stored: it names build caches, whose state is in no key"),
        ("a debug job", &file, &["--debug"], "not stored: it is a debug job"),
        (
            "--no-result-cache",
            &file,
            &["--no-result-cache"],
            "not stored: it was asked to run whatever the cache holds",
        ),
    ];
    for (what, path, extra, note) in cases {
        for round in 0..2 {
            let (id, _, err) = submit_wait(&s, &alice, &work, path, extra);
            assert!(!err.contains("from cache"), "{what}, round {round}: {err}");
            assert!(ran(&q, &["a"], &id), "{what}, round {round}: no VM ran it\n{err}");
            let got = decided(&s, &alice, &work, &id);
            assert!(got.starts_with(note), "{what}: {got}");
        }
    }

    // An entry changed on disk: a miss, and it is removed (the run that follows is stored anew).
    let stored = q.root.path().join("result-cache").join(format!("{key}.a1")).join("result.tar.xz");
    let mut bytes = fs::read(&stored).expect("the entry's result");
    bytes[100] ^= 1;
    fs::write(&stored, &bytes).expect("tamper");
    let (after, code, err) = submit_wait(&s, &alice, &work, &file, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("from cache") && ran(&q, &["a"], &after), "a tampered entry was served: {err}");
    assert!(
        s.log().contains(&format!(
            "removed entry {key} (job {first}): it is no longer sound: result.tar.xz was changed on disk"
        )),
        "{}",
        s.log()
    );
    assert_eq!(decided(&s, &alice, &work, &after), "stored");
    let (_, out, _) = client(&s, &alice, &work, &["cache", "results"]);
    assert!(out.contains(&after) && !out.contains(&first), "{out}");

    // A hit is a submission like any: counted against the hourly limit, and refused past it.
    let (_, list, _) = client(&s, &alice, &work, &["list"]);
    let submitted = list.lines().count().to_string();
    let out = server_cmd(&db, &["account", "limits", "alice", "--max-per-hour", &submitted]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, _, err) = client(&s, &alice, &work, &["submit", file.to_str().expect("utf8"), "--wait"]);
    assert_ne!(code, 0, "{err}");
    // The count the refusal gives is every job listed, the hits among them.
    assert!(err.contains(&format!("429 Too Many Requests: you submitted {submitted} jobs in the last hour")), "{err}");

    // Forgotten: gone, and said so.
    let (code, _, err) = client(&s, &alice, &work, &["cache", "forget", "--all"]);
    assert_eq!(code, 0, "{err}");
    // The job again, and the three that changed it, each its own entry.
    assert!(err.contains("forgot 4 result(s)"), "{err}");
    let (_, _, err) = client(&s, &alice, &work, &["cache", "results"]);
    assert!(err.contains("you have no results in this server's result cache"), "{err}");
}

#[test]
fn a_result_reproduced_on_two_hosts_is_served_to_another_account_naming_both() {
    // On PostgreSQL: the cache's queries in its dialect (the other test has SQLite's).
    let pg = construir_e2e::Postgres::start();
    let Served { q, tokens, s, work, db } = served(&["alice", "bob"], construir_e2e::images(), Some(&pg.url));
    let (alice, bob) = (tokens[0].clone(), tokens[1].clone());
    let ((a, _host_a), (b, _host_b)) = q.spawn_two();
    let dir = job_dir(
        &work,
        "repro",
        "#!/bin/sh\nmkdir -p out\necho \"made $CONSTRUIR_JOB $SOURCE_DATE_EPOCH\" > out/made\n",
    );
    let file = pack(&s, &alice, &work, &dir, &work.join("jobs"), &[]);

    // Alice's verified rebuild: run on both hosts, reproducible, stored as shared.
    let (id, code, err) = submit_wait(&s, &alice, &work, &file, &["--verify-on", "2"]);
    assert_eq!(code, 0, "{err}\n{}\n{}", q.log("a"), q.log("b"));
    assert!(err.contains("reproducible: all "), "{err}");
    assert_eq!(decided(&s, &alice, &work, &id), "stored");
    let (_, out, _) = client(&s, &alice, &work, &["cache", "results"]);
    assert!(out.lines().nth(1).is_some_and(|l| l.contains(&id) && l.contains(" yes ")), "shared: {out}");

    // Bob submits the same file, once: served, the provenance naming both hosts.
    let (hit, code, err) = submit_wait(&s, &bob, &work, &file, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("(from cache: the result of job ") && err.contains("reproduced on "), "{err}");
    assert!(!ran(&q, &["a", "b"], &hit), "a VM ran the hit");
    let st = status(&s, &bob, &work, &hit);
    let on: Vec<&str> =
        st["from_cache"]["reproduced_on"].as_array().expect("hosts").iter().filter_map(|h| h.as_str()).collect();
    assert!(on.len() == 2 && on.contains(&a.as_str()) && on.contains(&b.as_str()), "{st}");
    let (code, _, err) = client(&s, &bob, &work, &["fetch", &hit, "--out", "hit.tar.xz", "--unpack", "hit"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read_to_string(work.join("hit/out/made")).expect("made").split_whitespace().nth(1), Some("repro"));
    let provenance = fs::read_to_string(work.join("hit.intoto.jsonl")).expect("provenance");
    let builders: Vec<String> = provenance.lines().map(builder).collect();
    assert_eq!(builders.len(), 2, "{provenance}");
    for h in [&a, &b] {
        assert!(builders.contains(&format!("construir-host:{h}")), "{builders:?}");
    }
    // Bob's own cache holds nothing: the entry is alice's, and counts against her.
    let (_, _, err) = client(&s, &bob, &work, &["cache", "results"]);
    assert!(err.contains("you have no results"), "{err}");

    // Alice's account removed: her shared entry is served to no one, and its directory goes.
    let out = server_cmd(&db, &["account", "remove", "alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (again, code, err) = submit_wait(&s, &bob, &work, &file, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("from cache") && ran(&q, &["a", "b"], &again), "{err}");
    // Bob's run is stored as his own; of the entries' directories, only that one is left.
    let entries = q.root.path().join("result-cache");
    let left = || fs::read_dir(&entries).map(|d| d.filter_map(Result::ok).filter(|e| e.path().is_dir()).count());
    let mut out = String::new();
    let stored = wait_for(Duration::from_secs(20), || {
        out = client(&s, &bob, &work, &["cache", "results"]).1;
        out.contains(&again) && left().is_ok_and(|n| n == 1)
    });
    assert!(stored && !out.contains(&id), "{out}\n{:?}", left());
}

/// The builder a provenance line's statement names.
fn builder(line: &str) -> String {
    use base64::Engine;
    let envelope: serde_json::Value = serde_json::from_str(line).expect("an envelope");
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().expect("payload"))
        .expect("base64");
    let statement: serde_json::Value = serde_json::from_slice(&payload).expect("statement");
    statement["predicate"]["runDetails"]["builder"]["id"].as_str().unwrap_or_default().to_owned()
}
