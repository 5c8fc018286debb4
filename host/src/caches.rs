//! Build caches on the host: one disk per (owner, image, name), kept in
//! `<dir>/<owner>/i<image>/<name>/` as `current.img` (a raw ext4 disk the
//! host made, then whatever the last kept job left in it) and `version`.
//!
//! The host makes a cache's filesystem once and never mounts, unpacks or
//! parses it after a guest has written to it: to the host it is an opaque
//! blob handed to the next VM of the same key. Each job works on its own
//! copy (`.work.<tag>.img`, copied sparsely, beside `current.img` so that
//! keeping it is one rename); the copy becomes the new version only when
//! the job's result is `ok`, so two jobs on one cache both start from the
//! last kept version and the last one to finish ok wins. A guest that
//! writes garbage harms only its own key: when its disk does not mount,
//! the guest says so and the host starts that key again, empty.
//!
//! A server clears an account's cache by raising its generation
//! (`jobfile::caches::Generations`); each key keeps the generation it was
//! made at in `generation`, and one that is not the current generation is
//! never lent again: it starts again, empty. After each job a host writes
//! what it holds to `running/.caches/host.<host-id>.json`, for the server.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;

use crate::files;

/// The owner of every cache on a local queue, which has no accounts.
pub const LOCAL_OWNER: &str = "local";
/// The caches' directory in the host's cache directory (`--package-cache`).
pub const CACHES_DIR: &str = "build-caches";
const CURRENT: &str = "current.img";
const VERSION: &str = "version";
const GENERATION: &str = "generation";
const LOCK: &str = "lock";
/// Working copies older than this were left by a host that died.
const STALE_WORK: Duration = Duration::from_secs(24 * 3600);

/// A host's build caches, and their limits.
#[derive(Debug, Clone)]
pub struct Caches {
    dir: PathBuf,
    /// Each cache disk's size: the most one cache can hold.
    pub disk_bytes: u64,
    /// The most bytes of caches one owner keeps; the least recently used go first.
    pub owner_bytes: u64,
    /// The most bytes of caches all owners keep together (so that many
    /// accounts cannot fill the disk between them); the least recently used go first.
    pub total_bytes: u64,
}

/// One cache, lent to one job: its working copy, open for the VM. Dropped
/// without being kept, the copy is removed.
#[derive(Debug)]
pub struct Checkout {
    pub name: String,
    /// The kept version it started from (0: new and empty).
    pub version: u64,
    pub file: File,
    /// The disk's size.
    pub len: u64,
    key: PathBuf,
    work: PathBuf,
    owner: String,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.work);
    }
}

/// A cache as `construir-host cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheSummary {
    pub owner: String,
    pub image: String,
    pub name: String,
    pub version: u64,
    /// Raised when its owner cleared it on the server (0: never).
    pub generation: u64,
    /// Bytes its disk takes on the host's disk (it is sparse).
    pub bytes: u64,
    /// RFC 3339, UTC: when a job last started from it.
    pub used: String,
}

impl Caches {
    pub fn new(dir: &Path, disk_bytes: u64, owner_bytes: u64) -> Caches {
        Caches { dir: dir.to_owned(), disk_bytes, owner_bytes, total_bytes: u64::MAX }
    }

    /// The same, with a bound on all owners' caches together.
    pub fn with_total(self, total_bytes: u64) -> Caches {
        Caches { total_bytes, ..self }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the cache of this key lives. Every part was checked by the
    /// caller (`jobfile::caches::check_name`, image numbers, owner names).
    fn key(&self, owner: &str, image: &str, name: &str) -> PathBuf {
        self.dir.join(owner).join(format!("i{image}")).join(name)
    }

    /// Lends the cache (`owner`, `image`, `name`) at `generation` to a
    /// job: its last kept version (made, empty, when there is none or it
    /// is of another generation), copied into a working copy named by
    /// `tag` (unique to the job's attempt).
    pub fn checkout(&self, owner: &str, image: &str, name: &str, generation: u64, tag: &str) -> io::Result<Checkout> {
        let key = self.key(owner, image, name);
        create_private_dirs(&self.dir, &key)?;
        let _lock = lock(&key)?;
        let current = key.join(CURRENT);
        let mut version = read_version(&key);
        let stale = read_generation(&key) != generation;
        if stale || version.is_none() || fs::symlink_metadata(&current).map(|m| !m.is_file()).unwrap_or(true) {
            if stale && version.is_some() {
                log::info!("build cache {owner}/i{image}/{name} was cleared; it starts again empty");
            }
            let _ = fs::remove_file(key.join(VERSION));
            self.make_empty(&key, tag)?;
            write_generation(&key, generation)?;
            write_version(&key, 0)?;
            version = Some(0);
        }
        let work = key.join(format!(".work.{tag}.img"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&work)?;
        let mut checkout = Checkout {
            name: name.to_owned(),
            version: version.unwrap_or(0),
            file,
            len: 0,
            key: key.clone(),
            work,
            owner: owner.to_owned(),
        };
        let src = File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&current)?;
        let len = src.metadata()?.len();
        checkout.len = len;
        checkout.file.set_len(len)?;
        files::copy_sparse(&src, &checkout.file, len)?;
        // When a job last started from it, for eviction.
        File::options().write(true).open(key.join(VERSION))?.set_modified(SystemTime::now())?;
        Ok(checkout)
    }

    /// A new, empty cache disk as `current.img`: ext4, made by the host.
    fn make_empty(&self, key: &Path, tag: &str) -> io::Result<()> {
        let empty = tempfile::Builder::new().prefix(".empty.").tempdir_in(key)?;
        let raw = key.join(format!(".new.{tag}.img"));
        jobfile::ext4::make_filesystem(empty.path(), &raw, self.disk_bytes, "construir-cache")
            .map_err(|e| io::Error::other(jobfile::error_chain(&e)))?;
        fs::set_permissions(&raw, fs::Permissions::from_mode(0o600))?;
        fs::rename(&raw, key.join(CURRENT))
    }

    /// The job ended ok: its copy becomes the cache's new version (the last
    /// to finish wins). Returns that version.
    pub fn keep(&self, checkout: Checkout) -> io::Result<u64> {
        let _lock = lock(&checkout.key)?;
        checkout.file.sync_all()?;
        let version = read_version(&checkout.key).unwrap_or(0).max(checkout.version) + 1;
        fs::rename(&checkout.work, checkout.key.join(CURRENT))?;
        write_version(&checkout.key, version)?;
        files::sync_dirs(&[&checkout.key])?;
        let owner = checkout.owner.clone();
        drop(checkout);
        if let Err(e) = self.evict(&owner) {
            log::warn!("cannot trim the build caches of {owner} in {}: {e}", self.dir.display());
        }
        Ok(version)
    }

    /// The guest could not mount the cache it was given (something wrote
    /// garbage there): the key starts again, empty, with its next job.
    pub fn reset(&self, checkout: Checkout) -> io::Result<()> {
        let _lock = lock(&checkout.key)?;
        match fs::remove_file(checkout.key.join(VERSION)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        match fs::remove_file(checkout.key.join(CURRENT)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every cache, most recently used first.
    pub fn list(&self) -> Vec<CacheSummary> {
        let mut out: Vec<(SystemTime, CacheSummary)> = Vec::new();
        for (owner, image, name, key) in self.keys() {
            let Some(version) = read_version(&key) else { continue };
            let Ok(meta) = fs::metadata(key.join(VERSION)) else { continue };
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((
                used,
                CacheSummary {
                    owner: jobfile::sanitize(owner.as_bytes()),
                    image: format!("i{}", jobfile::sanitize(image.as_bytes())),
                    name: jobfile::sanitize(name.as_bytes()),
                    version,
                    generation: read_generation(&key),
                    bytes: allocated(&key),
                    used: jobfile::units::rfc3339(used),
                },
            ));
        }
        out.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// Removes the caches that `generations` says their owners cleared
    /// (their generation is not the current one), then writes what is left
    /// to `running/.caches/<host_id>.json` for the server: the most
    /// recently used first, at most `wire::MAX_HELD_CACHES`. Returns how
    /// many it removed.
    pub fn report(
        &self,
        running: &Path,
        host_id: &str,
        generations: &jobfile::caches::Generations,
    ) -> io::Result<usize> {
        let mut removed = 0;
        for (owner, _, name, key) in self.keys() {
            if read_version(&key).is_none()
                || read_generation(&key) == jobfile::caches::generation(generations, &owner, &name)
            {
                continue;
            }
            let Ok(Some(_held)) = try_lock(&key) else { continue };
            for file in [VERSION, CURRENT] {
                let _ = fs::remove_file(key.join(file));
            }
            log::info!("build cache {} removed: its owner cleared it", key.display());
            removed += 1;
        }
        let held: Vec<wire::HeldCache> = self
            .list()
            .into_iter()
            .filter(|s| jobfile::caches::check_owner(&s.owner).is_ok() && jobfile::caches::check_name(&s.name).is_ok())
            .take(wire::MAX_HELD_CACHES)
            .map(|s| wire::HeldCache {
                owner: s.owner,
                image: s.image.trim_start_matches('i').to_owned(),
                name: s.name,
                generation: s.generation,
                version: s.version,
                bytes: s.bytes,
                used: s.used,
            })
            .collect();
        jobfile::layout::CacheTree::of(running).write_report(host_id, &held)?;
        Ok(removed)
    }

    /// Removes `owner`'s caches named `name` (every image), or all of the
    /// owner's when `name` is none. A cache in use by a job is removed all
    /// the same; that job's result may still keep a new version of it.
    /// Returns how many were removed.
    pub fn clear(&self, owner: &str, name: Option<&str>) -> io::Result<usize> {
        let mut removed = 0;
        for (o, _, n, key) in self.keys() {
            if o != owner || name.is_some_and(|want| want != n) {
                continue;
            }
            let _lock = lock(&key)?;
            let had = read_version(&key).is_some();
            for file in [VERSION, CURRENT] {
                match fs::remove_file(key.join(file)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            removed += usize::from(had);
        }
        Ok(removed)
    }

    /// Removes `owner`'s least recently used caches until they take at most
    /// `owner_bytes`, then anyone's until all take at most `total_bytes`,
    /// never one a job is copying or keeping right now (its lock is held),
    /// and working copies that a dead host left.
    pub fn evict(&self, owner: &str) -> io::Result<usize> {
        let why = format!("{owner}'s caches were over {} bytes", self.owner_bytes);
        let removed = self.evict_where(|o| o == owner, self.owner_bytes, &why)?;
        let why = format!("the caches of all owners were over {} bytes", self.total_bytes);
        Ok(removed + self.evict_where(|_| true, self.total_bytes, &why)?)
    }

    /// Removes the least recently used caches of the owners `of` picks until they take at most `bound`.
    fn evict_where(&self, of: impl Fn(&str) -> bool, bound: u64, why: &str) -> io::Result<usize> {
        let mut keys: Vec<(SystemTime, PathBuf, u64)> = Vec::new();
        for (o, _, _, key) in self.keys() {
            if !of(&o) {
                continue;
            }
            remove_stale_work(&key);
            let Ok(used) = fs::metadata(key.join(VERSION)).and_then(|m| m.modified()) else { continue };
            keys.push((used, key.clone(), allocated(&key)));
        }
        let mut total: u64 = keys.iter().map(|(_, _, b)| b).sum();
        keys.sort();
        let mut removed = 0;
        for (_, key, bytes) in keys {
            if total <= bound {
                break;
            }
            let Ok(Some(_held)) = try_lock(&key) else { continue };
            fs::remove_file(key.join(VERSION))?;
            let _ = fs::remove_file(key.join(CURRENT));
            log::info!("build cache {} removed: {why}", key.display());
            total = total.saturating_sub(bytes);
            removed += 1;
        }
        Ok(removed)
    }

    /// Every key directory: (owner, image number, name, path).
    fn keys(&self) -> Vec<(String, String, String, PathBuf)> {
        let mut out = Vec::new();
        let names = |dir: &Path| -> Vec<(String, PathBuf)> {
            let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .filter(|(n, _)| !n.starts_with('.'))
                .collect()
        };
        for (owner, o) in names(&self.dir) {
            for (image, i) in names(&o) {
                let Some(image) = image.strip_prefix('i').map(str::to_owned) else { continue };
                for (name, key) in names(&i) {
                    out.push((owner.clone(), image.clone(), name, key));
                }
            }
        }
        out
    }
}

/// Makes `key` and its parents below `root`, each 0700: caches are nobody's to read but the host's.
fn create_private_dirs(root: &Path, key: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(key)?;
    let mut dir = key.to_owned();
    while dir.starts_with(root) {
        let meta = fs::symlink_metadata(&dir)?;
        if !meta.is_dir() {
            return Err(io::Error::other(format!("{} is not a directory", dir.display())));
        }
        if meta.mode() & 0o077 != 0 && dir != root {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        }
        if !dir.pop() {
            break;
        }
    }
    Ok(())
}

fn lock(key: &Path) -> io::Result<Flock<File>> {
    let file = File::options().create(true).truncate(false).write(true).mode(0o600).open(key.join(LOCK))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e.into())
}

fn try_lock(key: &Path) -> io::Result<Option<Flock<File>>> {
    let file = File::options().create(true).truncate(false).write(true).mode(0o600).open(key.join(LOCK))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

fn read_version(key: &Path) -> Option<u64> {
    fs::read_to_string(key.join(VERSION)).ok()?.trim().parse().ok()
}

fn read_generation(key: &Path) -> u64 {
    fs::read_to_string(key.join(GENERATION)).ok().and_then(|g| g.trim().parse().ok()).unwrap_or(0)
}

fn write_generation(key: &Path, generation: u64) -> io::Result<()> {
    if generation == 0 && !key.join(GENERATION).exists() {
        return Ok(());
    }
    files::write_durable(&key.join(GENERATION), format!("{generation}\n").as_bytes())
}

fn write_version(key: &Path, version: u64) -> io::Result<()> {
    files::write_durable(&key.join(VERSION), format!("{version}\n").as_bytes())
}

/// Bytes a key's files take on disk (its disks are sparse).
fn allocated(key: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(key) else { return 0 };
    rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()
}

fn remove_stale_work(key: &Path) {
    let Ok(rd) = fs::read_dir(key) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".work.") || name.starts_with(".new.")) {
            continue;
        }
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if old.is_some_and(|age| age > STALE_WORK) {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn caches(dir: &Path, owner_bytes: u64) -> Caches {
        Caches::new(&dir.join("build"), 8 << 20, owner_bytes)
    }

    /// Writes `text` at 1 MiB into the working copy, as a guest would write into its disk.
    fn scribble(c: &mut Checkout, text: &[u8]) {
        c.file.seek(SeekFrom::Start(1 << 20)).expect("seek");
        c.file.write_all(text).expect("write");
    }

    /// Lends `owner`'s cache `name` (image 100) at `generation`, writes
    /// `text` into it and keeps it: the version kept.
    fn kept(c: &Caches, owner: &str, name: &str, generation: u64, text: &[u8]) -> u64 {
        let mut k = c.checkout(owner, "100", name, generation, "k").expect("checkout");
        scribble(&mut k, text);
        c.keep(k).expect("keep")
    }

    fn read_at_1mib(c: &mut Checkout, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        c.file.seek(SeekFrom::Start(1 << 20)).expect("seek");
        c.file.read_exact(&mut buf).expect("read");
        buf
    }

    #[test]
    fn a_new_cache_is_an_ext4_disk_and_only_an_ok_job_makes_a_new_version() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = caches(tmp.path(), 1 << 30);
        let mut first = c.checkout("alice", "100", "ccache", 0, "t1").expect("checkout");
        assert_eq!(first.version, 0);
        assert_eq!(first.file.metadata().expect("meta").len(), 8 << 20);
        // The host made an ext4 filesystem (its magic, 0xEF53, at byte 1080).
        let mut magic = [0u8; 2];
        first.file.seek(SeekFrom::Start(1080)).expect("seek");
        first.file.read_exact(&mut magic).expect("read");
        assert_eq!(magic, [0x53, 0xEF]);
        scribble(&mut first, b"kept");
        assert_eq!(c.keep(first).expect("keep"), 1);
        // A job that does not end ok: its copy goes, the version stays.
        let mut failed = c.checkout("alice", "100", "ccache", 0, "t2").expect("checkout");
        assert_eq!((failed.version, read_at_1mib(&mut failed, 4)), (1, b"kept".to_vec()));
        scribble(&mut failed, b"lost");
        drop(failed);
        let mut again = c.checkout("alice", "100", "ccache", 0, "t3").expect("checkout");
        assert_eq!((again.version, read_at_1mib(&mut again, 4)), (1, b"kept".to_vec()));
        drop(again);
        let key = tmp.path().join("build/alice/i100/ccache");
        let left: Vec<String> =
            fs::read_dir(&key).expect("ls").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert!(left.iter().all(|n| !n.starts_with(".work.")), "no working copy left: {left:?}");
        // Another owner, image or name is another cache.
        for (owner, image, name) in [("bob", "100", "ccache"), ("alice", "101", "ccache"), ("alice", "100", "cargo")] {
            let mut other = c.checkout(owner, image, name, 0, "t4").expect("checkout");
            assert_eq!(other.version, 0, "{owner} {image} {name}");
            assert_ne!(read_at_1mib(&mut other, 4), b"kept".to_vec());
        }
    }

    #[test]
    fn two_jobs_on_one_cache_start_from_the_same_version_and_the_last_ok_wins() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = caches(tmp.path(), 1 << 30);
        let mut a = c.checkout("alice", "100", "ccache", 0, "a").expect("checkout");
        let mut b = c.checkout("alice", "100", "ccache", 0, "b").expect("checkout");
        assert_eq!((a.version, b.version), (0, 0));
        scribble(&mut a, b"AAAA");
        scribble(&mut b, b"BBBB");
        assert_eq!(c.keep(a).expect("keep"), 1);
        assert_eq!(c.keep(b).expect("keep"), 2);
        let mut next = c.checkout("alice", "100", "ccache", 0, "c").expect("checkout");
        assert_eq!((next.version, read_at_1mib(&mut next, 4)), (2, b"BBBB".to_vec()));
    }

    #[test]
    fn a_reset_cache_starts_again_empty_and_clear_removes_only_what_it_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = caches(tmp.path(), 1 << 30);
        kept(&c, "alice", "ccache", 0, b"junk");
        let broken = c.checkout("alice", "100", "ccache", 0, "g2").expect("checkout");
        c.reset(broken).expect("reset");
        let mut fresh = c.checkout("alice", "100", "ccache", 0, "g3").expect("checkout");
        assert_eq!(fresh.version, 0);
        assert_ne!(read_at_1mib(&mut fresh, 4), b"junk".to_vec());
        drop(fresh);
        for (owner, name) in [("alice", "cargo"), ("bob", "ccache")] {
            kept(&c, owner, name, 0, b"");
        }
        let listed: Vec<(String, String, u64)> = c.list().into_iter().map(|s| (s.owner, s.name, s.version)).collect();
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert!(listed.contains(&("bob".into(), "ccache".into(), 1)), "{listed:?}");
        assert_eq!(c.clear("alice", Some("ccache")).expect("clear"), 1);
        let names: Vec<(String, String)> = c.list().into_iter().map(|s| (s.owner, s.name)).collect();
        assert_eq!(names.len(), 2);
        assert!(!names.contains(&("alice".into(), "ccache".into())), "{names:?}");
        assert_eq!(c.clear("alice", None).expect("clear"), 1, "alice's cargo: her ccache is gone already");
        assert_eq!(c.list().into_iter().map(|s| s.owner).collect::<Vec<_>>(), ["bob"]);
    }

    #[test]
    fn a_cleared_generation_is_never_lent_again_and_the_report_drops_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = caches(tmp.path(), 1 << 30);
        kept(&c, "a1", "ccache", 0, b"old!");
        kept(&c, "a2", "ccache", 0, b"");
        // Its owner cleared it: generation 1 starts empty, and keeps its own versions.
        let mut k = c.checkout("a1", "100", "ccache", 1, "t2").expect("checkout");
        assert_eq!(k.version, 0);
        assert_ne!(read_at_1mib(&mut k, 4), b"old!".to_vec());
        scribble(&mut k, b"new!");
        assert_eq!(c.keep(k).expect("keep"), 1);
        let mut k = c.checkout("a1", "100", "ccache", 1, "t3").expect("checkout");
        assert_eq!((k.version, read_at_1mib(&mut k, 4)), (1, b"new!".to_vec()));
        drop(k);
        // The report: generation 1 is current, so nothing goes; then a1 clears it again.
        let running = tmp.path().join("running");
        let mut generations = jobfile::caches::Generations::new();
        generations.entry("a1".into()).or_default().insert("ccache".into(), 1);
        assert_eq!(c.report(&running, "h1", &generations).expect("report"), 0);
        let read = |path: &Path| -> Vec<wire::HeldCache> {
            serde_json::from_slice(&fs::read(path).expect("report")).expect("json")
        };
        let file = jobfile::layout::CacheTree::of(&running).report_file("h1");
        let held = read(&file);
        assert_eq!(held.len(), 2, "{held:?}");
        assert!(held
            .iter()
            .any(|h| (h.owner.as_str(), h.generation, h.version, h.image.as_str()) == ("a1", 1, 1, "100")));
        generations.entry("a1".into()).or_default().insert("ccache".into(), 2);
        assert_eq!(c.report(&running, "h1", &generations).expect("report"), 1);
        let held = read(&file);
        assert_eq!(held.iter().map(|h| h.owner.as_str()).collect::<Vec<_>>(), ["a2"], "a2's same-named cache stays");
    }

    #[test]
    fn an_owner_over_its_limit_loses_its_least_recently_used_caches_first() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let probe = caches(tmp.path(), u64::MAX);
        let one = {
            let k = probe.checkout("size", "1", "probe", 0, "p").expect("checkout");
            probe.keep(k).expect("keep");
            probe.list()[0].bytes
        };
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let k = probe.checkout("alice", "100", name, 0, "t").expect("checkout");
            probe.keep(k).expect("keep");
            let when = SystemTime::now() - Duration::from_secs(300 - i as u64 * 100);
            let version = tmp.path().join(format!("build/alice/i100/{name}/version"));
            File::options().write(true).open(&version).expect("open").set_modified(when).expect("mtime");
        }
        let k = probe.checkout("bob", "100", "big", 0, "t").expect("checkout");
        probe.keep(k).expect("keep");
        // The same store with room for two of alice's caches, not three; bob's count apart.
        let c = caches(tmp.path(), one * 2 + one / 2);
        assert_eq!(c.evict("alice").expect("evict"), 1);
        assert_eq!(c.evict("alice").expect("evict"), 0, "within the limit now");
        let mut left: Vec<(String, String)> = c.list().into_iter().map(|s| (s.owner, s.name)).collect();
        left.sort();
        assert_eq!(
            left,
            [
                ("alice".into(), "mid".into()),
                ("alice".into(), "new".into()),
                ("bob".into(), "big".into()),
                ("size".into(), "probe".into())
            ]
        );
        // Every owner within its own bound, but all together over the total: the oldest go, whoever owns them.
        let bob_used = tmp.path().join("build/bob/i100/big/version");
        File::options().write(true).open(&bob_used).expect("open").set_modified(SystemTime::now()).expect("mtime");
        let total = Caches::new(&tmp.path().join("build"), 8 << 20, u64::MAX).with_total(one * 2 + one / 2);
        assert_eq!(total.evict("bob").expect("evict"), 2, "four caches, room for two");
        let mut left: Vec<(String, String)> = total.list().into_iter().map(|s| (s.owner, s.name)).collect();
        left.sort();
        assert_eq!(left, [("bob".into(), "big".into()), ("size".into(), "probe".into())], "the two used last");
    }
}
