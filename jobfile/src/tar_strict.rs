//! What common extractors disagree on, refused.
//!
//! A result is read by construir (listing, provenance, the rebuild
//! comparison, `job unpack`) and by whoever receives it, with GNU tar,
//! Python's tarfile or libarchive. Where those read one archive two ways
//! (a pax global `path`, a `GNU.sparse.name` outside the sparse format that
//! defines it, a `ustar\0` magic with another version, an unknown type
//! flag extracted as a plain file, a directory whose data another reader
//! takes for the next header, a path twice), a host could sign, or a
//! verdict call reproducible, a file list that `tar -x` does not produce.
//! So the reader refuses each such construct instead of picking a meaning.
//!
//! Two levels: the header checks below hold for every archive (the guest
//! reading its own job too; no tool writes these constructs), and a
//! reader of results (`ReadLimits::unique_paths`) also keeps every path it
//! has seen, so a path named twice, or an entry below a file or a link, is
//! refused. `jobfile/tests/differential.rs` runs this reader and GNU tar
//! over generated archives and fails on any name or content they disagree on.

use std::collections::HashMap;

use crate::tar_entry::{ArchiveError, Kind};

/// The type flags an entry may carry: files (`0`, NUL, contiguous `7`, GNU
/// sparse `S`), hard and symbolic links, devices, directories, fifos.
/// GNU tar and tarfile extract any other flag as a plain file, each its own way.
pub fn check_entry_flag(flag: u8, offset: u64) -> Result<(), ArchiveError> {
    match flag {
        b'0' | b'\0' | b'7' | b'S' | b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => Ok(()),
        other => Err(ambiguous(offset, format!("type flag {}", shown_flag(other)))),
    }
}

fn shown_flag(flag: u8) -> String {
    if flag.is_ascii_graphic() {
        format!("'{}'", flag as char)
    } else {
        format!("0x{flag:02x}")
    }
}

/// Which header layout a block has, from its magic and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// POSIX ustar (`ustar\0` `00`): the prefix field is part of the path.
    Ustar,
    /// GNU (`ustar ` ` \0`): no prefix; those bytes are times and the sparse map.
    Gnu,
    /// Old (v7): no magic.
    V7,
}

/// The block's layout; refuses any other magic (GNU tar joins the prefix of
/// a `ustar\0` header whatever its version; others do not).
pub fn layout(block: &[u8; 512], offset: u64) -> Result<Layout, ArchiveError> {
    let (magic, version) = (&block[257..263], &block[263..265]);
    let found = match (magic, version) {
        (b"ustar\0", b"00") => Layout::Ustar,
        (b"ustar ", b" \0") => Layout::Gnu,
        _ if block[257..265].iter().all(|&b| b == 0) => Layout::V7,
        _ => {
            let shown = crate::text::sanitize(&block[257..265]);
            return Err(ambiguous(offset, format!("header magic and version {shown:?}")));
        }
    };
    // tarfile joins a non-empty prefix field to the name in any header
    // but a GNU one; GNU tar never does outside ustar. Outside ustar and
    // GNU sparse headers, those bytes must be empty.
    let tail_used = found == Layout::Ustar || (found == Layout::Gnu && block[156] == b'S');
    if !tail_used && block[345..500].iter().any(|&b| b != 0) {
        return Err(ambiguous(offset, "data in the prefix field of a header without one".into()));
    }
    Ok(found)
}

/// pax keys in an entry's extended header that give an archive another
/// meaning in some readers only: GNU's own (but sparse 1.0's), and a
/// header charset (tarfile decodes names by it, GNU tar ignores it).
/// `path`, `linkpath` and `size` may each stand once.
pub fn check_pax_entry(records: &[(Vec<u8>, Vec<u8>)], offset: u64) -> Result<(), ArchiveError> {
    const SPARSE_1_0: [&[u8]; 4] =
        [b"GNU.sparse.major", b"GNU.sparse.minor", b"GNU.sparse.name", b"GNU.sparse.realsize"];
    for (i, (key, _)) in records.iter().enumerate() {
        let shown = || crate::text::sanitize_capped(key, 64);
        if key.is_empty() || key.contains(&0) {
            // GNU tar reads a key up to its first NUL (and then finds no `=`); tarfile reads it whole.
            return Err(ambiguous(offset, format!("pax record key {:?}", shown())));
        }
        if key.starts_with(b"GNU.") && !SPARSE_1_0.contains(&key.as_slice()) {
            return Err(ambiguous(offset, format!("pax record {}", shown())));
        }
        if key == b"hdrcharset" {
            return Err(ambiguous(offset, "pax record hdrcharset".into()));
        }
        let once =
            [&b"path"[..], b"linkpath", b"size"].contains(&key.as_slice()) || SPARSE_1_0.contains(&key.as_slice());
        if once && records[..i].iter().any(|(k, _)| k == key) {
            return Err(ambiguous(offset, format!("pax record {} given twice", shown())));
        }
    }
    for (key, value) in records {
        if !value_fits(key, value) {
            let what = format!(
                "pax record {}={} (GNU tar refuses it, others read it their own way)",
                crate::text::sanitize_capped(key, 64),
                crate::text::sanitize_capped(value, 64)
            );
            return Err(ambiguous(offset, what));
        }
    }
    let sparse = |k: &[u8]| records.iter().any(|(key, _)| key == k);
    if !sparse(b"GNU.sparse.major") && (sparse(b"GNU.sparse.name") || sparse(b"GNU.sparse.realsize")) {
        return Err(ambiguous(offset, "GNU.sparse records without GNU.sparse.major".into()));
    }
    Ok(())
}

/// Whether a pax record's value is what GNU tar takes for its key: times
/// as `[-]digits[.digits]`, ids and sizes as plain decimals within their
/// types (tarfile reads `1e5`, `+5` or `1_000`; GNU tar refuses them).
fn value_fits(key: &[u8], value: &[u8]) -> bool {
    let decimal = |max: u64| {
        !value.is_empty()
            && value.len() <= 20
            && value.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok()).is_some_and(|v| v <= max)
    };
    match key {
        b"atime" | b"ctime" | b"mtime" => {
            let v = value.strip_prefix(b"-").unwrap_or(value);
            let (whole, fraction) = match v.iter().position(|&b| b == b'.') {
                Some(dot) => (&v[..dot], Some(&v[dot + 1..])),
                None => (v, None),
            };
            let digits = |d: &[u8]| !d.is_empty() && d.len() <= 19 && d.iter().all(u8::is_ascii_digit);
            digits(whole) && fraction.is_none_or(|f| !f.is_empty() && f.len() <= 64 && f.iter().all(u8::is_ascii_digit))
        }
        b"uid" | b"gid" => decimal(u64::from(u32::MAX)),
        b"size" | b"GNU.sparse.realsize" => decimal(i64::MAX as u64),
        b"SCHILY.dev" | b"SCHILY.ino" | b"SCHILY.nlink" => decimal(u64::MAX),
        _ => true,
    }
}

/// A pax global header may carry only a comment (as `git archive` writes):
/// GNU tar applies a global `path` or `size` to what follows, others do not.
pub fn check_pax_global(records: &[(Vec<u8>, Vec<u8>)], offset: u64) -> Result<(), ArchiveError> {
    match records.iter().find(|(key, _)| key != b"comment") {
        None => Ok(()),
        Some((key, _)) => {
            Err(ambiguous(offset, format!("pax global record {}", crate::text::sanitize_capped(key, 64))))
        }
    }
}

/// A GNU long name or link: the bytes before its first NUL, which must come
/// within its declared size. GNU tar and tarfile read the whole padded
/// blocks up to the first NUL; a name that runs past its size into the
/// padding would read one way there and another here.
pub fn long_name(mut data: Vec<u8>, offset: u64) -> Result<Vec<u8>, ArchiveError> {
    let Some(end) = data.iter().position(|&b| b == 0) else {
        return Err(ambiguous(offset, "a GNU long name with no NUL within its size".into()));
    };
    data.truncate(end);
    Ok(data)
}

/// Checks an entry once its header is read: a path or link with a NUL (C
/// readers stop there), a name from both a GNU long name and pax, data
/// framed after anything but a regular file (tarfile reads it as the next
/// header, GNU tar skips it), a regular file named like a directory.
pub fn check_entry(
    path: &[u8],
    link: Option<&[u8]>,
    kind: Kind,
    flag: u8,
    raw_size: u64,
    both_names: bool,
    offset: u64,
) -> Result<(), ArchiveError> {
    if both_names {
        return Err(ambiguous(offset, "a name given both as a GNU long name and in pax".into()));
    }
    if path.is_empty() {
        return Err(ambiguous(offset, "an empty path".into()));
    }
    if path.contains(&0) || link.is_some_and(|l| l.contains(&0)) {
        return Err(ambiguous(offset, "a NUL inside a path or link".into()));
    }
    if matches!(kind, Kind::Symlink | Kind::Hardlink) && link.is_none_or(|l| l.is_empty()) {
        return Err(ambiguous(offset, format!("a {} to nothing", kind_name(kind))));
    }
    if kind != Kind::File && raw_size != 0 {
        return Err(ambiguous(offset, format!("{raw_size} bytes of data on a {} entry", kind_name(kind))));
    }
    if kind == Kind::File && flag != b'S' && path.ends_with(b"/") {
        return Err(ambiguous(offset, "a regular file whose name ends in /".into()));
    }
    Ok(())
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "file",
        Kind::Dir => "directory",
        Kind::Symlink => "symbolic link",
        Kind::Hardlink => "hard link",
        Kind::CharDevice | Kind::BlockDevice => "device",
        Kind::Fifo => "fifo",
        Kind::Other(_) => "unknown",
    }
}

fn ambiguous(offset: u64, what: String) -> ArchiveError {
    ArchiveError::Ambiguous { offset, what }
}

/// What a path was in the archive so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A directory only implied by a path below it.
    Implied,
    /// An entry of this kind.
    Entry(Kind),
}

/// Every path a result's reader has seen, so that each names one thing:
/// in the canonical form (relative; `./` only in front; no empty, `.` or
/// `..` component), once, never below a file or a link, and hard links
/// only to an entry named before them that is no directory.
#[derive(Debug, Default)]
pub struct Paths {
    seen: HashMap<Vec<u8>, Seen>,
}

impl Paths {
    pub fn new() -> Self {
        Paths::default()
    }

    /// Records an entry, or refuses it.
    pub fn add(&mut self, path: &[u8], kind: Kind, link: Option<&[u8]>, offset: u64) -> Result<(), ArchiveError> {
        let key = canonical(path).ok_or_else(|| ambiguous(offset, format!("the path {}", shown(path))))?;
        if kind == Kind::Hardlink {
            let target = link.and_then(canonical).ok_or_else(|| {
                ambiguous(offset, format!("a hard link to {}", link.map_or_else(|| "nothing".into(), shown)))
            })?;
            // GNU tar links to whatever stands there (a file, a link, a device); a directory fails it.
            if !matches!(self.seen.get(&target), Some(Seen::Entry(k)) if *k != Kind::Dir) {
                let why = format!(
                    "a hard link to {}, which is nothing before it but a directory or no entry",
                    shown(&target)
                );
                return Err(ambiguous(offset, why));
            }
        }
        if key.is_empty() {
            // The archive's own root (`./`): a directory, once.
            if kind != Kind::Dir {
                return Err(ambiguous(
                    offset,
                    format!("the archive's root {} as anything but a directory", shown(path)),
                ));
            }
            return self.insert(key, kind, path, offset);
        }
        let mut at = 0;
        while let Some(slash) = key[at..].iter().position(|&b| b == b'/') {
            let parent = &key[..at + slash];
            match self.seen.get(parent) {
                None => {
                    self.seen.insert(parent.to_vec(), Seen::Implied);
                }
                Some(Seen::Implied | Seen::Entry(Kind::Dir)) => {}
                Some(Seen::Entry(_)) => {
                    return Err(ambiguous(offset, format!("{} below a file or link of that name", shown(path))));
                }
            }
            at += slash + 1;
        }
        self.insert(key, kind, path, offset)
    }

    fn insert(&mut self, key: Vec<u8>, kind: Kind, path: &[u8], offset: u64) -> Result<(), ArchiveError> {
        match self.seen.get(&key) {
            None => {}
            Some(Seen::Implied) if kind == Kind::Dir => {}
            Some(Seen::Implied) => {
                return Err(ambiguous(offset, format!("{} is a directory of the entries before it", shown(path))))
            }
            Some(Seen::Entry(_)) => return Err(ambiguous(offset, format!("{} is named twice", shown(path)))),
        }
        self.seen.insert(key, Seen::Entry(kind));
        Ok(())
    }
}

fn shown(path: &[u8]) -> String {
    crate::text::sanitize_capped(path, crate::text::SHOWN_PATH_MAX)
}

/// `path` without its leading `./` and trailing `/`, when it is in the
/// canonical form (`""` for the root); `None` otherwise.
pub fn canonical(path: &[u8]) -> Option<Vec<u8>> {
    let mut rest = path;
    if rest == b"." || rest == b"./" {
        return Some(Vec::new());
    }
    if let Some(r) = rest.strip_prefix(b"./") {
        rest = r;
    }
    if let Some(r) = rest.strip_suffix(b"/") {
        rest = r;
    }
    let ok = !rest.is_empty()
        && !rest.contains(&0)
        && rest.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b"..");
    ok.then(|| rest.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_are_relative_with_no_empty_dot_or_dotdot_component() {
        let table: [(&[u8], Option<&[u8]>); 12] = [
            (b"a", Some(b"a")),
            (b"./a/b", Some(b"a/b")),
            (b"a/b/", Some(b"a/b")),
            (b"./", Some(b"")),
            (b".", Some(b"")),
            (b"/etc/passwd", None),
            (b"a//b", None),
            (b"a/./b", None),
            (b"a/../b", None),
            (b"../a", None),
            (b"././a", None),
            (b"", None),
        ];
        for (path, want) in table {
            assert_eq!(canonical(path).as_deref(), want, "{:?}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn a_path_names_one_thing_once() {
        let mut p = Paths::new();
        p.add(b"./", Kind::Dir, None, 0).expect("root");
        p.add(b"./a/b/c", Kind::File, None, 1).expect("file below implied dirs");
        p.add(b"./a/", Kind::Dir, None, 2).expect("an implied directory named after its contents");
        assert!(p.add(b"a/", Kind::Dir, None, 3).is_err(), "a directory twice");
        assert!(p.add(b"a/b/c", Kind::File, None, 4).is_err(), "a file twice, another spelling");
        assert!(p.add(b"a/b", Kind::File, None, 5).is_err(), "a file where a directory is implied");
        p.add(b"l", Kind::Symlink, Some(b"/etc"), 6).expect("a link");
        assert!(p.add(b"l/passwd", Kind::File, None, 7).is_err(), "below a link");
        p.add(b"h", Kind::Hardlink, Some(b"./a/b/c"), 8).expect("a hard link to a file before it");
        p.add(b"h2", Kind::Hardlink, Some(b"l"), 9).expect("a hard link to a symlink: GNU tar links the link");
        assert!(p.add(b"h4", Kind::Hardlink, Some(b"a"), 9).is_err(), "a hard link to a directory");
        assert!(p.add(b"h3", Kind::Hardlink, Some(b"later"), 10).is_err(), "a hard link forward");
        assert!(p.add(b"./", Kind::Dir, None, 11).is_err(), "the root twice");
    }

    #[test]
    fn pax_records_that_change_meaning_somewhere_are_refused() {
        let r = |k: &str, v: &str| (k.as_bytes().to_vec(), v.as_bytes().to_vec());
        assert!(check_pax_entry(&[r("path", "a"), r("mtime", "1.5"), r("SCHILY.xattr.user.x", "y")], 0).is_ok());
        assert!(check_pax_entry(&[r("GNU.sparse.name", "x")], 0).is_err(), "sparse name without a major version");
        assert!(check_pax_entry(&[r("GNU.sparse.major", "1"), r("GNU.sparse.name", "x")], 0).is_ok());
        assert!(check_pax_entry(&[r("GNU.dumpdir", "x")], 0).is_err());
        assert!(check_pax_entry(&[r("path", "a"), r("path", "b")], 0).is_err());
        assert!(check_pax_entry(&[r("hdrcharset", "BINARY")], 0).is_err());
        assert!(check_pax_entry(&[r("atime", "ctim504792.868186504")], 0).is_err(), "a time GNU tar refuses");
        assert!(check_pax_entry(&[r("mti\0e", "1")], 0).is_err(), "a NUL in a key");
        for (key, value) in
            [("mtime", "1e5"), ("mtime", "1."), ("uid", "+5"), ("gid", "1_000"), ("uid", "4294967296"), ("size", "-1")]
        {
            assert!(check_pax_entry(&[r(key, value)], 0).is_err(), "{key}={value}");
        }
        for (key, value) in [("mtime", "-1795504792.863582551"), ("uid", "4294967295"), ("size", "007")] {
            assert!(check_pax_entry(&[r(key, value)], 0).is_ok(), "{key}={value}");
        }
        assert!(check_pax_global(&[r("comment", "git")], 0).is_ok());
        assert!(check_pax_global(&[r("path", "x")], 0).is_err());
    }

    #[test]
    fn only_the_three_known_magics_pass() {
        let mut block = [0u8; 512];
        assert_eq!(layout(&block, 0).expect("v7"), Layout::V7);
        block[257..265].copy_from_slice(b"ustar\x0000");
        assert_eq!(layout(&block, 0).expect("ustar"), Layout::Ustar);
        block[263..265].copy_from_slice(b"01");
        assert!(layout(&block, 0).is_err(), "ustar\\0 with another version");
        block[257..265].copy_from_slice(b"ustar  \0");
        assert_eq!(layout(&block, 0).expect("gnu"), Layout::Gnu);
        block[345] = b'x';
        assert!(layout(&block, 0).is_err(), "a prefix in a GNU header");
        block[156] = b'S';
        assert_eq!(layout(&block, 0).expect("gnu sparse"), Layout::Gnu);
    }
}
