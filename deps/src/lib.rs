//! A job's build dependencies, resolved and fetched where it is safe to:
//! on the host (or the server, for a farm), never in the VM. apt resolves
//! the job's relations against the archive its image was built from and the
//! image's own installed packages (`apt`); every `.deb` comes from the
//! archive's indices, verified through its signed `Release`, and is checked
//! against its sha256 again each time it is used (`cache`).

pub mod apt;
pub mod cache;
pub mod disk;
pub mod resolved;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jobfile::deps::{Pinned, Resolution};
use jobfile::image::ImageManifest;
use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

pub use apt::{Apt, AptError};
pub use cache::DebCache;

/// Where Debian keeps its archive keyring (`debian-archive-keyring`).
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Most packages one job may have installed.
pub const DEFAULT_MAX_PACKAGES: usize = 500;
/// Most bytes of `.deb` files one job's packages may come to, by default:
/// what a large build's dependencies take, far less than a host's disk.
pub const DEFAULT_MAX_PACKAGE_BYTES: u64 = 4 << 30;
/// The `.deb` cache's default size.
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 30;
/// How old the archive's lists may be before they are fetched again.
pub const DEFAULT_FRESH: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error(
        "image i{image} records no Debian archive (a mini image, or built before image-builder recorded it): \
         build the image with image-builder debootstrap to use packages"
    )]
    NoArchive { image: String },
    #[error("the archive keyring {path} is missing (install debian-archive-keyring, or give --archive-keyring)")]
    NoKeyring { path: PathBuf },
    #[error("the dependencies come to {count} packages; at most {limit} are installed for one job")]
    TooMany { count: usize, limit: usize },
    #[error("the dependencies come to {} of .deb files; at most {} are installed for one job", jobfile::units::human_size(*bytes), jobfile::units::human_size(*limit))]
    TooLarge { bytes: u64, limit: u64 },
    #[error("fetching the packages needs {} free in {path} (the .deb files and the package disk); {} are", jobfile::units::human_size(*need), jobfile::units::human_size(*free))]
    NoRoom { path: PathBuf, need: u64, free: u64 },
    #[error(transparent)]
    Apt(#[from] AptError),
    #[error("cannot use {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the packages to fetch are not fit to ask an archive for: {why}")]
    Unfit { why: String },
    #[error("the archive served no file with sha256 {sha256} for {name} {version}")]
    NotServed { name: String, version: String, sha256: String },
    #[error(
        "{path} is not a directory that this user (uid {uid}) owns and alone can write ({found}): \
         apt would read and write there as this user; give each user its own package cache"
    )]
    NotOwn { path: PathBuf, uid: u32, found: String },
}

/// `O_NOFOLLOW`, for a file that must not be opened through a link.
fn libc_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Refuses a directory that another user owns or may write into: apt
/// (run as root on a host) reads its configuration and writes its lists
/// there, and a file planted by another user must never reach it.
pub fn own_dir(path: &Path) -> Result<(), ResolveError> {
    owned_by(path, &[nix::unistd::geteuid().as_raw()])
}

/// The user apt drops to for downloads (`APT::Sandbox::User`, `_apt`),
/// which owns its `partial/` directories: apt chowns them so.
fn apt_sandbox_uid() -> Option<u32> {
    nix::unistd::User::from_name("_apt").ok().flatten().map(|u| u.uid.as_raw())
}

/// [`own_dir`], also taking a directory owned by one of `owners`.
fn owned_by(path: &Path, owners: &[u32]) -> Result<(), ResolveError> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid().as_raw();
    let meta = fs::symlink_metadata(path).map_err(|source| ResolveError::Io { path: path.to_owned(), source })?;
    let found = if !meta.file_type().is_dir() {
        Some("not a directory".to_owned())
    } else if !owners.contains(&meta.uid()) {
        Some(format!("owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!("mode {:o}: others may write", meta.mode() & 0o7777))
    } else {
        None
    };
    match found {
        None => Ok(()),
        Some(found) => Err(ResolveError::NotOwn { path: path.to_owned(), uid, found }),
    }
}

impl ResolveError {
    /// Whether it ended because the caller's `halt` said so, not because of
    /// the job or the archive.
    pub fn is_halted(&self) -> bool {
        matches!(self, ResolveError::Apt(AptError::Halted { .. }))
    }
}

/// Where the resolver keeps things, and its limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `apt/<archive>/` (lists) and `debs/` (the `.deb` cache).
    pub cache: PathBuf,
    pub keyring: PathBuf,
    pub max_packages: usize,
    /// Most bytes of `.deb` files one job's packages may come to.
    pub max_bytes: u64,
    pub cache_bytes: u64,
    pub fresh: Duration,
}

impl Settings {
    pub fn new(cache: &Path) -> Settings {
        Settings {
            cache: cache.to_owned(),
            keyring: PathBuf::from(DEFAULT_KEYRING),
            max_packages: DEFAULT_MAX_PACKAGES,
            max_bytes: DEFAULT_MAX_PACKAGE_BYTES,
            cache_bytes: DEFAULT_CACHE_BYTES,
            fresh: DEFAULT_FRESH,
        }
    }
}

/// The `.deb`s of a resolution, checked, in the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Each package's file, in the resolution's order.
    pub files: Vec<(Pinned, PathBuf)>,
    /// How many were already in the cache, and how many were downloaded.
    pub hits: usize,
    pub downloaded: usize,
}

#[derive(Debug)]
pub struct Resolver {
    settings: Settings,
}

impl Resolver {
    pub fn new(settings: Settings) -> Resolver {
        Resolver { settings }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// apt for the archive of the image `image`, with the lock held while
    /// it is used; its lists made fresh when `lists`.
    fn apt(
        &self,
        image: &str,
        manifest: &ImageManifest,
        lists: bool,
        halt: &dyn Fn() -> bool,
    ) -> Result<(Apt, Flock<File>), ResolveError> {
        let archive = manifest.archive.as_ref().ok_or_else(|| ResolveError::NoArchive { image: image.to_owned() })?;
        if !self.settings.keyring.is_file() {
            return Err(ResolveError::NoKeyring { path: self.settings.keyring.clone() });
        }
        let key = digest(&format!(
            "{}\n{}\n{}\n{}\n{}",
            archive.uri,
            archive.suite,
            archive.components.join(" "),
            archive.architecture,
            self.settings.keyring.display()
        ));
        let dir = self.settings.cache.join("apt").join(&key[..16]);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ResolveError::Io { path, source }
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        for sub in ["", "etc", "lists", "lists/partial", "cache", "cache/archives", "cache/archives/partial", "log"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io(&path))?;
        }
        let own = [self.settings.cache.clone(), self.settings.cache.join("apt")]
            .into_iter()
            .chain(["", "etc", "lists", "cache", "cache/archives", "log"].iter().map(|sub| dir.join(sub)));
        for path in own {
            own_dir(&path)?;
        }
        // apt gives its partial/ directories to the user it downloads as (when it runs as root).
        let me = nix::unistd::geteuid().as_raw();
        let partial_owners: Vec<u32> = std::iter::once(me).chain(apt_sandbox_uid()).collect();
        for sub in ["lists/partial", "cache/archives/partial"] {
            owned_by(&dir.join(sub), &partial_owners)?;
        }
        let lock_path = dir.join("lock");
        use std::os::unix::fs::OpenOptionsExt;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc_nofollow())
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, e)| ResolveError::Io { path: lock_path, source: e.into() })?;
        let apt = Apt::new(&dir, archive, &self.settings.keyring)?;
        if lists && !apt.is_fresh(self.settings.fresh) {
            log::info!("reading the archive {} {} (apt-get update)", archive.uri, archive.suite);
            apt.update(halt)?;
        }
        Ok((apt, lock))
    }

    /// Resolves `relations` for image `image` (its directory `image_dir`):
    /// what apt installs onto that image's packages, each pinned to the
    /// archive's sha256. `halt` is asked while apt runs.
    pub fn resolve(
        &self,
        image: &str,
        image_dir: &Path,
        manifest: &ImageManifest,
        relations: &[String],
        halt: &dyn Fn() -> bool,
    ) -> Result<Resolution, ResolveError> {
        let (apt, _lock) = self.apt(image, manifest, true, halt)?;
        let archive = manifest.archive.as_ref().expect("apt() checked it");
        let status = image_dir.join(&archive.dpkg_status);
        // The same question against the same lists and image: the answer apt gave before.
        let resolved = resolved::Resolved::new(apt.dir());
        let key = resolved::Resolved::key(&apt.dir().join("lists"), &status, relations)
            .inspect_err(|e| log::warn!("cannot key the resolution of image i{image}'s packages: {e}"))
            .ok();
        if let Some(resolution) = key.as_deref().and_then(|k| resolved.get(k)) {
            log::info!("{} relations on image i{image}: resolved before against the same lists", relations.len());
            self.check_count(resolution.install.len())?;
            self.check_bytes(&resolution)?;
            return Ok(resolution);
        }
        let apt::Simulated { install, remove } = apt.satisfy(&status, relations, halt)?;
        self.check_count(install.len())?;
        let mut install = apt.show(&install)?;
        install.sort();
        let resolution = Resolution { install, remove };
        self.check_bytes(&resolution)?;
        if let Some(key) = key {
            if let Err(e) = resolved.put(&key, &resolution) {
                log::warn!("cannot keep the resolution of image i{image}'s packages: {e}");
            }
        }
        Ok(resolution)
    }

    /// Refuses more packages than `max_packages`.
    fn check_count(&self, count: usize) -> Result<(), ResolveError> {
        if count > self.settings.max_packages {
            return Err(ResolveError::TooMany { count, limit: self.settings.max_packages });
        }
        Ok(())
    }

    /// Refuses a resolution whose `.deb` files come to more than `max_bytes`
    /// (their sizes are known from the archive's lists, before any download).
    pub fn check_bytes(&self, resolution: &Resolution) -> Result<(), ResolveError> {
        let bytes = resolution.install.iter().fold(0u64, |sum, p| sum.saturating_add(p.size));
        if bytes > self.settings.max_bytes {
            return Err(ResolveError::TooLarge { bytes, limit: self.settings.max_bytes });
        }
        Ok(())
    }

    /// Every `.deb` of `resolution`, checked against its sha256: from the
    /// cache, or downloaded into it from the archive of the image by each
    /// package's path there (`filename`), so that a pinned version is found
    /// as long as the archive holds the file, whatever its newest lists say.
    /// The cache is then trimmed to its size, keeping these. `halt` is
    /// asked while files download.
    pub fn fetch(
        &self,
        image: &str,
        manifest: &ImageManifest,
        resolution: &Resolution,
        halt: &dyn Fn() -> bool,
    ) -> Result<Fetched, ResolveError> {
        // Its paths become URIs and its names reach apt in the VM.
        resolution.check().map_err(|why| ResolveError::Unfit { why })?;
        // A pin from a server or a lease is held to this host's own bound.
        self.check_bytes(resolution)?;
        let debs = self.settings.cache.join("debs");
        let cache = DebCache::new(&debs).map_err(|source| ResolveError::Io { path: debs.clone(), source })?;
        // The .debs become a layer root boots from: only this user's own directory holds them.
        own_dir(&self.settings.cache)?;
        own_dir(&debs)?;
        let io = |path: PathBuf| move |source| ResolveError::Io { path, source };
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for p in &resolution.install {
            match cache.get(&p.sha256, p.size).map_err(io(cache.path(&p.sha256)))? {
                Some(path) => {
                    found.insert(p.sha256.clone(), path);
                }
                None => missing.push(p),
            }
        }
        let hits = found.len();
        if !missing.is_empty() {
            // Room for what is downloaded, and for the package disk made of all of them.
            let sum = |ps: &mut dyn Iterator<Item = &Pinned>| ps.fold(0u64, |s, p| s.saturating_add(p.size));
            let need = sum(&mut missing.iter().copied()).saturating_add(sum(&mut resolution.install.iter()));
            let free = nix::sys::statvfs::statvfs(&debs)
                .map(|st| st.blocks_available().saturating_mul(st.fragment_size()))
                .map_err(|e| ResolveError::Io { path: debs.clone(), source: e.into() })?;
            if need > free {
                return Err(ResolveError::NoRoom { path: debs.clone(), need, free });
            }
            // The files are named by the pin itself: no lists are read, or fetched.
            let (apt, _lock) = self.apt(image, manifest, false, halt)?;
            let scratch = cache.scratch().map_err(io(debs.clone()))?;
            let wanted: Vec<(&str, &str)> = missing.iter().map(|p| (p.filename.as_str(), p.sha256.as_str())).collect();
            apt.fetch_files(&wanted, scratch.path(), halt)?;
            for p in &missing {
                let path = scratch.path().join(format!("{}.deb", p.sha256));
                let taken = match cache.insert(&path, &p.sha256) {
                    Ok(taken) => taken,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(ResolveError::Io { path, source: e }),
                };
                let Some(into) = taken else {
                    return Err(ResolveError::NotServed {
                        name: p.name.clone(),
                        version: p.version.clone(),
                        sha256: p.sha256.clone(),
                    });
                };
                found.insert(p.sha256.clone(), into);
            }
        }
        let keep: HashSet<String> = resolution.install.iter().map(|p| p.sha256.clone()).collect();
        if let Err(e) = cache.evict(self.settings.cache_bytes, &keep) {
            log::warn!("cannot trim the package cache {}: {e}", debs.display());
        }
        let files = resolution.install.iter().map(|p| (p.clone(), found[&p.sha256].clone())).collect();
        Ok(Fetched { files, hits, downloaded: missing.len() })
    }
}

fn digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_another_user_owns_or_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("cache");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        own_dir(&dir).expect("ours, written by us alone");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).expect("chmod");
        assert!(own_dir(&dir).is_err_and(|e| e.to_string().contains("others may write")));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("link");
        assert!(own_dir(&link).is_err_and(|e| e.to_string().contains("not a directory")));
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
            assert!(own_dir(&dir).is_err_and(|e| e.to_string().contains("owned by uid 65534")));
        }
    }

    #[test]
    fn packages_over_the_byte_bound_are_refused_before_any_download() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let resolver = Resolver::new(Settings { max_bytes: 100, ..Settings::new(tmp.path()) });
        let pinned = |name: &str, size: u64| Pinned {
            name: name.into(),
            version: "1".into(),
            architecture: "amd64".into(),
            sha256: "a".repeat(64),
            size,
            filename: format!("pool/main/x/{name}_1_amd64.deb"),
        };
        let small = Resolution { install: vec![pinned("aa", 60)], remove: vec![] };
        resolver.check_bytes(&small).expect("within");
        let large = Resolution { install: vec![pinned("aa", 60), pinned("bb", 60)], remove: vec![] };
        let err = resolver.check_bytes(&large).expect_err("over");
        assert_eq!(
            err.to_string(),
            "the dependencies come to 120 bytes of .deb files; at most 100 bytes are installed for one job"
        );
        // A pin (from a server or a lease) is held to the host's own bound before anything is fetched.
        let manifest: ImageManifest = toml::from_str(
            "kind = \"debootstrap\"\ndescription = \"\"\nbuilder_version = \"0\"\ncreated = \"\"\n\
             kernel_version = \"6\"\nkernel = \"k\"\ninitrd = \"i\"\ncmdline = \"\"\njob_device = \"/dev/vdb\"\n",
        )
        .expect("manifest");
        let fetched = resolver.fetch("1", &manifest, &large, &|| false).expect_err("over");
        assert!(matches!(fetched, ResolveError::TooLarge { bytes: 120, limit: 100 }), "{fetched}");
    }
}
