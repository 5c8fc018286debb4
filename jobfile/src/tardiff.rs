//! This crate's tar reader held against GNU tar, for tests and fuzzing:
//! what the reader (as results are read, `ReadLimits::unique_paths`)
//! makes of an archive must be exactly the tree `tar -x` extracts from it,
//! name for name and byte for byte, or the reader must refuse it.
//!
//! `jobfile/tests/differential.rs` runs it over generated archives and the
//! fuzz corpus; the fuzz target `differential` searches for an archive on
//! which the two disagree.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::tar_reader::{ArchiveReader, Kind, ReadLimits};
use crate::tar_strict::canonical;

/// One extracted path, as both sides describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file and its contents' sha256.
    File(String),
    Dir,
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    Fifo,
    Device,
}

/// Every path of an extracted tree (relative, no `./`), but its root.
pub type Tree = BTreeMap<Vec<u8>, Node>;

/// What the reader's verdict and GNU tar's were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The reader refused the archive (GNU tar is not asked).
    Refused(String),
    /// Both read it, to the same tree of this many paths.
    Agree(usize),
}

/// The tree this reader makes of `archive` (an uncompressed tar stream).
pub fn ours(archive: &[u8]) -> Result<Tree, String> {
    use sha2::Digest;
    let limits = ReadLimits::new(256 << 20, Duration::from_secs(60));
    let mut reader = ArchiveReader::new(archive).with_limits(limits);
    let mut tree = Tree::new();
    let err = |e: crate::ArchiveError| crate::error_chain(&e);
    while let Some(h) = reader.next_entry().map_err(err)? {
        let key = canonical(&h.path).ok_or("a path the reader let through is not canonical")?;
        let node = match h.kind {
            Kind::File => {
                let mut data = Vec::new();
                reader.data().read_to_end(&mut data).map_err(|e| e.to_string())?;
                Node::File(crate::hex(&sha2::Sha256::digest(&data)))
            }
            Kind::Hardlink => {
                let target = h.link.as_deref().and_then(canonical).ok_or("a hard link with no canonical target")?;
                tree.get(&target).cloned().ok_or("a hard link to nothing")?
            }
            Kind::Dir => Node::Dir,
            Kind::Symlink => Node::Symlink(h.link.clone().unwrap_or_default()),
            Kind::Fifo => Node::Fifo,
            Kind::CharDevice | Kind::BlockDevice => Node::Device,
            Kind::Other(flag) => return Err(format!("the reader let type flag {flag} through")),
        };
        for (i, &b) in key.iter().enumerate() {
            if b == b'/' {
                tree.entry(key[..i].to_vec()).or_insert(Node::Dir);
            }
        }
        if !key.is_empty() {
            tree.insert(key, node);
        }
    }
    Ok(tree)
}

/// The tree GNU tar extracts from `archive` into the empty directory `into`.
pub fn gnu(archive: &[u8], into: &Path) -> Result<Tree, String> {
    let file = into.with_extension("tar");
    fs::write(&file, archive).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let out = Command::new("tar")
        .arg("--extract")
        .arg("--file")
        .arg(&file)
        .arg("--directory")
        .arg(into)
        .args(["--no-same-owner", "--no-same-permissions"])
        .output()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    let _ = fs::remove_file(&file);
    if !out.status.success() {
        return Err(format!("tar failed ({}): {}", out.status, crate::sanitize(&out.stderr)));
    }
    let mut tree = Tree::new();
    walk(into, Vec::new(), &mut tree)?;
    Ok(tree)
}

fn walk(dir: &Path, prefix: Vec<u8>, tree: &mut Tree) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let mut key = prefix.clone();
        if !key.is_empty() {
            key.push(b'/');
        }
        key.extend_from_slice(entry.file_name().as_bytes());
        let path = entry.path();
        let ft = fs::symlink_metadata(&path).map_err(|e| e.to_string())?.file_type();
        let node = if ft.is_dir() {
            walk(&path, key.clone(), tree)?;
            Node::Dir
        } else if ft.is_symlink() {
            Node::Symlink(fs::read_link(&path).map_err(|e| e.to_string())?.as_os_str().as_bytes().to_vec())
        } else if ft.is_file() {
            Node::File(crate::image::sha256_file(&path).map_err(|e| e.to_string())?)
        } else if ft.is_fifo() {
            Node::Fifo
        } else {
            Node::Device
        };
        tree.insert(key, node);
    }
    Ok(())
}

/// Reads `archive` both ways; `Err` says where they disagree. `scratch`
/// is a directory this may fill and empty.
pub fn check(archive: &[u8], scratch: &Path) -> Result<Verdict, String> {
    let ours = match ours(archive) {
        Ok(tree) => tree,
        Err(why) => return Ok(Verdict::Refused(why)),
    };
    let into = scratch.join("x");
    let _ = fs::remove_dir_all(&into);
    fs::create_dir_all(&into).map_err(|e| format!("cannot make {}: {e}", into.display()))?;
    let theirs = gnu(archive, &into);
    let _ = fs::remove_dir_all(&into);
    let theirs = theirs.map_err(|e| format!("this reader took an archive that GNU tar refused: {e}"))?;
    if ours == theirs {
        return Ok(Verdict::Agree(ours.len()));
    }
    let shown = |k: &Vec<u8>| crate::sanitize(k);
    for (k, v) in &ours {
        match theirs.get(k) {
            None => return Err(format!("{} is in this reader's tree, not in GNU tar's", shown(k))),
            Some(t) if t != v => return Err(format!("{}: this reader has {v:?}, GNU tar {t:?}", shown(k))),
            Some(_) => {}
        }
    }
    let extra = theirs.keys().find(|k| !ours.contains_key(*k)).map(shown).unwrap_or_default();
    Err(format!("{extra} is in GNU tar's tree, not in this reader's"))
}
/// GNU tar's magic and version, `ustar  \0`.
pub const GNU: &[u8; 8] = b"ustar  \0";
/// POSIX ustar's magic and version, `ustar\000`.
pub const USTAR: &[u8; 8] = b"ustar\x0000";

/// One tar header block, by hand, with a valid checksum: the archives the
/// tests and the fuzzing hold against readers are made byte by byte.
pub fn block(name: &[u8], flag: u8, size: u64, link: &[u8], magic: &[u8; 8]) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..name.len()].copy_from_slice(name);
    b[100..108].copy_from_slice(b"0000644\0");
    b[108..116].copy_from_slice(b"0000000\0");
    b[116..124].copy_from_slice(b"0000000\0");
    b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    b[136..148].copy_from_slice(b"14000000000\0");
    b[156] = flag;
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..265].copy_from_slice(magic);
    fix_checksum(&mut b);
    b
}

/// Writes the checksum of the header block `b` (its first 512 bytes).
pub fn fix_checksum(b: &mut [u8]) {
    b[148..156].fill(b' ');
    let sum: u64 = b[..512].iter().map(|&x| u64::from(x)).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}
