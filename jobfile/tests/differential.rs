//! The result reader against GNU tar (`jobfile::tardiff`): over archives
//! built here (every format, the constructions an audit used to make a
//! listing differ from `tar -x`, and thousands of header mutations) and
//! over the fuzz corpus, the two extract the same names and contents, or
//! the reader refuses the archive.

use std::path::{Path, PathBuf};

use jobfile::tar_reader::pax_record;
use jobfile::tardiff::{self, check, fix_checksum, Verdict, GNU, USTAR};

/// A header block with a valid checksum, no link.
fn block(name: &[u8], flag: u8, size: u64, magic: &[u8; 8]) -> [u8; 512] {
    tardiff::block(name, flag, size, b"", magic)
}

fn padded(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().div_ceil(512) * 512, 0);
    v
}

/// An entry: header and padded data.
fn entry(name: &[u8], flag: u8, data: &[u8], magic: &[u8; 8]) -> Vec<u8> {
    let mut v = block(name, flag, data.len() as u64, magic).to_vec();
    v.extend(padded(data));
    v
}

fn end(mut v: Vec<u8>) -> Vec<u8> {
    v.extend_from_slice(&[0u8; 1024]);
    v
}

/// Archives in every format this reader takes, from the tar crate.
fn base_archives() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for gnu in [true, false] {
        let mut b = tar::Builder::new(Vec::new());
        let header = |kind: tar::EntryType, size: u64| {
            let mut h = if gnu { tar::Header::new_gnu() } else { tar::Header::new_ustar() };
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(0o644);
            h
        };
        b.append_data(&mut header(tar::EntryType::Directory, 0), "d/", std::io::empty()).expect("dir");
        b.append_data(&mut header(tar::EntryType::Regular, 5), "d/a.txt", &b"hello"[..]).expect("file");
        let long = format!("d/{}/{}", "sub".repeat(30), "long-name.txt");
        b.append_data(&mut header(tar::EntryType::Regular, 3), &long, &b"abc"[..]).expect("long");
        b.append_link(&mut header(tar::EntryType::Symlink, 0), "d/l", "a.txt").expect("symlink");
        b.append_link(&mut header(tar::EntryType::Link, 0), "d/h", "d/a.txt").expect("hardlink");
        b.append_data(&mut header(tar::EntryType::Regular, 0), "./empty", std::io::empty()).expect("empty");
        out.push(b.into_inner().expect("finish"));
    }
    // pax: a path, a link and a size given as records.
    let records = [pax_record("path", "pax/named/file.bin"), pax_record("mtime", "1700000000.5")].concat();
    let mut v = entry(b"PaxHeader", b'x', &records, USTAR);
    v.extend(entry(b"short", b'0', b"pax data", USTAR));
    let links = [pax_record("linkpath", "pax/named/file.bin")].concat();
    v.extend(entry(b"PaxHeader", b'x', &links, USTAR));
    v.extend(entry(b"pax-link", b'2', b"", USTAR));
    out.push(end(v));
    // ustar's prefix field.
    let mut b = block(b"name.txt", b'0', 2, USTAR);
    b[345..353].copy_from_slice(b"prefixed");
    fix_checksum(&mut b);
    let mut v = b.to_vec();
    v.extend(padded(b"hi"));
    out.push(end(v));
    out
}

/// What an audit used to make this reader and `tar -x` see different
/// files, and the other constructions extractors read two ways.
fn hostile_archives() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases = Vec::new();
    let mut v = entry(b"PaxHeader", b'x', &pax_record("GNU.sparse.name", "evil"), USTAR);
    v.extend(entry(b"good", b'0', b"data", USTAR));
    cases.push(("a pax GNU.sparse.name without a sparse major version", end(v)));
    let mut v = entry(b"GlobalHead", b'g', &pax_record("path", "evil"), USTAR);
    v.extend(entry(b"good", b'0', b"data", USTAR));
    cases.push(("a pax global header carrying path", end(v)));
    let mut b = block(b"name", b'0', 4, b"ustar\x0001");
    b[345..349].copy_from_slice(b"evil");
    fix_checksum(&mut b);
    let mut v = b.to_vec();
    v.extend(padded(b"data"));
    cases.push(("a ustar\\0 magic with version 01 and a prefix", end(v)));
    for flag in [b'V', b'D', b'M', b'N', b'X', b'A', b'z'] {
        let mut v = entry(b"x", flag, b"", GNU);
        v.extend(entry(b"good", b'0', b"data", GNU));
        cases.push(("an unknown type flag", end(v)));
    }
    let mut v = entry(b"dir/", b'5', &block(b"hidden", b'0', 0, GNU), GNU);
    v.extend(entry(b"good", b'0', b"data", GNU));
    cases.push(("a directory with data that another reader takes for a header", end(v)));
    let mut v = entry(b"same", b'0', b"first", GNU);
    v.extend(entry(b"./same", b'0', b"second", GNU));
    cases.push(("a path twice", end(v)));
    let mut v = entry(b"l", b'2', b"", GNU);
    v.extend(entry(b"l/x", b'0', b"data", GNU));
    cases.push(("a file below a symlink", end(v)));
    let mut b = block(b"file/", b'0', 0, GNU);
    fix_checksum(&mut b);
    cases.push(("a regular file named like a directory", end(b.to_vec())));
    let mut v = entry(b"././@LongLink", b'L', b"long-name\0", GNU);
    v.extend(entry(b"PaxHeader", b'x', &pax_record("path", "pax-name"), GNU));
    v.extend(entry(b"short", b'0', b"data", GNU));
    cases.push(("a name from both a GNU long name and pax", end(v)));
    let mut b = block(b"a", b'0', 0, GNU);
    b[124..136].copy_from_slice(b"0 00000004\0\0");
    fix_checksum(&mut b);
    cases.push(("a size field with digits after its end", end(b.to_vec())));
    cases.push(("an absolute path", end(entry(b"/etc/x", b'0', b"data", GNU))));
    cases.push(("a dot-dot path", end(entry(b"a/../b", b'0', b"data", GNU))));
    let mut v = entry(b"PaxHeader", b'x', &pax_record("path", "a\u{0}b"), USTAR);
    v.extend(entry(b"short", b'0', b"data", USTAR));
    cases.push(("a NUL inside a pax path", end(v)));
    cases
}

/// What GNU tar itself writes, in each of its formats, from a tree with a
/// long name, a symlink, a hard link, an empty directory and a sparse file:
/// none of it may be refused.
fn gnu_tar_archives(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let tree = dir.join("tree");
    let long = tree.join("d").join("n".repeat(120));
    std::fs::create_dir_all(&long).expect("mkdir");
    std::fs::create_dir_all(tree.join("empty")).expect("mkdir");
    std::fs::write(long.join("file.txt"), b"deep").expect("write");
    std::fs::write(tree.join("a.txt"), b"hello").expect("write");
    std::os::unix::fs::symlink("a.txt", tree.join("link")).expect("symlink");
    std::fs::hard_link(tree.join("a.txt"), tree.join("hard")).expect("hard link");
    let sparse = std::fs::File::create(tree.join("sparse")).expect("sparse");
    sparse.set_len(256 << 10).expect("size");
    std::os::unix::fs::FileExt::write_at(&sparse, b"middle", 128 << 10).expect("write");
    // Ten data regions: more than a GNU header's four sparse slots.
    let many = std::fs::File::create(tree.join("many-holes")).expect("sparse");
    many.set_len(1 << 20).expect("size");
    for i in 0..10u64 {
        std::os::unix::fs::FileExt::write_at(&many, format!("region {i}").as_bytes(), i * (100 << 10)).expect("write");
    }
    let mut out = Vec::new();
    for format in ["gnu", "oldgnu", "posix", "ustar"] {
        for sparse in [false, true] {
            let file = dir.join(format!("{format}-{sparse}.tar"));
            let mut cmd = std::process::Command::new("tar");
            cmd.arg(format!("--format={format}")).arg("-cf").arg(&file);
            if sparse {
                cmd.arg("--sparse");
            }
            let st = cmd.arg("-C").arg(&tree).arg(".").status().expect("tar");
            if !st.success() {
                // ustar cannot hold a name this long: that format is shown by the tar crate's archives.
                continue;
            }
            out.push((
                format!("tar --format={format}{}", if sparse { " --sparse" } else { "" }),
                std::fs::read(&file).expect("read"),
            ));
        }
    }
    out
}

/// Offsets of the header blocks of a well-formed archive.
fn header_offsets(archive: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= archive.len() && archive[at..at + 512].iter().any(|&b| b != 0) {
        out.push(at);
        let field = &archive[at + 124..at + 136];
        let size = std::str::from_utf8(field)
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c| c == '\0' || c == ' '), 8).ok())
            .unwrap_or(0);
        at += 512 + (size as usize).div_ceil(512) * 512;
    }
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bytes a mutation may write: the ones that change meaning in headers.
const INTERESTING: &[u8] = b"\0 /.0123457xgLKSDVXus\x80\xff";
/// Header regions worth changing: name, size, type flag, link name, magic, prefix or GNU tail.
const REGIONS: &[(usize, usize)] = &[(0, 100), (124, 136), (156, 157), (157, 257), (257, 265), (345, 500)];

fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = base.to_vec();
    let headers = header_offsets(base);
    for _ in 0..1 + rng.below(3) {
        let at = headers[rng.below(headers.len())];
        let (lo, hi) = REGIONS[rng.below(REGIONS.len())];
        let i = at + lo + rng.below(hi - lo);
        v[i] = INTERESTING[rng.below(INTERESTING.len())];
        fix_checksum(&mut v[at..at + 512]);
    }
    v
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn well_formed_archives_in_every_format_read_as_gnu_tar_extracts_them() {
    let tmp = scratch();
    for (i, archive) in base_archives().iter().enumerate() {
        match check(archive, tmp.path()) {
            Ok(Verdict::Agree(n)) => assert!(n >= 2, "archive {i}: only {n} paths"),
            other => panic!("archive {i}: {other:?}"),
        }
    }
}

#[test]
fn what_gnu_tar_writes_in_every_format_is_read_as_it_extracts_it() {
    let tmp = scratch();
    let archives = gnu_tar_archives(tmp.path());
    assert!(archives.len() >= 6, "{} formats written", archives.len());
    for (what, archive) in archives {
        match check(&archive, tmp.path()) {
            Ok(Verdict::Agree(n)) => assert!(n >= 8, "{what}: only {n} paths"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn constructions_that_extractors_read_two_ways_are_refused() {
    let tmp = scratch();
    for (what, archive) in hostile_archives() {
        match check(&archive, tmp.path()) {
            Ok(Verdict::Refused(why)) => assert!(!why.is_empty(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn mutated_headers_never_make_the_reader_and_gnu_tar_disagree() {
    let tmp = scratch();
    let mut bases = base_archives();
    bases.extend(gnu_tar_archives(tmp.path()).into_iter().map(|(_, a)| a));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut agreed, mut refused) = (0, 0);
    let mut disagreements = Vec::new();
    for i in 0..6000 {
        let archive = mutate(&bases[i % bases.len()], &mut rng);
        match check(&archive, tmp.path()) {
            Ok(Verdict::Agree(_)) => agreed += 1,
            Ok(Verdict::Refused(_)) => refused += 1,
            Err(why) => {
                // CONSTRUIR_TARDIFF_DUMP=DIR keeps each archive the two read differently, to look at.
                if let Some(dump) = std::env::var_os("CONSTRUIR_TARDIFF_DUMP") {
                    let _ = std::fs::write(Path::new(&dump).join(format!("mutation-{i}.tar")), &archive);
                }
                disagreements.push(format!("mutation {i}: {why}"))
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreements, first: {:#?}",
        disagreements.len(),
        &disagreements[..disagreements.len().min(5)]
    );
    // Not vacuous: many mutations still read, and many are refused.
    assert!(agreed > 300 && refused > 300, "agreed {agreed}, refused {refused}");
}

/// The fuzz corpus (raw tar streams), where a fuzz run has left one.
fn corpus_files() -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let dirs = ["seeds/unpack", "seeds/differential", "corpus/unpack", "corpus/read", "corpus/differential"];
    let mut files = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(fuzz.join(d)).into_iter().flatten().flatten() {
            if e.metadata().is_ok_and(|m| m.is_file() && m.len() <= 1 << 20) {
                files.push(e.path());
            }
        }
    }
    files
}

#[test]
fn the_fuzz_corpus_never_makes_the_reader_and_gnu_tar_disagree() {
    let tmp = scratch();
    let files = corpus_files();
    assert!(!files.is_empty(), "the committed seeds at least");
    for path in files {
        let data = std::fs::read(&path).expect("read");
        if let Err(why) = check(&data, tmp.path()) {
            panic!("{}: {why}", path.display());
        }
    }
}
