//! Everything between fork and exec of QEMU, and what it is prepared from.
//!
//! Every QEMU (the KVM probe's too) starts in its own session with no core
//! files, bounded open files and file size, umask 077, every inherited
//! descriptor above the ones it is given closed at exec, and no new
//! privileges. When the host is root, each VM also gets:
//! - its own uid and gid from the operator's range (`IdPool`), no
//!   supplementary groups: no two live VMs share one, so an escaped QEMU
//!   cannot read, signal or ptrace another job's VM;
//! - its own mount, pid, ipc and uts namespaces, and an empty network
//!   namespace when networking is off;
//! - a root holding only what QEMU reads after exec (`JailRoot`): its
//!   binary and libraries, the accelerator modules and firmware, read-only;
//!   `/dev/null`, `/dev/urandom`, a `/dev/kvm` node of its own (its uid's,
//!   0600) when KVM is used; its own `/proc`;
//!   and its private scratch directory as `/var/tmp` for the snapshot overlay;
//! - where the kernel has Landlock, file access restricted to that root.
//!
//! A pid namespace only applies to children, so the forked child unshares,
//! forks once more and waits as the namespace's keeper: the grandchild is
//! PID 1 of the new namespace and becomes QEMU. Both die with the host
//! (PDEATHSIG), and the keeper passes QEMU's exit status on.
//!
//! The code that runs in the child must be async-signal-safe: plain
//! syscalls on values prepared before the fork, no allocation.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use jobfile::arch::Arch;
use thiserror::Error;

/// The unprivileged identity one QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Error)]
pub enum JailError {
    #[error("{text:?} is not a uid range: give FIRST:COUNT, e.g. 1879048192:256")]
    BadRange { text: String },
    #[error(
        "the VM uid range {first}-{last} is not allowed: it must hold 1 to 65536 ids, above 1000 and below 4294967294"
    )]
    RangeOutOfBounds { first: u32, last: u32 },
    #[error("{what} {name:?} (id {id}) in {path} lies inside the VM uid range {first}-{last}: a VM must never run as an existing account; choose another --vm-ids")]
    RangeTaken { what: &'static str, name: String, id: u32, path: PathBuf, first: u32, last: u32 },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create the uid lock directory {path}")]
    LockDir { path: PathBuf, source: io::Error },
    #[error("every uid of the VM range {first}-{last} is in use (by this host's VMs, another host's, or a process still running as one)")]
    Exhausted { first: u32, last: u32 },
    #[error("cannot run {command} to find what {qemu} needs")]
    Discover { command: &'static str, qemu: PathBuf, source: io::Error },
    #[error("cannot find {what} for {qemu}")]
    Missing { what: String, qemu: PathBuf },
    #[error("path {path} has a NUL byte")]
    Nul { path: PathBuf },
}

/// The uids (and gids, the same numbers) VMs run as: `first` and the `count - 1` after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub count: u32,
}

impl IdRange {
    /// Above the ranges systemd hands to containers (which end at
    /// 1879048191) and below the 2^31 ids some tools mishandle; 256 VMs.
    pub const DEFAULT: IdRange = IdRange { first: 1_879_048_192, count: 256 };

    pub fn last(self) -> u32 {
        self.first + (self.count - 1)
    }

    fn contains(self, id: u32) -> bool {
        (self.first..=self.last()).contains(&id)
    }
}

impl FromStr for IdRange {
    type Err = JailError;

    fn from_str(s: &str) -> Result<Self, JailError> {
        let bad = || JailError::BadRange { text: s.to_owned() };
        let (first, count) = s.split_once(':').ok_or_else(bad)?;
        let (first, count): (u32, u32) = (first.parse().map_err(|_| bad())?, count.parse().map_err(|_| bad())?);
        let last = u64::from(first) + u64::from(count) - 1;
        if count == 0 || count > 65_536 || first <= 1000 || last >= 4_294_967_294 {
            return Err(JailError::RangeOutOfBounds { first, last: last.min(u64::from(u32::MAX)) as u32 });
        }
        Ok(IdRange { first, count })
    }
}

impl std::fmt::Display for IdRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.first, self.count)
    }
}

/// Refuses a range that holds any account's uid or any group's gid.
pub fn check_range(range: IdRange, passwd: &Path, group: &Path) -> Result<(), JailError> {
    for (path, what, id_field) in [(passwd, "user", 2), (group, "group", 2)] {
        let text = fs::read_to_string(path).map_err(|source| JailError::Read { path: path.to_owned(), source })?;
        for line in text.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            let ids: Vec<u32> = match what {
                // A user's own uid and its primary gid.
                "user" => fields.iter().skip(id_field).take(2).filter_map(|f| f.parse().ok()).collect(),
                _ => fields.get(id_field).and_then(|f| f.parse().ok()).into_iter().collect(),
            };
            if let Some(&id) = ids.iter().find(|&&id| range.contains(id)) {
                return Err(JailError::RangeTaken {
                    what,
                    name: fields[0].to_owned(),
                    id,
                    path: path.to_owned(),
                    first: range.first,
                    last: range.last(),
                });
            }
        }
    }
    Ok(())
}

/// Hands out uids from a range, one per live VM. A uid is held by an
/// exclusive `flock` on `<lock_dir>/<uid>.lock`, so hosts sharing the
/// machine never hand out the same one, and a host that dies releases its
/// locks with its descriptors. A uid that any process still runs as is
/// passed over.
#[derive(Debug)]
pub struct IdPool {
    range: IdRange,
    lock_dir: PathBuf,
    next: Mutex<u32>,
}

/// One VM's uid, held until dropped.
#[derive(Debug)]
pub struct IdLease {
    pub id: Identity,
    _lock: nix::fcntl::Flock<File>,
}

impl IdPool {
    /// The default place for the locks: root's, in memory, gone at reboot.
    pub const LOCK_DIR: &'static str = "/run/construir/vm-ids";

    pub fn new(range: IdRange, lock_dir: &Path) -> Result<Arc<Self>, JailError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(lock_dir)
            .map_err(|source| JailError::LockDir { path: lock_dir.to_owned(), source })?;
        Ok(Arc::new(IdPool { range, lock_dir: lock_dir.to_owned(), next: Mutex::new(0) }))
    }

    pub fn range(&self) -> IdRange {
        self.range
    }

    pub fn acquire(&self) -> Result<IdLease, JailError> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let busy = uids_in_use();
        for i in 0..self.range.count {
            let offset = (*next + i) % self.range.count;
            let uid = self.range.first + offset;
            if busy.contains(&uid) {
                continue;
            }
            let path = self.lock_dir.join(format!("{uid}.lock"));
            let Ok(lock) =
                OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_NOFOLLOW).open(&path)
            else {
                continue;
            };
            if let Ok(lock) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                *next = (offset + 1) % self.range.count;
                return Ok(IdLease { id: Identity { uid, gid: uid }, _lock: lock });
            }
        }
        Err(JailError::Exhausted { first: self.range.first, last: self.range.last() })
    }
}

/// Real uids of the processes running now.
fn uids_in_use() -> BTreeSet<u32> {
    let Ok(procs) = fs::read_dir("/proc") else { return BTreeSet::new() };
    procs
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().as_bytes().iter().all(u8::is_ascii_digit))
        .filter_map(|e| fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .collect()
}

/// What the jail's root holds: each path bound read-only at the same place.
#[derive(Debug, Clone)]
pub struct JailRoot {
    /// Each guest architecture's QEMU binary, canonical (so `/proc/self/exe` finds its data beside it).
    pub qemus: BTreeMap<Arch, PathBuf>,
    /// Files and directories bound read-only.
    pub binds: Vec<PathBuf>,
}

impl JailRoot {
    /// The root for the QEMUs of `emulators` (one per guest architecture):
    /// what each reads after exec (see `discover_one`), in one root. A VM's
    /// root therefore holds every architecture's QEMU, read-only; none can
    /// run another program (`-sandbox spawn=deny`).
    pub fn discover(emulators: &[(Arch, &Path)]) -> Result<Self, JailError> {
        let mut binds = BTreeSet::new();
        let mut qemus = BTreeMap::new();
        for (arch, qemu) in emulators {
            qemus.insert(*arch, discover_one(qemu, &mut binds)?);
        }
        // A directory bound whole makes binds below it redundant.
        let all: Vec<PathBuf> = binds.into_iter().collect();
        let binds =
            all.iter().filter(|p| !all.iter().any(|q| q != *p && p.starts_with(q) && q.is_dir())).cloned().collect();
        Ok(JailRoot { qemus, binds })
    }

    /// The QEMU binary for `arch` guests inside the root.
    pub fn qemu(&self, arch: Arch) -> Option<&Path> {
        self.qemus.get(&arch).map(PathBuf::as_path)
    }
}

/// Finds what `qemu` reads after exec, into `binds`: its libraries (as the
/// dynamic loader resolves them, through `ldd`), its accelerator modules
/// and their libraries, and its firmware directories (as `qemu -L help`
/// lists them) with the directories their links point into. Returns the
/// binary's canonical path.
fn discover_one(qemu: &Path, binds: &mut BTreeSet<PathBuf>) -> Result<PathBuf, JailError> {
    let missing = |what: &str| JailError::Missing { what: what.to_owned(), qemu: qemu.to_owned() };
    let qemu = which(qemu).ok_or_else(|| missing("the binary"))?;
    let prefix = qemu.parent().and_then(Path::parent).ok_or_else(|| missing("the install prefix"))?.to_owned();
    binds.insert(qemu.clone());
    let mut objects = vec![qemu.clone()];
    let modules = fs::read_dir(prefix.join("lib/x86_64-linux-gnu/qemu"))
        .or_else(|_| fs::read_dir(prefix.join("lib/aarch64-linux-gnu/qemu")))
        .or_else(|_| fs::read_dir(prefix.join("lib/qemu")))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.as_bytes().starts_with(b"accel-")));
    for module in modules {
        binds.insert(module.clone());
        objects.push(module);
    }
    for object in &objects {
        binds.extend(libraries(object, &qemu)?);
    }
    // QEMU's own list of firmware directories (`-L help`), and wherever their links point.
    let out = Command::new(&qemu).args(["-L", "help"]).env_clear().output().map_err(|source| JailError::Discover {
        command: "qemu -L help",
        qemu: qemu.clone(),
        source,
    })?;
    let data: Vec<PathBuf> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| fs::canonicalize(l.trim()).ok()).collect();
    if data.is_empty() {
        return Err(missing("its firmware directories (qemu -L help)"));
    }
    for dir in &data {
        binds.insert(dir.clone());
        for entry in fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()) {
            if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                if let Some(target) = fs::canonicalize(entry.path()).ok().and_then(|t| t.parent().map(Path::to_owned)) {
                    binds.insert(target);
                }
            }
        }
    }
    Ok(qemu)
}

/// `program` as exec would find it, canonical.
fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return fs::canonicalize(program).ok();
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file()).and_then(|p| fs::canonicalize(p).ok())
}

/// The shared objects `object` loads, as paths, from `ldd`.
fn libraries(object: &Path, qemu: &Path) -> Result<Vec<PathBuf>, JailError> {
    const LDD: &str = "ldd";
    let out = Command::new(LDD).arg(object).env_clear().output().map_err(|source| JailError::Discover {
        command: LDD,
        qemu: qemu.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        if line.contains("not found") {
            return Err(JailError::Missing { what: format!("library {}", line.trim()), qemu: qemu.to_owned() });
        }
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = line.split("=>").last().and_then(|rest| rest.split_whitespace().next());
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Whether the kernel has Landlock, and its ABI version (0: none).
pub fn landlock_abi() -> u32 {
    // SAFETY: the version query passes no pointer the kernel reads.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(r).unwrap_or(0)
}

const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const LL_EXECUTE: u64 = 1 << 0;
const LL_WRITE_FILE: u64 = 1 << 1;
const LL_READ_FILE: u64 = 1 << 2;
const LL_READ_DIR: u64 = 1 << 3;
const LL_REMOVE_FILE: u64 = 1 << 5;
const LL_MAKE_REG: u64 = 1 << 8;
const LL_TRUNCATE: u64 = 1 << 14;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Most descriptors `enter` can pass on (a job's: kernel, initrd, root,
/// layer, job disk twice, and two for each of up to eight build caches).
pub const MAX_FDS: usize = 32;
/// Most mount steps a jail's root may take.
const MAX_STEPS: usize = 512;

/// Limits set on QEMU before exec.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest file QEMU may write (the job disk, the snapshot overlay).
    pub file_size: u64,
    pub open_files: u64,
}

/// One step of building the jail's root, run in the child.
#[derive(Debug)]
enum Step {
    Mkdir(CString),
    /// Create an empty file to bind a file onto.
    Touch(CString),
    /// Bind `src` at `dst`; read-only unless it is the scratch directory; devices keep `nodev` off.
    Bind {
        src: CString,
        dst: CString,
        writable: bool,
        device: bool,
    },
    /// A character device node of this VM's own (mode 0600, owned by its uid): `/dev/kvm`.
    Node {
        path: CString,
        rdev: libc::dev_t,
        owner: Identity,
    },
    Proc(CString),
}

/// Everything the child needs, prepared before the fork (no allocation after it).
#[derive(Debug)]
pub struct Plan {
    pub identity: Option<Identity>,
    pub limits: Limits,
    /// (open descriptor, number it must have in QEMU).
    pub fds: Vec<(i32, i32)>,
    pub cgroup: Option<CString>,
    /// Namespaces and the minimal root; `None` when the host is not root.
    namespaces: Option<Namespaces>,
}

#[derive(Debug)]
struct Namespaces {
    flags: libc::c_int,
    new_root: CString,
    steps: Vec<Step>,
    landlock_abi: u32,
    /// Descriptor numbers (in QEMU) of files it reopens through /proc/self/fd (kernel, initrd).
    reopened: Vec<i32>,
}

/// The paths the child's Landlock rules name, inside the new root.
const TMP: &CStr = c"/var/tmp";

/// Where a jailed QEMU finds its scratch directory (its TMPDIR). Not `/tmp`:
/// QEMU puts snapshot overlays in `/var/tmp` when TMPDIR is `/tmp`.
pub const SCRATCH: &str = "/var/tmp";
const ROOT: &CStr = c"/";
const DEVICES: [&CStr; 3] = [c"/dev/null", c"/dev/urandom", c"/dev/kvm"];

impl Plan {
    /// A plan for a QEMU that runs as this (unprivileged) host's own user: no namespaces.
    pub fn plain(limits: Limits, fds: Vec<(i32, i32)>) -> Self {
        Plan { identity: None, limits, fds, cgroup: None, namespaces: None }
    }

    /// A plan for a jailed QEMU: `job_dir/root` (an empty directory) becomes
    /// its root, `job_dir/scratch` (owned by `identity`) its `/var/tmp`.
    #[allow(clippy::too_many_arguments)]
    pub fn jailed(
        identity: Identity,
        limits: Limits,
        fds: Vec<(i32, i32)>,
        reopened: Vec<i32>,
        root: &JailRoot,
        job_dir: &Path,
        kvm: bool,
        networking: bool,
        landlock_abi: u32,
    ) -> Result<Self, JailError> {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Nul { path: p.to_owned() });
        let new_root = job_dir.join("root");
        let inside = |p: &Path| new_root.join(p.strip_prefix("/").unwrap_or(p));
        let mut steps = Vec::new();
        let mut made = BTreeSet::new();
        let mut mkdirs = |dir: &Path, steps: &mut Vec<Step>| -> Result<(), JailError> {
            let mut chain: Vec<&Path> = dir.ancestors().take_while(|a| *a != Path::new("/")).collect();
            chain.reverse();
            for d in chain {
                if made.insert(d.to_owned()) {
                    steps.push(Step::Mkdir(c(&inside(d))?));
                }
            }
            Ok(())
        };
        for path in &root.binds {
            let is_dir = path.is_dir();
            mkdirs(if is_dir { path } else { path.parent().unwrap_or(Path::new("/")) }, &mut steps)?;
            if !is_dir {
                steps.push(Step::Touch(c(&inside(path))?));
            }
            steps.push(Step::Bind { src: c(path)?, dst: c(&inside(path))?, writable: false, device: false });
        }
        mkdirs(Path::new("/dev"), &mut steps)?;
        for dev in ["/dev/null", "/dev/urandom"] {
            steps.push(Step::Touch(c(&inside(Path::new(dev)))?));
            steps.push(Step::Bind {
                src: c(Path::new(dev))?,
                dst: c(&inside(Path::new(dev)))?,
                writable: true,
                device: true,
            });
        }
        if kvm {
            // The host's node is root:kvm 0660, and the VM's uid has no groups: it gets a node of its own.
            use std::os::unix::fs::MetadataExt;
            let kvm_dev = Path::new("/dev/kvm");
            let rdev =
                fs::metadata(kvm_dev).map_err(|source| JailError::Read { path: kvm_dev.to_owned(), source })?.rdev();
            steps.push(Step::Node { path: c(&inside(kvm_dev))?, rdev, owner: identity });
        }
        mkdirs(Path::new(SCRATCH), &mut steps)?;
        steps.push(Step::Bind {
            src: c(&job_dir.join("scratch"))?,
            dst: c(&inside(Path::new(SCRATCH)))?,
            writable: true,
            device: false,
        });
        mkdirs(Path::new("/proc"), &mut steps)?;
        steps.push(Step::Proc(c(&inside(Path::new("/proc")))?));
        if steps.len() > MAX_STEPS || fds.len() > MAX_FDS {
            let qemu = root.qemus.values().next().cloned().unwrap_or_default();
            return Err(JailError::Missing { what: "a root small enough to build".into(), qemu });
        }
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if !networking {
            flags |= libc::CLONE_NEWNET;
        }
        Ok(Plan {
            identity: Some(identity),
            limits,
            fds,
            cgroup: None,
            namespaces: Some(Namespaces { flags, new_root: c(&new_root)?, steps, landlock_abi, reopened }),
        })
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads the struct, which lives across the call.
    check(unsafe { libc::setrlimit(resource, &lim) })
}

/// Runs in the forked child, right before exec (from `Command::pre_exec`).
///
/// # Safety
/// Only call between fork and exec; `plan` was fully built before the fork.
pub unsafe fn enter(plan: &Plan) -> io::Result<()> {
    // SAFETY (whole function): each call is a plain syscall on values that
    // were prepared before the fork; nothing allocates.
    unsafe {
        check(libc::setsid())?;
        set_limit(libc::RLIMIT_CORE, 0)?;
        set_limit(libc::RLIMIT_NOFILE, plan.limits.open_files)?;
        set_limit(libc::RLIMIT_FSIZE, plan.limits.file_size)?;
        // Two steps, so no source is overwritten before it is moved and a
        // descriptor already at its number still loses close-on-exec:
        // first everything above the targets, then each to its number.
        let mut high = [-1i32; MAX_FDS];
        if plan.fds.len() > MAX_FDS {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        for (slot, &(from, _)) in high.iter_mut().zip(&plan.fds) {
            *slot = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 100);
            check(*slot)?;
        }
        let mut top = 2;
        for (&moved, &(_, to)) in high.iter().zip(&plan.fds) {
            // dup2 leaves the new descriptor without close-on-exec.
            check(libc::dup2(moved, to))?;
            top = top.max(to);
        }
        // Nothing the host inherited or opened reaches QEMU: every other
        // descriptor closes at exec (closing them now would also close the
        // pipe through which a failed exec is reported).
        check(libc::syscall(libc::SYS_close_range, top + 1, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) as libc::c_int)?;
        if let Some(procs) = &plan.cgroup {
            // While still root: the group's files belong to root.
            crate::cgroup::join(procs)?;
        }
        if let Some(ns) = &plan.namespaces {
            check(libc::unshare(ns.flags))?;
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0))?;
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            let pid = libc::fork();
            check(pid)?;
            if pid > 0 {
                keep_namespace(pid);
            }
            // PID 1 of the new namespace: dies with the keeper, builds its root.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0))?;
            // The root's directories are made 0755 whatever umask the host was started with (a
            // service's UMask=0027, a batch job's inherited one): QEMU's uid must search them.
            libc::umask(0o022);
            build_root(ns)?;
            check(libc::sethostname(c"construir-qemu".as_ptr(), 14))?;
        }
        // After the root is built: its directories must stay searchable by QEMU's uid.
        libc::umask(0o077);
        if let Some(id) = plan.identity {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(id.gid))?;
            check(libc::setuid(id.uid))?;
            if libc::getuid() == 0 || libc::geteuid() == 0 {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        if let Some(ns) = plan.namespaces.as_ref().filter(|ns| ns.landlock_abi > 0) {
            restrict_files(ns)?;
        }
        // After the uid change, which clears it: QEMU dies with its parent.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0))?;
        if plan.namespaces.is_none() && libc::getppid() == 1 {
            // The host died before the line above took effect.
            libc::_exit(1);
        }
    }
    Ok(())
}

/// The keeper: holds the namespace's PID 1 (`pid`) until it ends and exits
/// with its status (128 + signal when it was killed). Never returns.
///
/// # Safety
/// Only in the forked child, as `enter` calls it.
unsafe fn keep_namespace(pid: libc::pid_t) -> ! {
    // SAFETY: plain syscalls; `status` lives across waitpid.
    unsafe {
        // The keeper holds nothing: no console pipes, no exec-error pipe.
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut status = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        libc::_exit(128 + libc::WTERMSIG(status));
    }
}

/// Builds the minimal root on a small tmpfs and pivots into it.
///
/// # Safety
/// Only in the forked child, after `unshare(CLONE_NEWNS)`.
unsafe fn build_root(ns: &Namespaces) -> io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: mount, mkdir, open, pivot_root on NUL-terminated strings prepared before the fork.
    unsafe {
        // Nothing mounted here propagates back to the host.
        check(libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
        // Not nodev: the VM's own /dev/kvm node lives on it (nothing else is a device there).
        check(libc::mount(
            c"tmpfs".as_ptr(),
            ns.new_root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"mode=0755,size=1m,nr_inodes=4096".as_ptr().cast(),
        ))?;
        for step in &ns.steps {
            match step {
                Step::Mkdir(dir) => match libc::mkdir(dir.as_ptr(), 0o755) {
                    0 => {}
                    _ if *libc::__errno_location() == libc::EEXIST => {}
                    _ => return Err(io::Error::last_os_error()),
                },
                Step::Touch(file) => {
                    let fd = libc::open(file.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                    check(fd)?;
                    libc::close(fd);
                }
                Step::Bind { src, dst, writable, device } => {
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
                    if !writable {
                        flags |= libc::MS_RDONLY;
                    }
                    if !device {
                        flags |= libc::MS_NODEV;
                    }
                    check(libc::mount(null, dst.as_ptr(), null, flags, std::ptr::null()))?;
                }
                Step::Node { path, rdev, owner } => {
                    check(libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, *rdev))?;
                    check(libc::chown(path.as_ptr(), owner.uid, owner.gid))?;
                }
                Step::Proc(dir) => {
                    // This namespace's own processes only: QEMU itself.
                    check(libc::mount(
                        c"proc".as_ptr(),
                        dir.as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"hidepid=2".as_ptr().cast(),
                    ))?;
                }
            }
        }
        check(libc::chdir(ns.new_root.as_ptr()))?;
        // pivot_root(".", "."): the old root ends up on top, and is then detached.
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))?;
        // The root's own directories and mount points are read-only too.
        check(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
            std::ptr::null(),
        ))?;
    }
    Ok(())
}

/// Landlock: reads beneath the (minimal, read-only) root, writes only in
/// `/var/tmp` and to the devices, and reads of the files QEMU reopens through
/// `/proc/self/fd` (its kernel and initrd, which live outside the root).
///
/// # Safety
/// Only in the forked child, after `build_root` and no_new_privs.
unsafe fn restrict_files(ns: &Namespaces) -> io::Result<()> {
    let handled = match ns.landlock_abi {
        1 => (1u64 << 13) - 1,
        2 => (1u64 << 14) - 1,
        _ => (1u64 << 15) - 1,
    };
    let truncate = if ns.landlock_abi >= 3 { LL_TRUNCATE } else { 0 };
    let attr = RulesetAttr { handled_access_fs: handled };
    // SAFETY: the attribute structs live across the calls; descriptors are ours.
    unsafe {
        let ruleset = libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        ) as libc::c_int;
        check(ruleset)?;
        let add = |fd: libc::c_int, access: u64| -> io::Result<()> {
            let rule = PathBeneathAttr { allowed_access: access, parent_fd: fd };
            check(libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset,
                LANDLOCK_RULE_PATH_BENEATH,
                &rule as *const PathBeneathAttr,
                0u32,
            ) as libc::c_int)
        };
        let open_path = |path: &CStr| libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
        let root = open_path(ROOT);
        check(root)?;
        add(root, LL_READ_FILE | LL_READ_DIR | LL_EXECUTE)?;
        libc::close(root);
        let tmp = open_path(TMP);
        check(tmp)?;
        add(tmp, LL_READ_FILE | LL_READ_DIR | LL_WRITE_FILE | LL_MAKE_REG | LL_REMOVE_FILE | truncate)?;
        libc::close(tmp);
        for dev in DEVICES {
            let fd = open_path(dev);
            if fd >= 0 {
                add(fd, LL_READ_FILE | LL_WRITE_FILE)?;
                libc::close(fd);
            }
        }
        for &fd in &ns.reopened {
            add(fd, LL_READ_FILE)?;
        }
        check(libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) as libc::c_int)?;
        libc::close(ruleset);
    }
    Ok(())
}

/// Whether this process is root (and so must drop privileges for QEMU).
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!("1879048192:256".parse::<IdRange>().expect("range"), IdRange::DEFAULT);
        assert_eq!(IdRange::DEFAULT.last(), 1_879_048_447);
        for bad in ["", "5", "a:b", "100:10", "2000:0", "4294967290:100", "2000:70000"] {
            assert!(bad.parse::<IdRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_range_holding_an_account_or_group_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (passwd, group) = (dir.path().join("passwd"), dir.path().join("group"));
        fs::write(&passwd, "root:x:0:0:root:/root:/bin/bash\nalice:x:5000:5000::/home/alice:/bin/sh\n").expect("write");
        fs::write(&group, "root:x:0:\nalice:x:5000:\nbuilders:x:7005:\n").expect("write");
        let range = |first, count| IdRange { first, count };
        assert!(check_range(range(6000, 100), &passwd, &group).is_ok());
        let e = check_range(range(4990, 20), &passwd, &group).expect_err("alice");
        assert!(e.to_string().contains("user \"alice\" (id 5000)"), "{e}");
        let e = check_range(range(7000, 10), &passwd, &group).expect_err("builders");
        assert!(e.to_string().contains("group \"builders\" (id 7005)"), "{e}");
    }

    #[test]
    fn the_pool_never_hands_out_a_held_uid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let range = IdRange { first: 1_879_100_000, count: 3 };
        let a = IdPool::new(range, dir.path()).expect("pool");
        // A second pool on the same lock directory stands for another host on this machine.
        let b = IdPool::new(range, dir.path()).expect("pool");
        let first = a.acquire().expect("one");
        let second = b.acquire().expect("two");
        let third = a.acquire().expect("three");
        let mut ids = [first.id.uid, second.id.uid, third.id.uid];
        ids.sort();
        assert_eq!(ids, [1_879_100_000, 1_879_100_001, 1_879_100_002]);
        assert!(matches!(b.acquire(), Err(JailError::Exhausted { .. })));
        let freed = second.id.uid;
        drop(second);
        assert_eq!(a.acquire().expect("freed").id.uid, freed);
    }

    #[test]
    fn the_root_holds_qemu_its_libraries_and_firmware_only() {
        let Ok(root) = JailRoot::discover(&[(Arch::Amd64, Path::new("qemu-system-x86_64"))]) else {
            return; // no QEMU on this machine: the e2e tests need it and say so
        };
        assert!(root.binds.contains(&root.qemus[&Arch::Amd64]), "{root:?}");
        assert!(root.binds.iter().any(|p| p.to_string_lossy().contains("libc.so")), "{root:?}");
        assert!(root.binds.iter().any(|p| p.ends_with("share/qemu")), "{root:?}");
        for p in &root.binds {
            let s = p.to_string_lossy();
            assert!(s.starts_with("/usr/") || s.starts_with("/lib"), "{s} is more than QEMU needs");
        }
    }
}
