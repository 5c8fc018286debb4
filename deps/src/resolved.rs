//! Resolutions already made, kept beside the lists they were made from
//! (`apt/<archive>/resolved/`). apt's answer to "install these relations
//! onto this image" depends on the archive's lists, the image's dpkg
//! status and the relations, and on nothing else: while those are the
//! same, a second job declaring the same packages gets the first one's
//! answer without running apt again (apt's simulation and `apt-cache show`
//! take 1.0 to 1.3 s here, every time). When `apt-get update` brings lists
//! that differ, the key differs, and apt is asked again.
//!
//! The key is the sha256 of: each list file's name and size, the bytes of
//! each signed `InRelease` (which holds the sha256 of every index apt
//! reads), the image's dpkg status, and the relations in order. An entry
//! that cannot be read or parsed is a miss, never an error.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use jobfile::deps::Resolution;
use sha2::{Digest, Sha256};

/// How many resolutions are kept; past it the least recently used go.
pub const KEEP: usize = 256;

/// The resolutions made against one archive's lists.
#[derive(Debug, Clone)]
pub struct Resolved {
    dir: PathBuf,
}

impl Resolved {
    /// Those kept in `apt_dir/resolved/` (`apt_dir` is an archive's apt directory, its lists in `lists/`).
    pub fn new(apt_dir: &Path) -> Resolved {
        Resolved { dir: apt_dir.join("resolved") }
    }

    /// What apt's answer depends on, as one digest: the lists in `lists`,
    /// the image's dpkg `status`, the `relations`.
    pub fn key(lists: &Path, status: &Path, relations: &[String]) -> io::Result<String> {
        let mut hash = Sha256::new();
        let mut files: Vec<(String, PathBuf, u64)> = Vec::new();
        for e in fs::read_dir(lists)? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_file() {
                files.push((e.file_name().to_string_lossy().into_owned(), e.path(), meta.len()));
            }
        }
        files.sort();
        for (name, path, len) in &files {
            hash.update(format!("list {name} {len}\n").as_bytes());
            if name.ends_with("InRelease") {
                hash.update(fs::read(path)?);
            }
        }
        let status = fs::read(status)?;
        hash.update(format!("status {}\n", status.len()).as_bytes());
        hash.update(&status);
        for r in relations {
            hash.update(format!("relation {r}\n").as_bytes());
        }
        Ok(jobfile::hex(&hash.finalize()))
    }

    /// The resolution kept under `key`, if any (and marked as just used).
    pub fn get(&self, key: &str) -> Option<Resolution> {
        let path = self.path(key)?;
        let resolution = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
        let _ = fs::File::options().append(true).open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        Some(resolution)
    }

    /// Keeps `resolution` under `key` (written whole, then renamed in), and
    /// trims the kept ones to `KEEP`.
    pub fn put(&self, key: &str, resolution: &Resolution) -> io::Result<()> {
        let path = self.path(key).ok_or_else(|| io::Error::other(format!("{key:?} is not a digest")))?;
        fs::create_dir_all(&self.dir)?;
        let mut part = tempfile::NamedTempFile::new_in(&self.dir)?;
        part.write_all(&serde_json::to_vec(resolution).map_err(io::Error::other)?)?;
        part.persist(&path).map_err(|e| e.error)?;
        self.trim(KEEP)
    }

    /// Removes the least recently used past `keep`.
    fn trim(&self, keep: usize) -> io::Result<()> {
        let mut kept: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&self.dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if kept.len() <= keep {
            return Ok(());
        }
        kept.sort();
        for (_, path) in &kept[..kept.len() - keep] {
            let _ = fs::remove_file(path);
        }
        Ok(())
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        let digest = key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit());
        digest.then(|| self.dir.join(format!("{key}.json")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobfile::deps::Pinned;

    fn pinned(name: &str) -> Pinned {
        Pinned {
            name: name.into(),
            version: "1.0-1".into(),
            architecture: "amd64".into(),
            sha256: "ab".repeat(32),
            size: 10,
            filename: format!("pool/main/{name}_1.0-1_amd64.deb"),
        }
    }

    #[test]
    fn the_same_lists_status_and_relations_give_the_kept_answer_and_any_change_asks_apt_again() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (lists, status) = (tmp.path().join("lists"), tmp.path().join("status"));
        fs::create_dir_all(lists.join("partial")).expect("lists");
        fs::write(lists.join("deb_dists_bookworm_InRelease"), "signed, naming each index").expect("release");
        fs::write(lists.join("deb_dists_bookworm_main_binary-amd64_Packages"), "Package: make\n").expect("packages");
        fs::write(&status, "Package: base-files\n").expect("status");
        let relations = vec!["make".to_owned(), "gcc (>= 4)".to_owned()];
        let key = Resolved::key(&lists, &status, &relations).expect("key");
        let resolved = Resolved::new(tmp.path());
        assert_eq!(resolved.get(&key), None);
        let answer = Resolution { install: vec![pinned("gcc"), pinned("make")], remove: vec![] };
        resolved.put(&key, &answer).expect("put");
        assert_eq!(resolved.get(&key), Some(answer));
        assert_eq!(Resolved::key(&lists, &status, &relations).expect("again"), key);

        // Anything apt's answer depends on, changed, is another key.
        let other = |f: &dyn Fn()| {
            f();
            Resolved::key(&lists, &status, &relations).expect("key")
        };
        let reordered = vec![relations[1].clone(), relations[0].clone()];
        assert_ne!(Resolved::key(&lists, &status, &reordered).expect("key"), key);
        let k1 =
            other(&|| fs::write(lists.join("deb_dists_bookworm_InRelease"), "signed, naming new indices").expect("w"));
        assert_ne!(k1, key);
        let k2 = other(&|| {
            fs::write(lists.join("deb_dists_bookworm_main_binary-amd64_Packages"), "Package: make2\n").expect("w")
        });
        assert_ne!(k2, k1);
        let k3 = other(&|| fs::write(&status, "Package: base-files\nPackage: make\n").expect("w"));
        assert_ne!(k3, k2);

        // A damaged entry is a miss; a key that is no digest is never a path.
        fs::write(tmp.path().join("resolved").join(format!("{k3}.json")), "{").expect("damaged");
        assert_eq!(resolved.get(&k3), None);
        assert_eq!(resolved.get("../../etc/passwd"), None);
        assert!(resolved.put("../x", &Resolution::default()).is_err());
    }

    #[test]
    fn past_its_bound_the_least_recently_used_go() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let resolved = Resolved::new(tmp.path());
        let keys: Vec<String> = (0..4).map(|i| format!("{i:064x}")).collect();
        for (i, k) in keys.iter().enumerate() {
            resolved.put(k, &Resolution::default()).expect("put");
            let then = std::time::SystemTime::now() - std::time::Duration::from_secs(100 - i as u64 * 10);
            let path = tmp.path().join("resolved").join(format!("{k}.json"));
            fs::File::options().append(true).open(path).expect("open").set_modified(then).expect("touch");
        }
        // The oldest, read now, is the newest used.
        assert!(resolved.get(&keys[0]).is_some());
        resolved.trim(2).expect("trim");
        let left: Vec<bool> = keys.iter().map(|k| resolved.get(k).is_some()).collect();
        assert_eq!(left, [true, false, false, true]);
    }
}
