//! `construir-host doctor`: every requirement of `run`, checked one line
//! each, with the fix when it fails. Nothing is changed: doctor only reads
//! (the KVM probe, when it runs, is a jailed QEMU like any other and leaves
//! only its cached answer in `work/`).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use jobfile::arch::Arch;

use crate::image;
use crate::jail::{self, IdRange};
use crate::queue::Dirs;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Works, but not as well as it could (TCG, no cgroups).
    Warn,
    /// `run` cannot work as configured.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub level: Level,
    pub what: &'static str,
    pub detail: String,
    /// What to do about it (for warnings and failures).
    pub fix: Option<String>,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag}  {:<10} {}", self.what, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      {:<10} fix: {fix}", "")?;
        }
        Ok(())
    }
}

fn ok(what: &'static str, detail: impl Into<String>) -> Check {
    Check { level: Level::Ok, what, detail: detail.into(), fix: None }
}

fn warn(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { level: Level::Warn, what, detail: detail.into(), fix: Some(fix.into()) }
}

fn fail(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { level: Level::Fail, what, detail: detail.into(), fix: Some(fix.into()) }
}

/// What `run` would use, as configured.
#[derive(Debug, Clone)]
pub struct Setup {
    pub qemu: PathBuf,
    pub dirs: Dirs,
    pub workers: u32,
    pub vm_ids: IdRange,
    pub vm_id_locks: PathBuf,
    /// Where `/etc/passwd` and `/etc/group` are (parameters for tests).
    pub passwd: PathBuf,
    pub group: PathBuf,
    pub cgroup_root: PathBuf,
    /// This process's cgroup (`/` outside systemd).
    pub cgroup_own: String,
    /// Below this much free space in work/ or done/, a failure; below ten times it, a warning.
    pub min_free: u64,
}

/// QEMU present and new enough.
pub fn qemu(setup: &Setup) -> Check {
    match crate::qemu::version(&setup.qemu) {
        Ok((major, minor)) if (major, minor) >= (7, 2) => {
            ok("qemu", format!("{} is QEMU {major}.{minor}", setup.qemu.display()))
        }
        Ok((major, minor)) => fail(
            "qemu",
            format!("{} is QEMU {major}.{minor}; construir needs 7.2 or newer", setup.qemu.display()),
            "install a newer QEMU (Debian 12: apt-get install qemu-system-x86 qemu-utils), or point --qemu at one",
        ),
        Err(e) => fail(
            "qemu",
            format!("cannot run {}: {}", setup.qemu.display(), jobfile::error_chain(&e)),
            "apt-get install qemu-system-x86 qemu-utils (both in one command), or set --qemu",
        ),
    }
}

/// Another architecture's QEMU (`arch`, given as `qemu`): needed once an
/// image of that architecture is installed; until then its absence is only noted.
pub fn foreign_qemu(setup: &Setup, arch: Arch, qemu: &Path) -> Check {
    let what = arch.debian();
    let images: Vec<String> = image::scan(&setup.dirs.images)
        .map(|found| {
            found
                .into_iter()
                .filter_map(|(n, _, img)| img.ok().filter(|i| i.manifest.arch == arch).map(|_| format!("i{n}")))
                .collect()
        })
        .unwrap_or_default();
    let using = if images.is_empty() { format!("no {arch} image installed") } else { images.join(", ") };
    match crate::emulators::probe(arch, qemu) {
        Ok((major, minor)) => {
            ok(what, format!("{} is QEMU {major}.{minor}: {arch} guests run under TCG ({using})", qemu.display()))
        }
        Err(e) if images.is_empty() => ok(what, format!("{using}; {arch} guests would need: {e}")),
        Err(e) => fail(
            what,
            format!("{using} cannot run: {e}"),
            format!("apt-get install {}, or set --qemu{}", arch.qemu_package(), crate::emulators::flag_suffix(arch)),
        ),
    }
}

/// The VM uid range: free of accounts, large enough, its lock directory usable.
pub fn vm_ids(setup: &Setup, root: bool) -> Check {
    if !root {
        return warn(
            "vm uids",
            "not running as root: every VM runs as this user, without its own uid, namespaces or minimal root",
            "run construir-host as root (it drops everything for QEMU); see SECURITY.md",
        );
    }
    let r = setup.vm_ids;
    if let Err(e) = jail::check_range(r, &setup.passwd, &setup.group) {
        return fail("vm uids", e.to_string(), "choose a free range with --vm-ids FIRST:COUNT (vm-ids in host.toml)");
    }
    if setup.workers > r.count {
        return fail(
            "vm uids",
            format!("--workers {} needs as many uids; {} has {}", setup.workers, r, r.count),
            "raise COUNT in --vm-ids, or lower --workers",
        );
    }
    let locks = &setup.vm_id_locks;
    let usable = locks.is_dir() && writable(locks)
        || !locks.exists() && locks.ancestors().skip(1).find(|p| p.exists()).is_some_and(writable);
    if !usable {
        return fail(
            "vm uids",
            format!("cannot create or write {}", locks.display()),
            "make it a directory root can write, or set --vm-id-locks",
        );
    }
    ok(
        "vm uids",
        format!(
            "{}-{} free of accounts and groups ({} for {} worker(s)); locks in {}",
            r.first,
            r.last(),
            r.count,
            setup.workers,
            locks.display()
        ),
    )
}

/// The directories: the queue exists, the others exist or can be made, all writable.
pub fn directories(setup: &Setup) -> Check {
    let d = &setup.dirs;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let running_parent = d.running.clone();
    let mut problems = Vec::new();
    if !d.queue.is_dir() {
        problems.push(format!("the queue {} does not exist", d.queue.display()));
    }
    for dir in [&d.queue, &running_parent, &d.done, &d.failed, &d.work] {
        let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if !existing.is_dir() || !writable(existing) {
            problems.push(format!("{} is not writable", existing.display()));
        }
    }
    if !d.images.is_dir() {
        problems.push(format!("the images directory {} does not exist", d.images.display()));
    }
    problems.dedup();
    if problems.is_empty() {
        ok(
            "dirs",
            format!(
                "queue {}, done {}, failed {}, running {}, work {}",
                abs(&d.queue).display(),
                d.done.display(),
                d.failed.display(),
                running_parent.display(),
                d.work.display()
            ),
        )
    } else {
        fail(
            "dirs",
            problems.join("; "),
            "create them (mkdir -p) as the user construir-host runs as, or set them in host.toml",
        )
    }
}

/// Every image in images/: its manifest loads and its files match their checksums.
pub fn images(setup: &Setup) -> Vec<Check> {
    let found = match image::scan(&setup.dirs.images) {
        Ok(found) => found,
        Err(e) => {
            return vec![fail(
                "images",
                format!("cannot read {}: {e}", setup.dirs.images.display()),
                "create it, then image-builder mini --out IMAGES/i0",
            )]
        }
    };
    if found.is_empty() {
        return vec![fail(
            "images",
            format!("no image in {}: every job would be refused", setup.dirs.images.display()),
            format!("image-builder mini --out {}/i0 (or image-builder debootstrap)", setup.dirs.images.display()),
        )];
    }
    found
        .into_iter()
        .map(|(number, dir, img)| {
            let checked = img
                .map_err(|e| jobfile::error_chain(&e))
                .and_then(|img| img.manifest.verify_files(&dir).map_err(|e| jobfile::error_chain(&e)).map(|()| img));
            match checked {
                Ok(img) => {
                    let m = &img.manifest;
                    let kind = match &m.suite {
                        Some(suite) => format!("{} {suite}", m.kind),
                        None => m.kind.clone(),
                    };
                    let size = jobfile::units::human_size(img.disk_usage());
                    ok("image", format!("i{number}: {kind}, kernel {}, {size}, checksums match", m.kernel_version))
                }
                Err(e) => fail(
                    "image",
                    format!("i{number}: {e}"),
                    format!(
                        "rebuild it with image-builder into {} (jobs for i{number} fail until then)",
                        dir.display()
                    ),
                ),
            }
        })
        .collect()
}

/// Free space where working copies and results go.
pub fn free_space(setup: &Setup) -> Vec<Check> {
    let mut out = Vec::new();
    for (what, dir) in [("work", &setup.dirs.work), ("done", &setup.dirs.done)] {
        let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        let Some(free) = free_bytes(existing) else {
            out.push(warn(
                "space",
                format!("cannot tell the free space of {}", existing.display()),
                "check it with df",
            ));
            continue;
        };
        let detail = format!("{what}: {} free on {}", jobfile::units::human_size(free), existing.display());
        out.push(if free < setup.min_free {
            fail(
                "space",
                detail,
                "free space there, or move it (work/ holds each job's copy and a Debian VM's overlay)",
            )
        } else if free < setup.min_free.saturating_mul(10) {
            warn("space", detail, "jobs and results may fill it: free space, or watch it")
        } else {
            ok("space", detail)
        });
    }
    out
}

/// cgroup v2 with the controllers each VM needs, and whether this host may write there.
pub fn cgroups(setup: &Setup, root: bool) -> Check {
    let base = &setup.cgroup_root;
    let Ok(controllers) = fs::read_to_string(base.join("cgroup.controllers")) else {
        return warn(
            "cgroups",
            format!(
                "{} is not a cgroup v2 hierarchy (cgroup v1 or hybrid): VMs run without cgroup limits",
                base.display()
            ),
            "boot with systemd.unified_cgroup_hierarchy=1; guest memory, CPUs, rlimits and timeouts still hold",
        );
    };
    let have: Vec<&str> = controllers.split_whitespace().collect();
    let missing: Vec<&str> = ["memory", "pids", "cpu"].into_iter().filter(|c| !have.contains(c)).collect();
    if !missing.is_empty() {
        return warn(
            "cgroups",
            format!("controllers missing in {}: {}", base.display(), missing.join(", ")),
            "under systemd, set Delegate=yes in the unit (config/host/construir-host.service does)",
        );
    }
    let own = setup.cgroup_own.trim_matches('/');
    let parent = if own.is_empty() { base.clone() } else { base.join(own) };
    if !own.is_empty() {
        let delegated = fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
        let missing: Vec<&str> =
            ["memory", "pids", "cpu"].into_iter().filter(|c| !delegated.split_whitespace().any(|h| h == *c)).collect();
        if !missing.is_empty() {
            return warn(
                "cgroups",
                format!(
                    "{} has no {} for its children: VMs run without cgroup limits",
                    parent.display(),
                    missing.join(", ")
                ),
                "under systemd, set Delegate=yes in the unit (config/host/construir-host.service does)",
            );
        }
    }
    if !root || !writable(&parent) {
        return warn(
            "cgroups",
            format!("{} is not writable here: VMs run without cgroup limits", parent.display()),
            "run as root, under systemd with Delegate=yes",
        );
    }
    ok("cgroups", format!("cgroup v2 with memory, pids and cpu; VM groups under {}", parent.display()))
}

/// The key the host signs each result's provenance with: its public half,
/// or what keeps `run` from having one (doctor makes none).
pub fn host_key(path: &Path) -> Check {
    match construir_provenance::HostKey::load(path) {
        Ok(key) => ok("host key", format!("{} ({})", key.public(), path.display())),
        Err(construir_provenance::KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            ok(
                "host key",
                format!("none yet at {}: `run` makes it at first start (construir-host key prints it)", path.display()),
            )
        }
        Err(e) => fail(
            "host key",
            e.to_string(),
            "fix or remove the file; `run` makes a new one (its results are then signed by a new key)",
        ),
    }
}

/// Landlock, as a layer of the jail.
pub fn landlock() -> Check {
    match jail::landlock_abi() {
        0 => warn(
            "landlock",
            "this kernel has no Landlock: QEMU's minimal root still holds without it",
            "a kernel with CONFIG_SECURITY_LANDLOCK and lsm=landlock adds a layer",
        ),
        abi => ok("landlock", format!("ABI {abi}")),
    }
}

fn writable(path: &Path) -> bool {
    use nix::unistd::AccessFlags;
    nix::unistd::access(path, AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
}

fn free_bytes(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(root: &Path) -> Setup {
        let dirs = Dirs::of(jobfile::layout::Beside::queue(&root.join("queue")), "h", root.join("work"));
        Setup {
            qemu: PathBuf::from("/nonexistent/qemu"),
            dirs,
            workers: 2,
            vm_ids: IdRange::DEFAULT,
            vm_id_locks: root.join("locks"),
            passwd: root.join("passwd"),
            group: root.join("group"),
            cgroup_root: root.join("cgroup"),
            cgroup_own: "/".into(),
            min_free: 1 << 30,
        }
    }

    #[test]
    fn each_check_names_what_is_wrong_and_the_fix() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = setup(tmp.path());
        let q = qemu(&s);
        assert_eq!(q.level, Level::Fail);
        assert!(
            q.detail.contains("cannot run /nonexistent/qemu")
                && q.fix.as_deref().is_some_and(|f| f.contains("apt-get install")),
            "{q}"
        );

        let d = directories(&s);
        assert_eq!(d.level, Level::Fail);
        assert!(d.detail.contains("the queue") && d.detail.contains("does not exist"), "{d}");
        fs::create_dir_all(&s.dirs.queue).expect("mkdir");
        fs::create_dir_all(&s.dirs.images).expect("mkdir");
        assert_eq!(directories(&s).level, Level::Ok, "the others can be created");

        let i = images(&s);
        assert_eq!(i[0].level, Level::Fail);
        assert!(i[0].detail.contains("no image in"), "{}", i[0]);
        fs::create_dir_all(s.dirs.images.join("i3")).expect("mkdir");
        let i = images(&s);
        assert!(i[0].level == Level::Fail && i[0].detail.starts_with("i3: cannot read"), "{}", i[0]);

        fs::write(&s.passwd, "root:x:0:0::/root:/bin/sh\nsquatter:x:1879048200:100::/:/bin/sh\n").expect("write");
        fs::write(&s.group, "root:x:0:\n").expect("write");
        let v = vm_ids(&s, true);
        assert!(v.level == Level::Fail && v.detail.contains("squatter"), "{v}");
        fs::write(&s.passwd, "root:x:0:0::/root:/bin/sh\n").expect("write");
        assert_eq!(vm_ids(&s, true).level, Level::Ok, "{}", vm_ids(&s, true));
        assert_eq!(vm_ids(&Setup { workers: 300, ..s.clone() }, true).level, Level::Fail);
        assert_eq!(vm_ids(&s, false).level, Level::Warn);

        let c = cgroups(&s, true);
        assert!(c.level == Level::Warn && c.detail.contains("not a cgroup v2 hierarchy"), "{c}");
        fs::create_dir_all(&s.cgroup_root).expect("mkdir");
        fs::write(s.cgroup_root.join("cgroup.controllers"), "cpu io pids\n").expect("write");
        let c = cgroups(&s, true);
        assert!(c.level == Level::Warn && c.detail.contains("memory"), "{c}");
        fs::write(s.cgroup_root.join("cgroup.controllers"), "cpuset cpu io memory pids\n").expect("write");
        assert_eq!(cgroups(&s, true).level, Level::Ok);
        let service = Setup { cgroup_own: "/system.slice/c.service".into(), ..s.clone() };
        fs::create_dir_all(s.cgroup_root.join("system.slice/c.service")).expect("mkdir");
        let c = cgroups(&service, true);
        assert!(c.level == Level::Warn && c.fix.as_deref().is_some_and(|f| f.contains("Delegate=yes")), "{c}");
        fs::write(s.cgroup_root.join("system.slice/c.service/cgroup.controllers"), "cpu memory pids\n").expect("write");
        assert_eq!(cgroups(&service, true).level, Level::Ok, "{}", cgroups(&service, true));

        let space = free_space(&Setup { min_free: u64::MAX, ..s.clone() });
        assert!(space.iter().all(|c| c.level == Level::Fail && c.detail.contains("free on")), "{space:?}");
        assert!(free_space(&Setup { min_free: 1, ..s }).iter().all(|c| c.level == Level::Ok));
    }
}
