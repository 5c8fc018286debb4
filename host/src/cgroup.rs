//! One cgroup v2 group per VM, where the unified hierarchy is writable:
//! memory, pids and CPU limits, and the whole group killed at the end.
//! On hosts without it (cgroup v1 or hybrid, read-only) VMs run without, and
//! the host says so at start.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Controllers each VM's group needs.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// `<base>/construir`, with the controllers enabled for its children.
#[derive(Debug, Clone)]
pub struct Parent {
    path: PathBuf,
}

/// Finds a writable cgroup v2 hierarchy mounted at `mount` (normally
/// `/sys/fs/cgroup`) with the memory, pids and cpu controllers, and prepares
/// the parent of the VMs' groups there. `own` is this process's cgroup
/// (`0::<path>` in `/proc/self/cgroup`):
/// - the root (`/`, a host started outside systemd): the parent is
///   `<mount>/construir`;
/// - anything else (a systemd service with `Delegate=yes`): the service's
///   own cgroup is the parent. cgroup v2 lets a group with processes of its
///   own hand no controller to its children, so the host first moves itself
///   into the leaf `<own>/host`, then enables the controllers in `<own>`.
pub fn detect(mount: &Path, own: &str) -> Result<Parent, String> {
    let controllers = fs::read_to_string(mount.join("cgroup.controllers"))
        .map_err(|_| format!("{} is not a cgroup v2 hierarchy", mount.display()))?;
    let have: Vec<&str> = controllers.split_whitespace().collect();
    if let Some(missing) = CONTROLLERS.iter().find(|c| !have.contains(c)) {
        return Err(format!("the {missing} controller is not available in {}", mount.display()));
    }
    let enable = CONTROLLERS.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    let own = own.trim_matches('/');
    let (path, setup) = if own.is_empty() {
        let path = mount.join("construir");
        let setup = setup_root(mount, &path, &enable);
        (path, setup)
    } else {
        let path = mount.join(own);
        let setup = setup_delegated(&path, &enable);
        (path, setup)
    };
    setup.map_err(|e| format!("cannot set up {}: {e}", path.display()))?;
    Ok(Parent { path })
}

fn mkdir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// In the root group (exempt from the no-processes rule): `<mount>/construir`.
fn setup_root(mount: &Path, path: &Path, enable: &str) -> io::Result<()> {
    fs::write(mount.join("cgroup.subtree_control"), enable)?;
    mkdir(path)?;
    fs::write(path.join("cgroup.subtree_control"), enable)
}

/// In a delegated group: this process into the leaf `host`, then the controllers on.
fn setup_delegated(path: &Path, enable: &str) -> io::Result<()> {
    let own_controllers = fs::read_to_string(path.join("cgroup.controllers"))?;
    if let Some(missing) = CONTROLLERS.iter().find(|c| !own_controllers.split_whitespace().any(|h| h == **c)) {
        return Err(io::Error::other(format!(
            "the {missing} controller is not delegated to it (Delegate=yes in the unit)"
        )));
    }
    mkdir(&path.join("host"))?;
    fs::write(path.join("host/cgroup.procs"), std::process::id().to_string())?;
    fs::write(path.join("cgroup.subtree_control"), enable)
}

/// This process's cgroup v2 path, from `/proc/self/cgroup` (`0::<path>`).
pub fn own_cgroup(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// One VM's group; killed and removed on drop.
#[derive(Debug)]
pub struct Group {
    path: PathBuf,
    /// `<group>/cgroup.procs`, ready for the child to write itself into before exec.
    pub procs: CString,
}

impl Parent {
    /// Creates the group `name` with its limits.
    pub fn create(&self, name: &str, memory_bytes: u64, max_pids: u64, cpus: u32) -> io::Result<Group> {
        let path = self.path.join(name);
        let _ = fs::remove_dir(&path); // a stale group from a crash
        fs::create_dir(&path)?;
        let group = Group { procs: CString::new(path.join("cgroup.procs").as_os_str().as_bytes())?, path };
        fs::write(group.path.join("memory.max"), memory_bytes.to_string())?;
        // No swap: memory.max is the limit.
        if group.path.join("memory.swap.max").exists() {
            fs::write(group.path.join("memory.swap.max"), "0")?;
        }
        fs::write(group.path.join("pids.max"), max_pids.to_string())?;
        fs::write(group.path.join("cpu.max"), format!("{} 100000", u64::from(cpus) * 100_000))?;
        Ok(group)
    }
}

impl Group {
    /// Kills every process in the group.
    pub fn kill(&self) {
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            // Kernels before 5.14 have no cgroup.kill.
            for pid in fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default().split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // Gone already is as good as killed.
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
        // The group can be removed once its processes are gone, which takes a moment after the kill.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Joins the calling process to a group. Runs between fork and exec, so
/// only raw syscalls on a path prepared before the fork.
///
/// # Safety
/// Only call between fork and exec.
pub unsafe fn join(procs: &CString) -> io::Result<()> {
    // SAFETY: open/write/close with a NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if written != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_writes_limits_in_a_cgroup_v2_tree() {
        let base = tempfile::tempdir().expect("tempdir");
        assert!(detect(base.path(), "/").is_err(), "no cgroup.controllers: not v2");
        fs::write(base.path().join("cgroup.controllers"), "cpuset cpu io memory pids\n").expect("write");
        let parent = detect(base.path(), "/").expect("detect");
        assert_eq!(fs::read_to_string(base.path().join("cgroup.subtree_control")).expect("read"), "+memory +pids +cpu");
        assert_eq!(
            fs::read_to_string(base.path().join("construir/cgroup.subtree_control")).expect("read"),
            "+memory +pids +cpu"
        );
        let group = parent.create("host.job_i0.tar.xz", 3 << 30, 1024, 2).expect("create");
        let dir = base.path().join("construir/host.job_i0.tar.xz");
        assert_eq!(fs::read_to_string(dir.join("memory.max")).expect("read"), (3u64 << 30).to_string());
        assert_eq!(fs::read_to_string(dir.join("pids.max")).expect("read"), "1024");
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).expect("read"), "200000 100000");
        assert_eq!(group.procs.to_str().expect("utf8"), dir.join("cgroup.procs").to_str().expect("utf8"));
        group.kill();
        assert_eq!(fs::read_to_string(dir.join("cgroup.kill")).expect("read"), "1");

        fs::write(base.path().join("cgroup.controllers"), "cpu io\n").expect("write");
        assert!(detect(base.path(), "/").expect_err("no memory controller").contains("memory"));
    }

    #[test]
    fn under_a_delegated_service_the_host_moves_to_a_leaf_and_vms_go_beside_it() {
        let mount = tempfile::tempdir().expect("tempdir");
        let own = "/system.slice/construir-host.service";
        assert_eq!(own_cgroup("1:name=systemd:/x\n0::/system.slice/construir-host.service\n").as_deref(), Some(own));
        let service = mount.path().join("system.slice/construir-host.service");
        fs::create_dir_all(&service).expect("mkdir");
        fs::write(mount.path().join("cgroup.controllers"), "cpuset cpu io memory pids\n").expect("write");
        fs::write(service.join("cgroup.controllers"), "cpu pids\n").expect("write");
        let e = detect(mount.path(), own).expect_err("memory not delegated");
        assert!(e.contains("memory controller is not delegated"), "{e}");
        fs::write(service.join("cgroup.controllers"), "cpu io memory pids\n").expect("write");
        let parent = detect(mount.path(), own).expect("detect");
        assert_eq!(
            fs::read_to_string(service.join("host/cgroup.procs")).expect("read"),
            std::process::id().to_string()
        );
        assert_eq!(fs::read_to_string(service.join("cgroup.subtree_control")).expect("read"), "+memory +pids +cpu");
        assert!(
            !mount.path().join("cgroup.subtree_control").exists(),
            "nothing outside the delegated group is written"
        );
        parent.create("h.job_i0.tar.xz", 1 << 30, 64, 1).expect("create");
        assert!(service.join("h.job_i0.tar.xz/memory.max").exists());
    }
}
