//! A job's packages, installed into a new layer (`construir.packages=`):
//! the host boots the image with a fresh writable overlay as root, the
//! resolved `.deb`s on a read-only disk, and a small disk for the status.
//! Init installs them offline (apt from those files alone; the VM has no
//! network), records what it installed in `/etc/construir/packages.json`,
//! and writes the status: `ok`, or `install_failed` with apt's words. No
//! job script runs in this VM; the job runs afterwards, booted from the layer.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use jobfile::deps::{Resolution, DISK_DEBS as DEBS, DISK_RESOLUTION as RESOLUTION, LAYER_RECORD as RECORD};
use jobfile::units::rfc3339;
use jobfile::{JobStatus, Outcome};
use nix::mount::{mount, MsFlags};

use crate::runner::{self, KillScope, RunConfig};
use crate::say;

/// Where the package disk is mounted.
pub const MOUNT: &str = "/run/construir/packages";
/// Where the installation's output is kept before it goes into the status disk.
pub const WORK: &str = "/run/construir/install";

/// What a layer's root says was installed into it, if it is a layer.
pub fn installed(root: &Path) -> Option<Resolution> {
    let path = root.join(RECORD.trim_start_matches('/'));
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// The apt invocation that installs exactly `res` from `debs`, offline:
/// apt is given no sources at all (an empty list in `work`), only the files.
pub fn install_script(res: &Resolution, debs: &Path, work: &Path) -> String {
    let mut args: Vec<String> = res.install.iter().map(|p| format!("{}/{}.deb", debs.display(), p.sha256)).collect();
    args.extend(res.remove.iter().map(|name| format!("{name}-")));
    let work = work.display();
    format!(
        "#!/bin/sh\n\
         # Written by construir-init: the job's packages, from the package disk alone.\n\
         set -eu\n\
         export DEBIAN_FRONTEND=noninteractive\n\
         : > {work}/sources.list\n\
         mkdir -p {work}/sources.list.d\n\
         apt-get install --yes --allow-downgrades \\\n  \
         -o Dir::Etc::SourceList={work}/sources.list -o Dir::Etc::SourceParts={work}/sources.list.d \\\n  \
         -o APT::Install-Recommends=false -o Dpkg::Use-Pty=false \\\n  \
         -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \\\n  \
         {}\n\
         apt-get clean\n",
        args.join(" \\\n  ")
    )
}

/// Installs the packages on `device` into the root, and says how it went.
pub fn build_layer(device: &Path, wait: std::time::Duration, kill_scope: KillScope, status: &mut JobStatus) {
    // Times, but no duration: that is the job script's, and it does not run here.
    let started = SystemTime::now();
    status.started_at = Some(rfc3339(started));
    let outcome = (|| -> Result<(), String> {
        // The disk appears like the job disk does: wait for it the same way.
        drop(crate::device::open_job_device(device, wait).map_err(|e| e.to_string())?);
        fs::create_dir_all(MOUNT).map_err(|e| format!("cannot create {MOUNT}: {e}"))?;
        let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(Some(device), MOUNT, Some("ext4"), flags, None::<&str>)
            .map_err(|e| format!("cannot mount the package disk {}: {e}", device.display()))?;
        let raw = fs::read(Path::new(MOUNT).join(RESOLUTION))
            .map_err(|e| format!("the package disk has no {RESOLUTION}: {e}"))?;
        let res: Resolution =
            serde_json::from_slice(&raw).map_err(|e| format!("{RESOLUTION} on the package disk is not valid: {e}"))?;
        // The host checked these; the script is shell, so check again.
        for name in res.install.iter().map(|p| &p.name).chain(&res.remove) {
            jobfile::deps::check_name(name)?;
        }
        for p in &res.install {
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{RESOLUTION}: {} has no sha256", p.name));
            }
            let deb = Path::new(MOUNT).join(DEBS).join(format!("{}.deb", p.sha256));
            if !deb.is_file() {
                return Err(format!("the package disk lacks {} {} ({})", p.name, p.version, deb.display()));
            }
        }
        status.packages = res.install.clone();
        say!("installing {} packages from the package disk, offline", res.install.len());
        fs::create_dir_all(WORK).map_err(|e| format!("cannot create {WORK}: {e}"))?;
        let script = PathBuf::from(WORK).join("install");
        write_executable(&script, &install_script(&res, &Path::new(MOUNT).join(DEBS), Path::new(WORK)))
            .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
        let cfg = RunConfig {
            job_dir: PathBuf::from(WORK),
            script,
            output: PathBuf::from(WORK).join(jobfile::OUTPUT_FILE),
            timeout: None,
            job_name: status.job.clone(),
            kill_scope,
            console_max: 4 << 20,
            env: Vec::new(),
        };
        let o = runner::run_job(&cfg, Box::new(io::stderr())).map_err(|e| format!("cannot run apt-get: {e}"))?;
        status.exit_code = o.exit_code;
        status.output_bytes = Some(o.output_bytes);
        if o.exit_code != Some(0) {
            return Err(format!(
                "apt-get could not install the packages (exit code {}); its words are in the log",
                o.exit_code.map_or("-".to_owned(), |c| c.to_string())
            ));
        }
        let record = Path::new(RECORD);
        fs::create_dir_all(record.parent().expect("RECORD has a parent"))
            .and_then(|()| fs::write(record, &raw))
            .map_err(|e| format!("cannot write {RECORD}: {e}"))?;
        nix::unistd::sync();
        Ok(())
    })();
    let ended = SystemTime::now();
    status.ended_at = Some(rfc3339(ended));
    match outcome {
        Ok(()) => {
            say!("installed {} packages into the layer", status.packages.len());
            status.result = Outcome::Ok;
        }
        Err(e) => {
            say!("{e}");
            status.result = Outcome::InstallFailed;
            status.message = Some(e);
        }
    }
}

fn write_executable(path: &Path, text: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobfile::deps::Pinned;

    #[test]
    fn the_script_installs_exactly_the_resolved_files_and_removes_what_apt_said() {
        let pin = |name: &str, sha: char| Pinned {
            name: name.into(),
            version: "1.0-1".into(),
            architecture: "amd64".into(),
            sha256: sha.to_string().repeat(64),
            size: 1,
            filename: format!("pool/main/x/{name}.deb"),
        };
        let res = Resolution { install: vec![pin("libssl-dev", 'a'), pin("pkgconf", 'b')], remove: vec!["old".into()] };
        let s = install_script(&res, Path::new("/run/construir/packages/debs"), Path::new("/run/w"));
        assert!(s.contains(&format!("/run/construir/packages/debs/{}.deb", "a".repeat(64))), "{s}");
        assert!(s.contains(&format!("/run/construir/packages/debs/{}.deb", "b".repeat(64))), "{s}");
        assert!(s.contains("  old-\n"), "{s}");
        assert!(s.contains("SourceList=/run/w/sources.list ") && s.contains(": > /run/w/sources.list\n"), "{s}");
        // Nothing in it is taken from a name's text but checked names and hex digests.
        assert!(!s.contains("libssl-dev"), "{s}");
    }

    #[test]
    fn a_layer_says_what_was_installed_into_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert_eq!(installed(tmp.path()), None);
        let res = Resolution::default();
        fs::create_dir_all(tmp.path().join("etc/construir")).expect("mkdir");
        fs::write(tmp.path().join("etc/construir/packages.json"), serde_json::to_vec(&res).expect("json")).expect("w");
        assert_eq!(installed(tmp.path()), Some(res));
    }
}
