//! Everything between fork and exec of QEMU: its own session, no core
//! files, bounded open files and file size, umask 077, and when the host is
//! root: no supplementary groups, an unprivileged uid and gid, no new
//! privileges, and death with the host. QEMU's own -runas/-run-with differ
//! between versions, so this is ours.
//!
//! The code that runs in the child must be async-signal-safe: plain
//! syscalls on values prepared before the fork, no allocation.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The unprivileged identity QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Error)]
pub enum JailError {
    #[error("user {user:?} does not exist: create it (useradd --system --no-create-home --shell /usr/sbin/nologin {user}), or name another with --qemu-user")]
    NoSuchUser { user: String },
    #[error("user {user:?} is root (uid 0): QEMU must run as an unprivileged user")]
    RootUser { user: String },
    #[error("cannot read {path}")]
    Passwd { path: String, source: io::Error },
    #[error("QEMU runs as uid {uid} and cannot get through {blocked} to reach {dir}: make it searchable (chmod o+x {blocked}) or choose another --work")]
    Unreachable { uid: u32, dir: PathBuf, blocked: PathBuf },
}

/// Checks that `id` may pass through every directory down to and including
/// `dir` (where QEMU's own per-job directories go).
pub fn check_reachable(dir: &Path, id: Identity) -> Result<(), JailError> {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let mut chain: Vec<&Path> = abs.ancestors().collect();
    chain.reverse();
    for d in chain {
        let Ok(meta) = fs::metadata(d) else { continue };
        let mode = meta.mode();
        let bit = if meta.uid() == id.uid {
            0o100
        } else if meta.gid() == id.gid {
            0o010
        } else {
            0o001
        };
        if mode & bit == 0 {
            return Err(JailError::Unreachable { uid: id.uid, dir: abs.clone(), blocked: d.to_owned() });
        }
    }
    Ok(())
}

/// Looks `user` up in a passwd file (ours, not NSS: the host is a static binary).
pub fn lookup(user: &str, passwd: &Path) -> Result<Identity, JailError> {
    let text = fs::read_to_string(passwd)
        .map_err(|source| JailError::Passwd { path: passwd.display().to_string(), source })?;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == user {
            let (Ok(uid), Ok(gid)) = (fields[2].parse::<u32>(), fields[3].parse::<u32>()) else { continue };
            if uid == 0 {
                return Err(JailError::RootUser { user: user.to_owned() });
            }
            return Ok(Identity { uid, gid });
        }
    }
    Err(JailError::NoSuchUser { user: user.to_owned() })
}

/// Most descriptors `enter` can pass on.
pub const MAX_FDS: usize = 8;

/// Limits set on QEMU before exec.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest file QEMU may write (the job disk, the snapshot overlay).
    pub file_size: u64,
    pub open_files: u64,
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

/// Runs in the forked child, right before exec. `fds` are (open descriptor,
/// number it must have in QEMU): they are moved there without close-on-exec.
///
/// # Safety
/// Only call between fork and exec (from `Command::pre_exec`).
pub unsafe fn enter(
    identity: Option<Identity>,
    limits: Limits,
    fds: &[(i32, i32)],
    cgroup: Option<&std::ffi::CString>,
) -> io::Result<()> {
    // SAFETY (whole function): each call is a plain syscall on values that
    // were prepared before the fork; nothing allocates.
    unsafe {
        check(libc::setsid())?;
        libc::umask(0o077);
        set_limit(libc::RLIMIT_CORE, 0)?;
        set_limit(libc::RLIMIT_NOFILE, limits.open_files)?;
        set_limit(libc::RLIMIT_FSIZE, limits.file_size)?;
        // Two steps, so no source is overwritten before it is moved and a
        // descriptor already at its number still loses close-on-exec:
        // first everything above the targets, then each to its number.
        let mut high = [-1i32; MAX_FDS];
        if fds.len() > MAX_FDS {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        for (slot, &(from, _)) in high.iter_mut().zip(fds) {
            *slot = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 100);
            check(*slot)?;
        }
        for (&moved, &(_, to)) in high.iter().zip(fds) {
            // dup2 leaves the new descriptor without close-on-exec.
            check(libc::dup2(moved, to))?;
        }
        if let Some(procs) = cgroup {
            // While still root: the group's files belong to root.
            crate::cgroup::join(procs)?;
        }
        if let Some(id) = identity {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(id.gid))?;
            check(libc::setuid(id.uid))?;
            if libc::getuid() == 0 || libc::geteuid() == 0 {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // After the uid change, which clears it: QEMU dies with the host thread that started it.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0))?;
        if libc::getppid() == 1 {
            // The host died before the line above took effect.
            libc::_exit(1);
        }
    }
    Ok(())
}

/// Whether this process is root (and so must drop privileges for QEMU).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_users_and_refuses_root_and_strangers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let passwd = dir.path().join("passwd");
        fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\nconstruir:x:998:997::/nonexistent:/usr/sbin/nologin\nbroken:x:zz:1\n",
        )
        .expect("write");
        assert_eq!(lookup("construir", &passwd).expect("found"), Identity { uid: 998, gid: 997 });
        assert!(matches!(lookup("root", &passwd), Err(JailError::RootUser { .. })));
        assert!(matches!(lookup("nobody-here", &passwd), Err(JailError::NoSuchUser { .. })));
        assert!(matches!(lookup("broken", &passwd), Err(JailError::NoSuchUser { .. })));
    }

    #[test]
    fn a_private_directory_on_the_way_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("a/b/work");
        fs::create_dir_all(&work).expect("mkdir");
        for d in [dir.path(), &dir.path().join("a"), &dir.path().join("a/b"), &work] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let stranger = Identity { uid: 54_321, gid: 54_321 };
        assert!(check_reachable(&work, stranger).is_ok());
        fs::set_permissions(dir.path().join("a"), fs::Permissions::from_mode(0o700)).expect("chmod");
        match check_reachable(&work, stranger) {
            Err(JailError::Unreachable { blocked, .. }) => assert_eq!(blocked, dir.path().join("a")),
            other => panic!("{other:?}"),
        }
    }
}
