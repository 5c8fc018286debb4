//! `construir-host job ...` as a submitter uses it, against real tar and xz.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use jobfile::tar_reader::pax_record;

fn host(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_construir-host")).args(args).current_dir(cwd).output().expect("run construir-host")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("utf8")
}

fn err(out: &Output) -> String {
    assert!(!out.status.success(), "unexpectedly succeeded: {}", String::from_utf8_lossy(&out.stdout));
    let e = String::from_utf8(out.stderr.clone()).expect("utf8");
    assert_eq!(e.lines().count(), 1, "errors are one line: {e}");
    e
}

fn sh(script: &str, cwd: &Path) {
    let out = Command::new("sh").arg("-ec").arg(script).current_dir(cwd).output().expect("sh");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

fn job_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(dir.join("bin")).expect("mkdir");
    fs::write(dir.join("bin/construir"), "#!/bin/sh\necho hello\n").expect("write");
    fs::set_permissions(dir.join("bin/construir"), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[test]
fn pack_writes_a_padded_file_that_tar_and_xz_accept_padded_and_trimmed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = job_dir(tmp.path(), "hello");
    fs::write(dir.join("data.txt"), "some data\n".repeat(1000)).expect("write");
    let out = host(&["job", "pack", "hello", "--image", "100", "--size", "10M"], tmp.path());
    let path = ok(&out);
    assert_eq!(path.trim(), "./hello_i100.tar.xz");
    let file = tmp.path().join("hello_i100.tar.xz");
    let meta = fs::metadata(&file).expect("stat");
    assert_eq!(meta.len(), 10 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "padding is sparse");
    assert!(
        fs::read_dir(tmp.path()).expect("ls").all(|e| !e.expect("e").file_name().to_string_lossy().starts_with('.')),
        "no temp file left"
    );
    sh("xz -t hello_i100.tar.xz && tar -tJf hello_i100.tar.xz > padded.txt", tmp.path());
    // Trimmed of its trailing zeros, as the host delivers results.
    let bytes = fs::read(&file).expect("read");
    let end = bytes.iter().rposition(|&b| b != 0).expect("data") + 1;
    fs::write(tmp.path().join("trimmed.tar.xz"), &bytes[..end]).expect("write");
    sh("xz -t trimmed.tar.xz && tar -tJf trimmed.tar.xz > trimmed.txt && cmp padded.txt trimmed.txt", tmp.path());
    let listing = fs::read_to_string(tmp.path().join("padded.txt")).expect("read");
    assert_eq!(listing, "bin/\nbin/construir\ndata.txt\n");

    // --name and --out; an existing file is not replaced without --force.
    fs::create_dir(tmp.path().join("outdir")).expect("mkdir");
    let path = ok(&host(
        &["job", "pack", "hello", "--image", "7", "--size", "500K", "--name", "other.name", "--out", "outdir"],
        tmp.path(),
    ));
    assert_eq!(path.trim(), "outdir/other.name_i7.tar.xz");
    assert_eq!(fs::metadata(tmp.path().join(path.trim())).expect("stat").len(), 500 << 10);
    let e = err(&host(
        &["job", "pack", "hello", "--image", "7", "--size", "500K", "--name", "other.name", "--out", "outdir"],
        tmp.path(),
    ));
    assert!(e.contains("already exists"), "{e}");
    ok(&host(
        &["job", "pack", "hello", "--image", "7", "--size", "1M", "--name", "other.name", "--out", "outdir", "--force"],
        tmp.path(),
    ));
}

#[test]
fn pack_refuses_what_would_not_work_saying_why() {
    let tmp = tempfile::tempdir().expect("tempdir");
    job_dir(tmp.path(), "good");
    fs::create_dir_all(tmp.path().join("noscript/bin")).expect("mkdir");
    fs::create_dir_all(tmp.path().join("scriptdir/bin/construir")).expect("mkdir");
    job_dir(tmp.path(), "bad name");
    let big = job_dir(tmp.path(), "big");
    let mut x = 88172645463325252u64;
    let noise: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(big.join("noise"), noise).expect("write");

    let table: [(&[&str], &str); 8] = [
        (&["job", "pack", "noscript", "--image", "1", "--size", "1M"], "has no bin/construir"),
        (&["job", "pack", "scriptdir", "--image", "1", "--size", "1M"], "not a regular file"),
        (&["job", "pack", "good", "--image", "1", "--size", "63K"], "below the minimum of 64 KiB"),
        (&["job", "pack", "big", "--image", "1", "--size", "100K"], "use a larger --size"),
        (&["job", "pack", "bad name", "--image", "1", "--size", "1M"], "not a valid job name"),
        (&["job", "pack", "good", "--image", "1x", "--size", "1M"], "not a valid image number"),
        (&["job", "pack", "good", "--image", "1", "--size", "ten"], "is not a size"),
        (&["job", "pack", "missing", "--image", "1", "--size", "1M"], "cannot open missing"),
    ];
    for (args, want) in table {
        let out = host(args, tmp.path());
        assert!(!out.status.success(), "{args:?} succeeded");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(want), "{args:?}: expected {want:?} in {e}");
    }
    let e =
        String::from_utf8_lossy(&host(&["job", "pack", "big", "--image", "1", "--size", "100K"], tmp.path()).stderr)
            .to_string();
    assert!(e.contains("needs 3") && e.contains("more than --size 102400"), "{e}");
    // Nothing was left behind by the refusals.
    let mut left: Vec<String> = fs::read_dir(tmp.path())
        .expect("ls")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["bad name", "big", "good", "noscript", "scriptdir"]);
}

/// A result file made by hand the way the guest writes one.
fn hand_made_result(root: &Path) -> PathBuf {
    let r = root.join("result");
    fs::create_dir_all(r.join("bin")).expect("mkdir");
    fs::write(r.join("bin/construir"), "#!/bin/sh\necho hi\n").expect("write");
    fs::write(r.join("job_output.txt"), "hi\n\x1b[31mred\x1b[0m\n").expect("write");
    fs::write(r.join("job_status.json"), r#"{"result":"ok","exit_code":0,"timed_out":false,"note":"\u001b[2J"}"#)
        .expect("write");
    symlink("/etc/passwd", r.join("evil-link")).expect("symlink");
    sh("tar -cJf ../hello_d100.tar.xz . && truncate --size 1m ../hello_d100.tar.xz", &r);
    root.join("hello_d100.tar.xz")
}

#[test]
fn log_status_list_and_unpack_read_a_hand_made_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = hand_made_result(tmp.path());
    let f = file.to_str().expect("utf8");

    // Not a terminal here: the output comes back byte for byte.
    assert_eq!(ok(&host(&["job", "log", f], tmp.path())), "hi\n\x1b[31mred\x1b[0m\n");
    let status: serde_json::Value = serde_json::from_str(&ok(&host(&["job", "status", f], tmp.path()))).expect("json");
    assert_eq!(status["result"], "ok");
    assert_eq!(status["exit_code"], 0);
    let listing = ok(&host(&["job", "list", f], tmp.path()));
    let paths: Vec<&str> = listing.lines().map(|l| l.rsplit_once(' ').map_or(l, |(_, p)| p)).collect();
    assert!(listing.contains("./bin/construir"), "{listing}");
    assert!(listing.contains("./evil-link -> /etc/passwd"), "{listing}");
    assert_eq!(paths.len(), 6, "{listing}");
    assert!(listing.lines().any(|l| l.starts_with("-rw") && l.ends_with("./job_output.txt")), "{listing}");

    let out = host(&["job", "unpack", f, "extracted"], tmp.path());
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("skipped ./evil-link: symlink target leads outside"), "{stderr}");
    assert_eq!(
        fs::read_to_string(tmp.path().join("extracted/job_output.txt")).expect("read"),
        "hi\n\x1b[31mred\x1b[0m\n"
    );
    assert!(fs::symlink_metadata(tmp.path().join("extracted/evil-link")).is_err());
    let e = err(&host(&["job", "unpack", f, "extracted"], tmp.path()));
    assert!(e.contains("is not empty"), "{e}");
}

#[test]
fn a_job_that_has_not_run_and_broken_files_give_one_line_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    job_dir(tmp.path(), "fresh");
    sh("cd fresh && tar -cJf ../fresh_i1.tar.xz . && truncate --size 100k ../fresh_i1.tar.xz", tmp.path());
    assert!(err(&host(&["job", "log", "fresh_i1.tar.xz"], tmp.path()))
        .contains("has no job_output.txt (has the job run yet?)"));
    assert!(err(&host(&["job", "status", "fresh_i1.tar.xz"], tmp.path())).contains("has no job_status.json"));
    assert_eq!(ok(&host(&["job", "list", "fresh_i1.tar.xz"], tmp.path())).lines().count(), 3);

    fs::write(tmp.path().join("junk_d1.tar.xz"), "not an archive at all\n").expect("write");
    assert!(err(&host(&["job", "log", "junk_d1.tar.xz"], tmp.path())).contains("not an xz file"));
    assert!(err(&host(&["job", "list", "junk_d1.tar.xz"], tmp.path())).contains("not an xz file"));
    assert!(err(&host(&["job", "unpack", "junk_d1.tar.xz", "x"], tmp.path())).contains("not an xz file"));
    assert!(err(&host(&["job", "status", "nonexistent_d1.tar.xz"], tmp.path()))
        .contains("cannot open nonexistent_d1.tar.xz"));

    let r = tmp.path().join("badjson");
    fs::create_dir(&r).expect("mkdir");
    fs::write(r.join("job_status.json"), "{ not json").expect("write");
    sh("tar -cJf ../badjson_d1.tar.xz job_status.json", &r);
    assert!(err(&host(&["job", "status", "badjson_d1.tar.xz"], tmp.path())).contains("not valid JSON"));
}

/// One ustar header block, by hand: hostile archives are made byte by byte.
fn tar_block(name: &[u8], flag: u8, size: u64, link: &[u8]) -> Vec<u8> {
    jobfile::tardiff::block(name, flag, size, link, jobfile::tardiff::USTAR).to_vec()
}

/// A pax header (`x` or `g`) with its records, padded to whole blocks.
fn pax(flag: u8, records: &[u8]) -> Vec<u8> {
    let mut out = tar_block(b"PaxHeader", flag, records.len() as u64, b"");
    out.extend_from_slice(records);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Compresses `tar` with the real xz into `path`.
fn xz_file(tar: &[u8], path: &Path) {
    use std::io::Write;
    let mut child = Command::new("xz")
        .args(["-0", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("xz");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = tar.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).expect("feed xz"));
    let out = child.wait_with_output().expect("xz output");
    writer.join().expect("writer");
    assert!(out.status.success());
    fs::write(path, out.stdout).expect("write");
}

#[test]
fn job_status_stops_a_flood_of_pax_global_headers_with_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 20 MB of global headers in a few KB of xz; today's reader gives up after 8.
    let mut tar = pax(b'g', &pax_record("comment", "flood")).repeat(20_000);
    tar.extend_from_slice(&tar_block(b"job_status.json", b'0', 2, b""));
    tar.extend_from_slice(b"{}");
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    let file = tmp.path().join("flood_d1.tar.xz");
    xz_file(&tar, &file);
    assert!(fs::metadata(&file).expect("stat").len() < 64 << 10);
    for cmd in ["status", "log", "list"] {
        let e = err(&host(&["job", cmd, "flood_d1.tar.xz"], tmp.path()));
        assert!(e.contains("more than 8 extension headers before one entry at byte 8192"), "{cmd}: {e}");
    }
}

#[test]
fn job_status_gives_up_on_a_result_of_megabyte_pax_global_headers_at_the_metadata_bound() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 300 MiB of global headers, each within the per-header limit, one between
    // entries: about 1 MiB of xz (finding 13 of issue 17).
    let one = pax(b'g', &pax_record("comment", &"g".repeat((1 << 20) - 64)));
    let mut tar = Vec::with_capacity(301 << 20);
    for i in 0..300 {
        tar.extend_from_slice(&one);
        tar.extend_from_slice(&tar_block(format!("f{i}").as_bytes(), b'0', 0, b""));
    }
    tar.resize(tar.len() + 1024, 0);
    let file = tmp.path().join("globals_d1.tar.xz");
    xz_file(&tar, &file);
    drop(tar);
    assert!(fs::metadata(&file).expect("stat").len() < 2 << 20);
    // status reads 16 MiB of archive at most, whatever it holds; log and list
    // read far more, but no more than 16 MiB of headers.
    let e = err(&host(&["job", "status", "globals_d1.tar.xz"], tmp.path()));
    assert!(e.contains("produces more than 16777216 bytes"), "status: {e}");
    for cmd in ["log", "list"] {
        let e = err(&host(&["job", cmd, "globals_d1.tar.xz"], tmp.path()));
        assert!(e.contains("more than 16777216 bytes of extension headers in the archive"), "{cmd}: {e}");
    }
}

#[test]
fn job_log_of_a_sparse_entry_declaring_2_pow_62_bytes_stops_at_its_byte_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let records = [
        pax_record("GNU.sparse.major", "1"),
        pax_record("GNU.sparse.minor", "0"),
        pax_record("GNU.sparse.name", "job_output.txt"),
        pax_record("GNU.sparse.realsize", &(1u64 << 62).to_string()),
    ]
    .concat();
    let mut tar = pax(b'x', &records);
    tar.extend_from_slice(&tar_block(b"GNUSparseFile.0/job_output.txt", b'0', 512, b""));
    // One empty segment where the file ends, as GNU tar ends a map.
    let mut map = format!("1\n{}\n0\n", 1u64 << 62).into_bytes();
    map.resize(512, 0);
    tar.extend_from_slice(&map);
    tar.resize(tar.len() + 1024, 0);
    xz_file(&tar, &tmp.path().join("sparse_d1.tar.xz"));
    let out = host(&["job", "log", "sparse_d1.tar.xz", "--max-bytes", "1M"], tmp.path());
    let e = err(&out);
    assert!(e.contains("produces more than 1048576 bytes"), "{e}");
    assert!(out.stdout.len() <= 1 << 20, "{} bytes written", out.stdout.len());
    // The default bound (1 GiB) holds too, without any option.
    let e = err(&host(&["job", "log", "sparse_d1.tar.xz", "--max-time", "1h"], tmp.path()));
    assert!(e.contains("produces more than 1073741824 bytes") || e.contains("cannot write"), "{e}");
}

#[test]
fn job_unpack_refuses_a_hardlink_to_a_symlink_and_applies_the_umask() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // d/l -> ../target stays inside; a hardlink to it at the top would lead outside.
    sh(
        "mkdir -p src/d && cd src && ln -s ../target d/l && ln -P d/l l2 && printf x > wide && chmod 0777 wide \
         && tar -cJf ../links_d1.tar.xz d l2 wide",
        tmp.path(),
    );
    let list = ok(&host(&["job", "list", "links_d1.tar.xz"], tmp.path()));
    assert!(list.contains("l2 link to d/l"), "the archive holds the attack: {list}");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("umask 027 && exec '{}' job unpack links_d1.tar.xz out", env!("CARGO_BIN_EXE_construir-host")))
        .current_dir(tmp.path())
        .output()
        .expect("unpack");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("skipped l2: hardlink target is not a regular file"), "{stderr}");
    assert!(fs::symlink_metadata(tmp.path().join("out/l2")).is_err(), "no link leading outside DIR");
    assert_eq!(fs::read_link(tmp.path().join("out/d/l")).expect("link"), Path::new("../target"));
    let mode = fs::metadata(tmp.path().join("out/wide")).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o750, "0777 in the archive, through umask 027");
}

#[test]
fn job_list_and_status_show_hostile_text_escaped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Raw C1 and bidi characters, and C0 ones as JSON escapes (raw C0 is not valid JSON).
    let status = "{\"result\":\"ok\",\"message\":\"\u{9b}31mred \u{202e}txt.exe \\u001b]0;title\\u0007\"}";
    let evil = "evil\u{1b}[2J\u{202e}gpj.sh";
    let mut tar = tar_block(b"job_status.json", b'0', status.len() as u64, b"");
    tar.extend_from_slice(status.as_bytes());
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend_from_slice(&tar_block(evil.as_bytes(), b'0', 0, b""));
    tar.extend_from_slice(&tar_block(b"bad\xff\x9bname", b'0', 0, b""));
    tar.resize(tar.len() + 1024, 0);
    xz_file(&tar, &tmp.path().join("text_d1.tar.xz"));
    let hidden = |s: &str| s.chars().any(|c| matches!(c as u32, 0..=8 | 0x0b..=0x1f | 0x7f..=0x9f | 0x202a..=0x202e));
    let list = ok(&host(&["job", "list", "text_d1.tar.xz"], tmp.path()));
    assert!(!hidden(&list), "{list:?}");
    assert!(list.contains("evil\\x1b[2J\\u{202e}gpj.sh"), "{list}");
    assert!(list.contains("bad\\xff\\x9bname"), "{list}");
    let shown = ok(&host(&["job", "status", "text_d1.tar.xz"], tmp.path()));
    assert!(!hidden(&shown), "{shown:?}");
    let v: serde_json::Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(v["message"], "\\u{9b}31mred \\u{202e}txt.exe \\x1b]0;title\\x07");
}
