//! Layers: a job's packages installed once onto an image and kept, as a
//! qcow2 overlay whose backing is the image's root disk, for every later job
//! with the same packages on the same image. A layer is named by its key
//! (`Resolution::layer_key`: the image's root disk digest and the exact
//! packages), built inside a jailed VM like any job, recorded with its own
//! sha256, checked before it is first used by this host, and evicted least
//! recently used under a size limit.
//!
//! ```text
//! layers/<key>/layer.qcow2   the overlay
//! layers/<key>/layer.toml    what it is (LayerRecord)
//! layers/.build.<key>.<n>/   one being built; renamed into place when done
//! ```

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use jobfile::deps::Resolution;
pub use jobfile::deps::{Layer, LayerRecord};

pub use jobfile::deps::{LAYER_DISK as DISK, LAYER_FILE as RECORD};
/// The default size limit of all layers together.
pub const DEFAULT_LIMIT: u64 = 20 << 30;

/// Every layer under one directory.
#[derive(Debug)]
pub struct Layers {
    dir: PathBuf,
    limit: u64,
    /// Overlays whose sha256 this process checked: (inode, size, mtime) at the check.
    checked: Mutex<HashMap<String, (u64, u64, i64)>>,
}

impl Layers {
    pub fn new(dir: &Path, limit: u64) -> Layers {
        Layers { dir: dir.to_owned(), limit, checked: Mutex::new(HashMap::new()) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The layer `key`, checked: its record says what it is, and its overlay
    /// is what the record says (by sha256, the first time this process uses
    /// it, or after it changed). One that is not is removed, so it is built again.
    pub fn find(&self, key: &str) -> io::Result<Option<Layer>> {
        let dir = self.dir.join(key);
        if !dir.exists() {
            return Ok(None);
        }
        // Only what this user built is booted: the layers' directory, the layer's, and its files are ours alone.
        for d in [&self.dir, &dir] {
            deps::own_dir(d).map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, jobfile::error_chain(&e)))?;
        }
        let uid = nix::unistd::geteuid().as_raw();
        for file in [RECORD, DISK] {
            if fs::symlink_metadata(dir.join(file)).is_ok_and(|m| m.uid() != uid || m.mode() & 0o022 != 0) {
                log::warn!("layer {key}: {file} is not this user's alone; the layer is built again");
                self.remove(key)?;
                return Ok(None);
            }
        }
        let Ok(text) = fs::read_to_string(dir.join(RECORD)) else { return Ok(None) };
        let Ok(record) = toml::from_str::<LayerRecord>(&text) else {
            log::warn!("layer {key}: {} is not valid; the layer is built again", dir.join(RECORD).display());
            self.remove(key)?;
            return Ok(None);
        };
        let disk = dir.join(DISK);
        let meta = match fs::symlink_metadata(&disk) {
            Ok(m) if m.file_type().is_file() => m,
            _ => {
                self.remove(key)?;
                return Ok(None);
            }
        };
        let stamp = (meta.ino(), meta.len(), meta.mtime());
        let known = self.checked.lock().expect("not poisoned").get(key) == Some(&stamp);
        if !known {
            let got = jobfile::image::sha256_file(&disk)?;
            if record.key != key || got != record.sha256 {
                log::warn!(
                    "layer {key}: its overlay does not match its record (sha256 {got}); the layer is built again"
                );
                self.remove(key)?;
                return Ok(None);
            }
            self.checked.lock().expect("not poisoned").insert(key.to_owned(), stamp);
        }
        let used = fs::metadata(dir.join(RECORD)).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(Some(Layer { dir, record, used }))
    }

    /// Marks `layer` used now (for eviction).
    pub fn touch(&self, layer: &Layer) {
        let record = layer.dir.join(RECORD);
        if let Err(e) = File::options().write(true).open(&record).and_then(|f| f.set_modified(SystemTime::now())) {
            log::warn!("cannot mark {} used: {e}", record.display());
        }
    }

    /// A new directory to build layer `key` in.
    pub fn staging(&self, key: &str) -> io::Result<tempfile::TempDir> {
        fs::create_dir_all(&self.dir)?;
        tempfile::Builder::new().prefix(&format!(".build.{key}.")).tempdir_in(&self.dir)
    }

    /// Takes a built overlay (`staging/layer.qcow2`) in as layer `key` for
    /// `resolution` on image `image` (root disk `base_sha256`). Another
    /// worker may have built the same layer first: then that one stays.
    pub fn commit(
        &self,
        staging: tempfile::TempDir,
        key: &str,
        image: &str,
        base_sha256: &str,
        resolution: &Resolution,
    ) -> io::Result<Layer> {
        let disk = staging.path().join(DISK);
        File::open(&disk)?.sync_all()?;
        let record = LayerRecord {
            key: key.to_owned(),
            image: image.to_owned(),
            base_sha256: base_sha256.to_owned(),
            install: resolution.install.clone(),
            remove: resolution.remove.clone(),
            created: jobfile::units::rfc3339(SystemTime::now()),
            sha256: jobfile::image::sha256_file(&disk)?,
            bytes: fs::metadata(&disk)?.len(),
        };
        let text = toml::to_string_pretty(&record).expect("a LayerRecord always serializes");
        fs::write(staging.path().join(RECORD), text)?;
        File::open(staging.path().join(RECORD))?.sync_all()?;
        let built = staging.keep();
        let dir = self.dir.join(key);
        match fs::rename(&built, &dir) {
            Ok(()) => File::open(&self.dir)?.sync_all()?,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                fs::remove_dir_all(&built)?;
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&built);
                return Err(e);
            }
        }
        self.find(key)?.ok_or_else(|| io::Error::other(format!("layer {key} vanished as it was taken in")))
    }

    fn remove(&self, key: &str) -> io::Result<()> {
        self.checked.lock().expect("not poisoned").remove(key);
        match fs::remove_dir_all(self.dir.join(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every layer, most recently used first (records only: nothing is hashed).
    pub fn list(&self) -> Vec<Layer> {
        jobfile::deps::list_layers(&self.dir)
    }

    /// Removes the least recently used layers until all together hold at
    /// most the limit, never one of `keep`, and build directories left by a
    /// host that died (older than `stale`). Returns the keys removed.
    pub fn evict(&self, keep: &HashSet<String>, stale: Duration) -> io::Result<Vec<String>> {
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a > stale));
                if e.file_name().to_string_lossy().starts_with(".build.") && old {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let mut layers = self.list();
        let mut total: u64 = layers.iter().map(|l| l.record.bytes).sum();
        let mut removed = Vec::new();
        while total > self.limit {
            let Some(pos) = layers.iter().rposition(|l| !keep.contains(&l.record.key)) else { break };
            let l = layers.remove(pos);
            self.remove(&l.record.key)?;
            total -= l.record.bytes;
            removed.push(l.record.key);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(layers: &Layers, key: &str, data: &[u8], used_secs_ago: u64) -> Layer {
        let staging = layers.staging(key).expect("staging");
        fs::write(staging.path().join(DISK), data).expect("w");
        let layer = layers.commit(staging, key, "100", "base", &Resolution::default()).expect("commit");
        let when = SystemTime::now() - Duration::from_secs(used_secs_ago);
        File::options().write(true).open(layer.dir.join(RECORD)).expect("open").set_modified(when).expect("mtime");
        layer
    }

    #[test]
    fn a_layer_is_found_only_as_it_was_built() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layers = Layers::new(&tmp.path().join("layers"), 1 << 30);
        assert!(layers.find("k1").expect("find").is_none());
        let built = build(&layers, "k1", b"overlay", 0);
        assert_eq!(built.record.bytes, 7);
        assert_eq!(layers.find("k1").expect("find").expect("there").record, built.record);
        // Changed behind the host's back (another size, so the check runs again): it is gone, to be built again.
        fs::write(built.disk(), b"tampered").expect("w");
        assert!(layers.find("k1").expect("find").is_none());
        assert!(!tmp.path().join("layers/k1").exists());
        // The same layer built twice at once: the first stays.
        let first = build(&layers, "k2", b"first", 0);
        let staging = layers.staging("k2").expect("staging");
        fs::write(staging.path().join(DISK), b"second").expect("w");
        let second = layers.commit(staging, "k2", "100", "base", &Resolution::default()).expect("commit");
        assert_eq!(second.record.sha256, first.record.sha256);
        assert_eq!(fs::read_dir(tmp.path().join("layers")).expect("ls").count(), 1, "no build left behind");
    }

    #[test]
    fn the_least_recently_used_go_first_and_a_layer_in_use_stays() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layers = Layers::new(&tmp.path().join("layers"), 10);
        build(&layers, "old", b"aaaa", 300);
        build(&layers, "mid", b"bbbb", 200);
        build(&layers, "new", b"cccc", 100);
        let keep = HashSet::from(["old".to_owned()]);
        assert_eq!(layers.evict(&keep, Duration::from_secs(3600)).expect("evict"), ["mid"]);
        let left: Vec<String> = layers.list().into_iter().map(|l| l.record.key).collect();
        assert_eq!(left, ["new", "old"]);
    }
}
