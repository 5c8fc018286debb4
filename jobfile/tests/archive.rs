//! The job archive format against real files, real GNU tar and xz, and
//! hand-built hostile archives.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use jobfile::unpack::SkipReason;
use jobfile::xz::{EncodeOptions, DEFAULT_MEMLIMIT};
use jobfile::{
    fallback, pack_onto, read_job, unpack, ArchiveError, JobStatus, Kind, Outcome, PackError, PackOptions, UnpackError,
    UnpackOptions, XzError,
};
use liblzma::write::XzEncoder;

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn xz(tar: &[u8]) -> Vec<u8> {
    let mut enc = XzEncoder::new_stream(Vec::new(), jobfile::xz::encoder(EncodeOptions::default()).expect("encoder"));
    enc.write_all(tar).expect("compress");
    enc.finish().expect("finish")
}

/// A raw GNU tar entry with whatever name and link it is given, `..` and absolute paths included.
fn raw_entry(out: &mut Vec<u8>, name: &str, flag: u8, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    let old = h.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::new(flag));
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn end(out: &mut Vec<u8>) {
    out.resize(out.len() + 1024, 0);
}

fn unpack_bytes(xz_bytes: &[u8], target: &Path, opts: &UnpackOptions) -> Result<jobfile::UnpackReport, UnpackError> {
    let mut archive = read_job(xz_bytes, DEFAULT_MEMLIMIT).map_err(|e| UnpackError::Archive(ArchiveError::Xz(e)))?;
    unpack(&mut archive, target, opts)
}

/// Every path below `dir`, relative, sorted, with a type letter.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("entry");
            let ft = e.file_type().expect("type");
            let rel = e.path().strip_prefix(base).expect("below").display().to_string();
            let t = if ft.is_symlink() {
                "l"
            } else if ft.is_dir() {
                "d"
            } else {
                "f"
            };
            out.push(format!("{t} {rel}"));
            if ft.is_dir() {
                walk(base, &e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A sandbox: `target/` to unpack into, with a sentinel sibling that nothing may touch.
struct Sandbox {
    _dir: tempfile::TempDir,
    root: PathBuf,
    target: PathBuf,
}

fn sandbox() -> Sandbox {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_owned();
    let target = root.join("target");
    fs::create_dir(&target).expect("target");
    fs::write(root.join("sentinel"), "untouched").expect("sentinel");
    fs::create_dir(root.join("outside")).expect("outside");
    Sandbox { _dir: dir, root, target }
}

impl Sandbox {
    fn assert_outside_untouched(&self) {
        let mut outside = tree(&self.root);
        outside.retain(|p| !p.starts_with("d target") && !p.contains(" target/"));
        assert_eq!(outside, ["d outside", "f sentinel"], "something was written outside the target");
        assert_eq!(fs::read_to_string(self.root.join("sentinel")).expect("sentinel"), "untouched");
    }
}

#[test]
fn a_job_made_by_hand_with_tar_and_truncate_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job");
    fs::create_dir_all(job.join("bin")).expect("mkdir");
    fs::write(job.join("bin/construir"), "#!/bin/sh\necho hello\n").expect("script");
    fs::set_permissions(job.join("bin/construir"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let file = dir.path().join("hello_i100.tar.xz");
    run(Command::new("tar").arg("-cJf").arg(&file).arg(".").current_dir(&job));
    run(Command::new("truncate").args(["--size", "10m"]).arg(&file));
    assert_eq!(fs::metadata(&file).expect("stat").len(), 10 << 20);

    let mut archive = read_job(File::open(&file).expect("open"), DEFAULT_MEMLIMIT).expect("xz");
    let mut found = Vec::new();
    while let Some(h) = archive.next_entry().expect("entry") {
        if jobfile::path_is(&h.path, jobfile::JOB_SCRIPT) {
            let mut script = String::new();
            archive.data().read_to_string(&mut script).expect("read");
            assert_eq!(script, "#!/bin/sh\necho hello\n");
            assert_eq!(h.mode, 0o755);
        }
        found.push(String::from_utf8(h.path).expect("utf8"));
    }
    assert_eq!(found, ["./", "./bin/", "./bin/construir"]);

    let sb = sandbox();
    let report = unpack_bytes(&fs::read(&file).expect("read"), &sb.target, &UnpackOptions::default()).expect("unpack");
    assert_eq!((report.files, report.dirs, report.skipped_total), (1, 1, 0));
    assert_eq!(fs::read_to_string(sb.target.join("bin/construir")).expect("script"), "#!/bin/sh\necho hello\n");
}

fn sample_tree(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).expect("mkdir");
    fs::create_dir_all(dir.join("empty/nested-empty")).expect("mkdir");
    fs::create_dir_all(dir.join("src/deep/er")).expect("mkdir");
    fs::write(dir.join("bin/construir"), "#!/bin/sh\nexit 0\n").expect("write");
    fs::set_permissions(dir.join("bin/construir"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(dir.join("src/deep/er/file.c"), "int main(void) { return 0; }\n").expect("write");
    symlink("deep/er/file.c", dir.join("src/link-inside")).expect("symlink");
    symlink("../src", dir.join("bin/up-and-back")).expect("symlink");
    symlink("missing-target", dir.join("dangling")).expect("symlink");
    fs::hard_link(dir.join("src/deep/er/file.c"), dir.join("hardlinked.c")).expect("hardlink");
    // 3 MiB of data that compresses, but not to nothing.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & 0x0f).collect();
    fs::write(dir.join("big.bin"), &big).expect("write");
    // 256 MiB sparse file with data in the middle and at the end.
    let sparse = File::create(dir.join("sparse.img")).expect("create");
    sparse.set_len(256 << 20).expect("truncate");
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(b"middle", 128 << 20).expect("write");
    sparse.write_all_at(b"end", (256 << 20) - 3).expect("write");
    let long = "a-rather-long-directory-name-".repeat(4);
    fs::create_dir_all(dir.join(&long).join(&long)).expect("mkdir");
    fs::write(dir.join(&long).join(&long).join("leaf.txt"), "deep leaf\n").expect("write");
}

#[test]
fn pack_then_unpack_round_trips_links_empty_dirs_large_and_sparse_files() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    sample_tree(&src);
    let job_file = work.path().join("roundtrip_i1.tar.xz");
    let file = File::create(&job_file).expect("create");
    file.set_len(16 << 20).expect("size");
    let mut file = fs::OpenOptions::new().read(true).write(true).open(&job_file).expect("open");
    let opts = PackOptions { encode: EncodeOptions { preset: 1, threads: 2 }, ..Default::default() };
    let report = pack_onto(&src, &mut file, &opts).expect("pack");
    assert!(report.compressed_len < 16 << 20);
    assert_eq!(fs::metadata(&job_file).expect("stat").len(), 16 << 20, "the file keeps its size");

    // Real tools accept it as it is, padding and all.
    run(Command::new("xz").arg("-t").arg(&job_file));
    let listing = String::from_utf8(run(Command::new("tar").arg("-tJf").arg(&job_file))).expect("utf8");
    assert!(listing.lines().any(|l| l == "bin/construir"), "{listing}");
    assert!(listing.lines().any(|l| l == "empty/nested-empty/"), "{listing}");

    let sb = sandbox();
    let opts = UnpackOptions { preserve_owner: false, ..Default::default() };
    let report = unpack_bytes(&fs::read(&job_file).expect("read"), &sb.target, &opts).expect("unpack");
    assert_eq!(report.skipped, vec![]);
    assert_eq!(tree(&src), tree(&sb.target));
    let t = &sb.target;
    assert_eq!(fs::read_link(t.join("src/link-inside")).expect("link"), Path::new("deep/er/file.c"));
    assert_eq!(fs::read_link(t.join("bin/up-and-back")).expect("link"), Path::new("../src"));
    assert_eq!(fs::read_link(t.join("dangling")).expect("link"), Path::new("missing-target"));
    assert_eq!(fs::metadata(t.join("bin/construir")).expect("stat").mode() & 0o777, 0o755);
    assert_eq!(fs::read(t.join("big.bin")).expect("read"), fs::read(src.join("big.bin")).expect("read"));
    assert_eq!(
        fs::metadata(t.join("hardlinked.c")).expect("stat").ino(),
        fs::metadata(t.join("src/deep/er/file.c")).expect("stat").ino()
    );
    let sparse = fs::metadata(t.join("sparse.img")).expect("stat");
    assert_eq!(sparse.len(), 256 << 20);
    assert!(sparse.blocks() * 512 < 1 << 20, "unpacked sparse file takes {} bytes", sparse.blocks() * 512);
    let mut middle = [0u8; 6];
    use std::os::unix::fs::FileExt;
    File::open(t.join("sparse.img")).expect("open").read_exact_at(&mut middle, 128 << 20).expect("read");
    assert_eq!(&middle, b"middle");
    assert_eq!(
        fs::metadata(t.join("src/deep/er/file.c")).expect("stat").mtime(),
        fs::metadata(src.join("src/deep/er/file.c")).expect("stat").mtime()
    );

    // GNU tar extracts it identically.
    let by_tar = work.path().join("by-tar");
    fs::create_dir(&by_tar).expect("mkdir");
    run(Command::new("tar").arg("-xJf").arg(&job_file).arg("-C").arg(&by_tar));
    assert_eq!(tree(&by_tar), tree(&src));
}

#[test]
fn named_files_are_packed_first() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fs::create_dir_all(src.join("a-dir")).expect("mkdir");
    for name in ["aaa", "job_output.txt", "job_status.json", "zzz"] {
        fs::write(src.join(name), name).expect("write");
    }
    // The tree's own job_status.json (a job may plant one) gives way to the one given in memory.
    let opts = PackOptions {
        prepend: vec![("job_status.json".into(), b"{\"result\":\"ok\"}".to_vec())],
        first: vec!["job_output.txt".into(), "absent".into()],
        ..Default::default()
    };
    let (_, packed) = jobfile::pack_dir(&src, Vec::new(), 1 << 20, &opts).expect("pack");
    let mut archive = read_job(&packed[..], DEFAULT_MEMLIMIT).expect("xz");
    let mut order = Vec::new();
    while let Some(h) = archive.next_entry().expect("entry") {
        if h.path == b"job_status.json" {
            let mut body = String::new();
            archive.data().read_to_string(&mut body).expect("read");
            assert_eq!(body, "{\"result\":\"ok\"}");
        }
        order.push(String::from_utf8(h.path).expect("utf8"));
    }
    assert_eq!(order, ["job_status.json", "job_output.txt", "a-dir/", "aaa", "zzz"]);
}

#[test]
fn gnu_and_pax_sparse_archives_from_real_tar_read_correctly() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    let f = File::create(src.join("holes")).expect("create");
    f.set_len(8 << 20).expect("size");
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"first", 4096 * 3).expect("write");
    f.write_all_at(&[7u8; 10_000], 5 << 20).expect("write");
    drop(f);
    let want = fs::read(src.join("holes")).expect("read");
    for format in ["gnu", "posix"] {
        let file = work.path().join(format!("{format}.tar.xz"));
        run(Command::new("tar")
            .args(["-cJSf"])
            .arg(&file)
            .arg(format!("--format={format}"))
            .arg("holes")
            .current_dir(&src));
        let sb = sandbox();
        let report =
            unpack_bytes(&fs::read(&file).expect("read"), &sb.target, &UnpackOptions::default()).expect(format);
        assert_eq!(report.files, 1, "{format}");
        assert_eq!(fs::read(sb.target.join("holes")).expect("read"), want, "{format}");
    }
}

#[test]
fn hostile_entries_are_skipped_reported_and_nothing_lands_outside() {
    let mut t = Vec::new();
    raw_entry(&mut t, "/abs-file", b'0', "", b"x");
    raw_entry(&mut t, "../outside/dotdot", b'0', "", b"x");
    raw_entry(&mut t, "ok/../../outside/sneaky", b'0', "", b"x");
    raw_entry(&mut t, "abs-link", b'2', "/etc", b"");
    raw_entry(&mut t, "up-link", b'2', "../outside", b"");
    raw_entry(&mut t, "sub/deep-up-link", b'2', "../../outside", b"");
    // A link that stays inside is kept, but nothing is written through it.
    raw_entry(&mut t, "inside-link", b'2', "sub", b"");
    raw_entry(&mut t, "inside-link/through.txt", b'0', "", b"x");
    // Chained links: y -> . is harmless, x -> y/.. would resolve outside.
    raw_entry(&mut t, "y", b'2', ".", b"");
    raw_entry(&mut t, "x", b'2', "y/..", b"");
    raw_entry(&mut t, "x/escaped", b'0', "", b"x");
    raw_entry(&mut t, "hard-abs", b'1', "/etc/passwd", b"");
    raw_entry(&mut t, "hard-up", b'1', "../sentinel", b"");
    raw_entry(&mut t, "hard-missing", b'1', "not-there", b"");
    raw_entry(&mut t, "chardev", b'3', "", b"");
    raw_entry(&mut t, "blockdev", b'4', "", b"");
    raw_entry(&mut t, "fifo", b'6', "", b"");
    raw_entry(&mut t, "fine.txt", b'0', "", b"fine");
    raw_entry(&mut t, "hard-ok", b'1', "fine.txt", b"");
    end(&mut t);

    let sb = sandbox();
    let report = unpack_bytes(&xz(&t), &sb.target, &UnpackOptions::default()).expect("unpack");
    let reasons: Vec<(String, SkipReason)> =
        report.skipped.iter().map(|s| (s.path.clone(), s.reason.clone())).collect();
    let want = vec![
        ("/abs-file".to_string(), SkipReason::Absolute),
        ("../outside/dotdot".into(), SkipReason::DotDot),
        ("ok/../../outside/sneaky".into(), SkipReason::DotDot),
        ("abs-link".into(), SkipReason::LinkOutside),
        ("up-link".into(), SkipReason::LinkOutside),
        ("sub/deep-up-link".into(), SkipReason::LinkOutside),
        ("inside-link/through.txt".into(), SkipReason::ThroughLink),
        ("x".into(), SkipReason::LinkOutside),
        ("x/escaped".into(), SkipReason::HardlinkTarget),
        ("hard-abs".into(), SkipReason::HardlinkTarget),
        ("hard-up".into(), SkipReason::HardlinkTarget),
        ("hard-missing".into(), SkipReason::HardlinkTarget),
        ("chardev".into(), SkipReason::Device),
        ("blockdev".into(), SkipReason::Device),
        ("fifo".into(), SkipReason::Fifo),
    ];
    // x/escaped: x was refused, so "x" does not exist and the walk creates a real directory x.
    let want: Vec<_> = want.into_iter().filter(|(p, _)| p != "x/escaped").collect();
    assert_eq!(reasons, want);
    assert_eq!(report.skipped_total, want.len() as u64);
    sb.assert_outside_untouched();
    // "x/escaped" is fine: x was refused as a link, so a real directory x holds it.
    assert_eq!(tree(&sb.target), ["d x", "f fine.txt", "f hard-ok", "f x/escaped", "l inside-link", "l y"]);
    assert_eq!(fs::read_to_string(sb.target.join("fine.txt")).expect("read"), "fine");
}

#[test]
fn paths_hidden_in_pax_and_gnu_long_names_are_checked_too() {
    let mut t = Vec::new();
    let pax = b"30 path=../outside/pax-escape\n";
    raw_entry(&mut t, "PaxHeaders/x", b'x', "", pax);
    raw_entry(&mut t, "innocent", b'0', "", b"x");
    let long = format!("{}/../../outside/long-escape", "d".repeat(120));
    raw_entry(&mut t, "././@LongLink", b'L', "", format!("{long}\0").as_bytes());
    raw_entry(&mut t, "innocent2", b'0', "", b"x");
    raw_entry(&mut t, "././@LongLink", b'K', "", b"/etc/shadow\0");
    raw_entry(&mut t, "long-link", b'2', "short", b"");
    end(&mut t);
    let sb = sandbox();
    let report = unpack_bytes(&xz(&t), &sb.target, &UnpackOptions::default()).expect("unpack");
    let reasons: Vec<_> = report.skipped.iter().map(|s| (s.path.as_str(), s.reason.clone())).collect();
    assert_eq!(
        reasons,
        [
            ("../outside/pax-escape", SkipReason::DotDot),
            (long.as_str(), SkipReason::DotDot),
            ("long-link", SkipReason::LinkOutside)
        ]
    );
    sb.assert_outside_untouched();
    assert_eq!(tree(&sb.target), Vec::<String>::new());
}

#[test]
fn skip_reports_hold_a_bounded_excerpt_of_each_path() {
    // 100 skipped entries, each with a 1 MiB escaping pax path of control bytes (4 MiB once escaped):
    // listed whole, that is 400 MB of report from a few KB of xz.
    let mut t = Vec::new();
    let path = format!("/{}", "\x1b".repeat((1 << 20) - 64)); // within the 1 MiB pax header cap
    let record = {
        let body = format!(" path={path}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    };
    for i in 0..100 {
        raw_entry(&mut t, "PaxHeaders/x", b'x', "", record.as_bytes());
        raw_entry(&mut t, &format!("f{i}"), b'0', "", b"x");
    }
    end(&mut t);
    let compressed = xz(&t);
    assert!(compressed.len() < 64 << 10, "{} bytes of xz", compressed.len());
    let sb = sandbox();
    let report = unpack_bytes(&compressed, &sb.target, &UnpackOptions::default()).expect("unpack");
    assert_eq!(report.skipped_total, 100);
    for s in &report.skipped {
        assert_eq!(s.reason, SkipReason::Absolute);
        assert!(s.path.len() < 4 * 512 + 64, "{} bytes kept for one skipped path", s.path.len());
        assert!(
            s.path.ends_with(&format!("... ({} more bytes)", path.len() - 512)),
            "{}",
            &s.path[s.path.len() - 40..]
        );
        assert!(!s.path.contains('\x1b'));
    }
    sb.assert_outside_untouched();
}

#[test]
fn later_entries_replace_earlier_files_but_never_write_through_them() {
    let sb = sandbox();
    fs::write(sb.root.join("outside/victim"), "original").expect("victim");
    let mut t = Vec::new();
    raw_entry(&mut t, "a", b'0', "", b"first");
    raw_entry(&mut t, "a", b'0', "", b"second");
    // A hardlink to a file inside, then a new file under the same name: the first is not changed.
    raw_entry(&mut t, "b", b'1', "a", b"");
    raw_entry(&mut t, "b", b'0', "", b"replaced");
    raw_entry(&mut t, "dir", b'5', "", b"");
    raw_entry(&mut t, "dir", b'0', "", b"a file where a directory is");
    end(&mut t);
    let report = unpack_bytes(&xz(&t), &sb.target, &UnpackOptions::default()).expect("unpack");
    assert_eq!(fs::read_to_string(sb.target.join("a")).expect("a"), "second");
    assert_eq!(fs::read_to_string(sb.target.join("b")).expect("b"), "replaced");
    assert!(sb.target.join("dir").is_dir());
    assert_eq!(report.skipped.iter().map(|s| s.reason.clone()).collect::<Vec<_>>(), [SkipReason::DirectoryInTheWay]);
    assert_eq!(fs::read_to_string(sb.root.join("outside/victim")).expect("victim"), "original");
}

#[test]
fn setuid_bits_are_dropped_unless_asked_for() {
    let mut t = Vec::new();
    let mut h = tar::Header::new_gnu();
    h.set_path("suid").expect("path");
    h.set_mode(0o4755);
    h.set_size(1);
    h.set_cksum();
    t.extend_from_slice(h.as_bytes());
    t.extend_from_slice(&[b'x'; 512]);
    end(&mut t);
    let sb = sandbox();
    unpack_bytes(&xz(&t), &sb.target, &UnpackOptions::default()).expect("unpack");
    assert_eq!(fs::metadata(sb.target.join("suid")).expect("stat").mode() & 0o7777, 0o755);
    let sb = sandbox();
    let keep = UnpackOptions { keep_special_bits: true, ..Default::default() };
    unpack_bytes(&xz(&t), &sb.target, &keep).expect("unpack");
    assert_eq!(fs::metadata(sb.target.join("suid")).expect("stat").mode() & 0o7777, 0o4755);
}

#[test]
fn entry_and_byte_caps_end_the_extraction() {
    let mut t = Vec::new();
    for i in 0..20 {
        raw_entry(&mut t, &format!("f{i}"), b'0', "", &[b'z'; 1000]);
    }
    end(&mut t);
    let bytes = xz(&t);
    let sb = sandbox();
    let few = UnpackOptions { max_entries: 10, ..Default::default() };
    assert!(matches!(unpack_bytes(&bytes, &sb.target, &few), Err(UnpackError::TooManyEntries { limit: 10 })));
    let small = UnpackOptions { max_bytes: 5_500, ..Default::default() };
    assert!(matches!(unpack_bytes(&bytes, &sb.target, &small), Err(UnpackError::TooLarge { limit: 5_500 })));
    sb.assert_outside_untouched();
}

/// CRC32 (IEEE), for patching an xz block header.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn a_4_gib_dictionary_header_is_refused_before_any_allocation() {
    let mut t = Vec::new();
    raw_entry(&mut t, "small", b'0', "", b"tiny");
    end(&mut t);
    let mut stream = xz(&t);
    // Block header after the 12-byte stream header: size byte, flags, then the
    // LZMA2 filter (id 0x21, one property byte: the dictionary size), padding, CRC32.
    let hsize = (usize::from(stream[12]) + 1) * 4;
    let header = 12..12 + hsize;
    let at = stream[header.clone()].windows(2).position(|w| w == [0x21, 0x01]).expect("LZMA2 filter") + 12 + 2;
    stream[at] = 40; // 4 GiB - 1, the largest dictionary xz can describe
    let crc = crc32(&stream[12..12 + hsize - 4]);
    stream[12 + hsize - 4..12 + hsize].copy_from_slice(&crc.to_le_bytes());
    let sb = sandbox();
    match unpack_bytes(&stream, &sb.target, &UnpackOptions::default()) {
        Err(UnpackError::Archive(ArchiveError::Xz(XzError::MemLimit { limit }))) => {
            assert_eq!(limit, DEFAULT_MEMLIMIT)
        }
        other => panic!("expected a memory-limit refusal, got {other:?}"),
    }
    // `xz -t` agrees that the header is well-formed: only its memory demand is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("big.xz"), &stream).expect("write");
    let out = Command::new("xz").args(["-t", "--memlimit=256MiB"]).arg(dir.path().join("big.xz")).output().expect("xz");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Memory usage limit reached"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `len` incompressible bytes (xorshift from `seed`, which must not be 0).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn an_archive_that_does_not_fit_says_what_it_needed_and_leaves_no_broken_stream() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    // 512 KiB of incompressible bytes.
    let noise = noise(512 << 10, 0x9E37_79B9_7F4A_7C15);
    fs::write(src.join("noise"), &noise).expect("write");
    let path = work.path().join("small_i1.tar.xz");
    fs::write(&path, vec![0xEEu8; 64 << 10]).expect("fill with non-zero input");
    let mut file = fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
    match pack_onto(&src, &mut file, &PackOptions::default()) {
        // The tree ends within the counting bound (twice the budget plus 1 MiB): the figure is exact.
        Err(PackError::TooLarge { needed, capacity, estimated: false }) => {
            assert_eq!(capacity, 64 << 10);
            assert!(needed > 512 << 10, "needed {needed}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(fs::read(&path).expect("read").iter().all(|&b| b == 0), "no input byte and no partial stream survive");

    // The fallback always fits, with as much of the output's end as it can.
    let status = JobStatus { result: Outcome::OutputTooLarge, needed_bytes: Some(600_000), ..Default::default() };
    let output: Vec<u8> = (0..200_000).map(|i| if i % 50 == 49 { b'\n' } else { noise[i] % 26 + b'a' }).collect();
    let (stream, kept) = fallback::build(&status.to_json(), &output, 64 << 10).expect("fallback");
    assert!(stream.len() <= 64 << 10);
    assert!(kept > 16 << 10, "kept only {kept} bytes of output");
    fallback::write_onto(&mut file, &stream).expect("write");
    let listing = String::from_utf8(run(Command::new("tar").arg("-tJf").arg(&path))).expect("utf8");
    assert_eq!(listing, "job_status.json\njob_output.txt\n");
    let mut archive = read_job(File::open(&path).expect("open"), DEFAULT_MEMLIMIT).expect("xz");
    let h = archive.next_entry().expect("entry").expect("status");
    assert_eq!(h.kind, Kind::File);
    let back: JobStatus = serde_json::from_reader(archive.data()).expect("json");
    assert_eq!(back.result, Outcome::OutputTooLarge);
    archive.next_entry().expect("entry").expect("output");
    let mut tail = Vec::new();
    archive.data().read_to_end(&mut tail).expect("read");
    assert_eq!(tail, &output[output.len() - kept..]);
}

#[test]
fn the_fallback_fits_even_incompressible_output() {
    let mut x = 1u64;
    let noise: Vec<u8> = (0..100_000)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 56) as u8
        })
        .collect();
    let status = JobStatus { message: Some("m".repeat(2000)), ..Default::default() };
    let (stream, kept) = fallback::build(&status.to_json(), &noise, 64 << 10).expect("fallback");
    assert!(stream.len() <= 64 << 10 && kept > 0, "{} bytes, kept {kept}", stream.len());
}

#[test]
fn corrupt_and_non_xz_job_files_give_clear_errors() {
    let sb = sandbox();
    let not_xz = b"#!/bin/sh\necho this is a shell script, not an archive\n".repeat(20);
    assert!(matches!(
        unpack_bytes(&not_xz, &sb.target, &UnpackOptions::default()),
        Err(UnpackError::Archive(ArchiveError::Xz(XzError::Format)))
    ));
    let mut t = Vec::new();
    raw_entry(&mut t, "file", b'0', "", &[b'q'; 100_000]);
    end(&mut t);
    let good = xz(&t);
    let mut cut = good[..good.len() / 2].to_vec();
    cut.resize(64 << 10, 0);
    let err = unpack_bytes(&cut, &sb.target, &UnpackOptions::default()).expect_err("truncated");
    assert!(matches!(err, UnpackError::Archive(ArchiveError::Xz(XzError::Corrupt | XzError::Truncated))), "{err:?}");
    // Valid xz holding something that is not tar.
    let err = unpack_bytes(&xz(&[0x41u8; 4096]), &sb.target, &UnpackOptions::default()).expect_err("not tar");
    assert!(matches!(err, UnpackError::Archive(ArchiveError::BadChecksum { offset: 0 })), "{err:?}");
    sb.assert_outside_untouched();
}

#[test]
fn a_tree_far_too_large_stops_packing_early_with_an_estimate() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    // 8 files of 1 MiB of noise: 8 MiB that will not compress, for a 64 KiB file.
    for i in 0..8 {
        fs::write(src.join(format!("noise{i}")), noise(1 << 20, 0x2545_F491_4F6C_DD1D + i)).expect("write");
    }
    let path = work.path().join("small_i1.tar.xz");
    fs::write(&path, vec![0u8; 64 << 10]).expect("write");
    let mut file = fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
    for threads in [1, 2] {
        let opts = PackOptions { encode: EncodeOptions { preset: 6, threads }, ..Default::default() };
        match pack_onto(&src, &mut file, &opts) {
            Err(PackError::TooLarge { needed, capacity, estimated: true }) => {
                assert_eq!(capacity, 64 << 10);
                let real = 8u64 << 20;
                assert!(needed.abs_diff(real) < real / 4, "{threads} thread(s): estimated {needed} for about {real}");
            }
            other => panic!("expected an estimated TooLarge, got {other:?}"),
        }
    }
    let err = PackError::TooLarge { needed: 9_000_000, capacity: 65_536, estimated: true };
    assert_eq!(err.to_string(), "the packed archive needs about 9000000 bytes but only 65536 are available");
}
