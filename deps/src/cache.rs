//! The host's cache of `.deb` files, by content: `debs/<sha256>.deb`,
//! shared by every job on the host (packages are public; nothing of a job
//! is kept here). A file is taken only when its sha256 is the one asked
//! for, checked each time it is used; the least recently used go first
//! when the cache outgrows its limit.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The cache under `dir`.
#[derive(Debug, Clone)]
pub struct DebCache {
    dir: PathBuf,
}

impl DebCache {
    pub fn new(dir: &Path) -> io::Result<DebCache> {
        fs::create_dir_all(dir)?;
        Ok(DebCache { dir: dir.to_owned() })
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.deb"))
    }

    /// The cached file with this content, checked, and marked used; `None`
    /// when there is none or it is not what its name says (then it is removed).
    pub fn get(&self, sha256: &str, size: u64) -> io::Result<Option<PathBuf>> {
        let path = self.path(sha256);
        let Ok(meta) = fs::symlink_metadata(&path) else { return Ok(None) };
        if !meta.file_type().is_file() || meta.len() != size || jobfile::image::sha256_file(&path)? != sha256 {
            log::warn!("{}: not the package its name says; removed", path.display());
            fs::remove_file(&path)?;
            return Ok(None);
        }
        fs::File::options().write(true).open(&path)?.set_modified(SystemTime::now())?;
        Ok(Some(path))
    }

    /// Takes `file` (on the same filesystem) into the cache as `sha256`,
    /// after checking that it is.
    pub fn insert(&self, file: &Path, sha256: &str) -> io::Result<Option<PathBuf>> {
        if jobfile::image::sha256_file(file)? != sha256 {
            return Ok(None);
        }
        let path = self.path(sha256);
        fs::rename(file, &path)?;
        Ok(Some(path))
    }

    /// A scratch directory inside the cache, for downloads (so that taking
    /// a file in is a rename).
    pub fn scratch(&self) -> io::Result<tempfile::TempDir> {
        tempfile::Builder::new().prefix(".download.").tempdir_in(&self.dir)
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> u64 {
        self.entries().iter().map(|(_, _, len)| len).sum()
    }

    fn entries(&self) -> Vec<(SystemTime, PathBuf, u64)> {
        let Ok(rd) = fs::read_dir(&self.dir) else { return Vec::new() };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, e.path(), meta.len()))
            })
            .collect()
    }

    /// Removes the least recently used files until at most `limit` bytes
    /// remain, never one of `keep` (what the current job uses). Returns
    /// how many were removed.
    pub fn evict(&self, limit: u64, keep: &HashSet<String>) -> io::Result<usize> {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|(_, _, len)| len).sum();
        entries.sort();
        let mut removed = 0;
        for (_, path, len) in entries {
            if total <= limit {
                break;
            }
            let sha = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            if keep.contains(&sha) {
                continue;
            }
            fs::remove_file(&path)?;
            total -= len;
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_file_is_taken_only_as_what_its_hash_says_and_the_oldest_go_first() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = DebCache::new(&tmp.path().join("debs")).expect("cache");
        let sha = |data: &[u8]| {
            use sha2::{Digest, Sha256};
            Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let mut names = Vec::new();
        for (i, data) in [b"aaaa".as_slice(), b"bbbb", b"cccc"].iter().enumerate() {
            let scratch = cache.scratch().expect("scratch");
            let file = scratch.path().join("x.deb");
            fs::write(&file, data).expect("w");
            assert_eq!(cache.insert(&file, &sha(b"other")).expect("insert"), None, "a wrong hash is refused");
            let got = cache.insert(&file, &sha(data)).expect("insert").expect("taken");
            let when = SystemTime::now() - Duration::from_secs(100 - i as u64 * 10);
            fs::File::options().write(true).open(&got).expect("open").set_modified(when).expect("mtime");
            names.push(sha(data));
        }
        assert_eq!(cache.bytes(), 12);
        // Using the oldest makes it the newest.
        assert!(cache.get(&names[0], 4).expect("get").is_some());
        assert_eq!(cache.get(&names[1], 5).expect("get"), None, "a size that does not match is not it");
        assert!(!cache.path(&names[1]).exists(), "and it is gone");
        let keep = HashSet::from([names[2].clone()]);
        assert_eq!(cache.evict(4, &keep).expect("evict"), 1);
        assert!(cache.path(&names[2]).exists() && !cache.path(&names[0]).exists(), "kept what the job uses");
        // A damaged file is found out when used.
        fs::write(cache.path(&names[2]), b"CCCC").expect("damage");
        assert_eq!(cache.get(&names[2], 4).expect("get"), None);
    }
}
