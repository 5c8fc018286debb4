//! The queue-directory contract has one home (`jobfile::layout`): what the
//! host's `status`, the server's view of a job, and the shared reader say of
//! the same failed entries is the same, whatever the `.reason` holds.

use std::fs;

use construir_server::store::{Place, Store};

#[test]
fn status_and_the_server_read_every_reason_alike() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::beside(&tmp.path().join("queue"));
    store.create_all().expect("dirs");
    fs::write(tmp.path().join("secret"), "the secret\n").expect("secret");
    let long_tail = format!("first line\n{}\nlast line\n", "x".repeat(10_000));
    // (entry, what its .reason is, the reason every reader must give)
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        ("plain_i0.tar.xz", Some("timed out after 10 s\nsecond line\n"), "timed out after 10 s"),
        ("trimmed_i0.tar.xz", Some("   spaced out   \n"), "spaced out"),
        ("none_i0.tar.xz", None, "(no reason)"),
        ("empty_i0.tar.xz", Some("\nonly later\n"), "(no reason)"),
        ("long_i0.tar.xz", Some(&long_tail), "first line"),
        ("linked_i0.tar.xz", None, "(no reason)"),
    ];
    for (entry, reason, _) in &cases {
        fs::write(store.failed.join(entry), b"job").expect("entry");
        if let Some(r) = reason {
            fs::write(store.failed.join(format!("{entry}.reason")), r).expect("reason");
        }
    }
    std::os::unix::fs::symlink(tmp.path().join("secret"), store.failed.join("linked_i0.tar.xz.reason")).expect("link");
    // One with control bytes: every reader sanitizes it the same way.
    fs::write(store.failed.join("escapes_i0.tar.xz"), b"job").expect("entry");
    fs::write(store.failed.join("escapes_i0.tar.xz.reason"), "bad \x1b[2J\x07 job\n").expect("reason");
    let escaped = jobfile::layout::read_reason(&store.failed.join("escapes_i0.tar.xz")).expect("a reason").why;
    assert!(escaped.starts_with("bad ") && escaped.ends_with(" job") && !escaped.contains('\x1b'), "{escaped:?}");
    let mut all: Vec<(String, String)> = cases.iter().map(|(e, _, want)| (e.to_string(), want.to_string())).collect();
    all.push(("escapes_i0.tar.xz".into(), escaped));
    for (entry, want) in &all {
        let path = store.failed.join(entry);
        let shared = jobfile::layout::read_reason(&path).map_or_else(|| "(no reason)".to_owned(), |r| r.why);
        let (status, _) = construir_host::status::reason_of(&path);
        let server = match store.locate(entry, None) {
            Place::Failed { reason } => reason,
            other => panic!("{entry}: the server says {other:?}"),
        };
        assert_eq!((&shared, &status, &server), (want, want, want), "{entry}: shared, status, server");
    }
}

#[test]
fn a_refused_entry_keeps_the_name_it_came_with_for_every_reader() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let failed = tmp.path().join("failed");
    fs::create_dir_all(&failed).expect("dir");
    fs::write(failed.join("refused.h1.1"), b"").expect("entry");
    fs::write(failed.join("refused.h1.1.reason"), "not a job file name\noriginal name: evil\x1b[2J.txt\n").expect("r");
    let (why, original) = construir_host::status::reason_of(&failed.join("refused.h1.1"));
    let shared = jobfile::layout::read_reason(&failed.join("refused.h1.1")).expect("a reason");
    assert_eq!(why, "not a job file name");
    assert_eq!((why, original), (shared.why, shared.original.clone()));
    assert!(shared.original.is_some_and(|o| o.starts_with("evil") && o.ends_with(".txt") && !o.contains('\x1b')));
}

/// The server (`Store::locate`) and a remote host (`remote::locate`) say
/// the same of the same files: both ask `jobfile::layout`.
#[test]
fn the_server_and_a_remote_host_locate_a_job_alike() {
    use construir_host::remote::{self, Local};
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::beside(&tmp.path().join("queue"));
    store.create_all().expect("dirs");
    let host = construir_host::queue::Dirs::of((*store).clone(), "h1", tmp.path().join("work"));
    host.create_all().expect("dirs");
    fs::write(store.queue.join("w_i0.tar.xz"), "j").expect("w");
    fs::write(host.host_dir.join("r_i0.tar.xz"), "j").expect("w");
    fs::write(store.done.join("d_d0.tar.xz"), "result").expect("w");
    fs::write(store.done.join("d_d0.log"), "console\nconstruir-host: job d_i0.tar.xz done: exit 0\n").expect("w");
    fs::write(store.failed.join("f_i0.tar.xz"), "j").expect("w");
    fs::write(store.failed.join("f_i0.tar.xz.reason"), "timed out after 10 s\n").expect("w");
    std::os::unix::fs::symlink(store.queue.join("w_i0.tar.xz"), store.queue.join("link_i0.tar.xz")).expect("link");
    let cases = [
        ("w_i0.tar.xz", "waiting"),
        ("r_i0.tar.xz", "running"),
        ("d_i0.tar.xz", "done"),
        ("f_i0.tar.xz", "failed"),
        ("link_i0.tar.xz", "missing"),
        ("gone_i0.tar.xz", "missing"),
    ];
    for (name, want) in cases {
        let server = store.locate(name, None);
        let remote = match remote::locate(&host, name) {
            Local::Waiting => "waiting",
            Local::Running => "running",
            Local::Done { .. } => "done",
            Local::Failed { .. } => "failed",
            Local::Nowhere => "missing",
        };
        assert_eq!((server.name(), remote), (want, want), "{name}: server {server:?}, remote host {remote}");
    }
    assert!(matches!(store.locate("r_i0.tar.xz", None), Place::Running { host, .. } if host == "h1"));
    assert!(matches!(store.locate("w_i0.tar.xz", None), Place::Waiting { position: 1, waiting: 1 }));
    assert!(matches!(store.locate("d_i0.tar.xz", None), Place::Done { result_bytes: 6, .. }));
    match (store.locate("f_i0.tar.xz", None), remote::locate(&host, "f_i0.tar.xz")) {
        (Place::Failed { reason }, Local::Failed { reason: theirs, .. }) => {
            assert_eq!((reason.as_str(), theirs.as_str()), ("timed out after 10 s", "timed out after 10 s"))
        }
        other => panic!("{other:?}"),
    }
}
