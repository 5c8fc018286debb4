//! `image-builder debootstrap`: a Debian base image. debootstrap minbase
//! with a kernel and build tools, construir-init as `/usr/sbin/construir-init`,
//! config/guest/ baked in, apt caches and docs dropped, the root as ext4 (via
//! `mkfs.ext4 -d`) in qcow2, and an `image.toml` listing every package with
//! its version. The initramfs is ours, not Debian's: construir-init as
//! `/init` and exactly the modules the root disk needs; init mounts the root
//! and switches to it (no udev, no shell scripts).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jobfile::arch::Arch;
use jobfile::image::{Archive, ImageManifest, Package, DPKG_STATUS};
use jobfile::units::rfc3339;

use std::io::BufWriter;

use crate::initramfs::Cpio;
use crate::kernel::Kernel;
use crate::output::Staging;
use crate::progress::Progress;
use crate::{command, ext4, mini, say, sources};

include!(concat!(env!("OUT_DIR"), "/guest_files.rs"));

/// Modules the initramfs loads for the root disk, besides the job disk's
/// (`mini::modules`); their dependencies, hard and soft, come from the
/// image's own `modules.dep`, `modules.softdep` and `modules.alias`.
pub const ROOT_MODULES: &[&str] = &["ext4"];

/// Where init mounts the root disk before switching to it (`guest-init/src/root.rs`).
const ROOT_MOUNT: &str = "newroot";

/// The root's mount options: the root disk is a discarded snapshot, so
/// nothing is worth an access-time write.
pub const ROOT_FLAGS: &str = "noatime";

/// Packages every Debian image has, besides its architecture's kernel and what `--include` adds.
pub const BASE_PACKAGES: &[&str] = &["build-essential", "bzip2", "xz-utils"];

#[derive(Debug, Clone)]
pub struct DebootstrapOptions {
    pub out: PathBuf,
    /// The image's architecture; another than this machine's needs qemu-user-static registered with binfmt_misc.
    pub arch: Arch,
    pub suite: String,
    pub include: Vec<String>,
    pub mirror: Option<String>,
    pub size: u64,
    pub init: Option<PathBuf>,
    /// Where debootstrap keeps downloaded packages between builds.
    pub cache: Option<PathBuf>,
    pub force: bool,
}

/// Removes the build root on every exit path.
struct RootDir(PathBuf);

impl Drop for RootDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The stages `build` goes through, in order.
const STAGES: &[&str] =
    &["download", "install", "guest files", "initramfs", "packages", "kernel", "mkfs", "qcow2", "manifest"];

pub fn build(opts: &DebootstrapOptions) -> Result<PathBuf> {
    if !nix_is_root() {
        bail!("image-builder debootstrap needs root (debootstrap and chroot do): run it as root or with sudo");
    }
    let init = mini::find_init(opts.init.as_deref(), opts.arch)?;
    if !opts.arch.is_native() {
        check_binfmt(opts.arch, Path::new("/proc/sys/fs/binfmt_misc"))?;
    }
    let mirror =
        match &opts.mirror {
            Some(m) => m.clone(),
            None => sources::mirror_for(&sources::system_sources(Path::new("/etc/apt")), &opts.suite).with_context(
                || format!("no apt source on this machine serves {:?}; give the mirror with --mirror URL", opts.suite),
            )?,
        };
    let packages = packages(opts)?;
    let staging = Staging::new(&opts.out, opts.force)?;
    let root = RootDir(staging.dir.with_extension("rootfs"));
    let _ = fs::remove_dir_all(&root.0);
    let r = &root.0;

    let mut progress = Progress::new(STAGES);
    download(&mut progress, opts, r, &mirror, &packages)?;
    progress.stage("guest files", format!("construir-init and config/guest ({} files)", GUEST_FILES.len()));
    install(
        r,
        "usr/sbin/construir-init",
        &fs::read(&init).with_context(|| format!("cannot read {}", init.display()))?,
        0o755,
    )?;
    for (path, data, mode) in GUEST_FILES {
        install(r, path, data, *mode)?;
    }
    fs::create_dir_all(r.join("job")).context("cannot create /job")?;
    let kernel = initramfs(&mut progress, r, &staging.dir, (&init, opts.arch))?;
    let (installed, architecture) = installed(&mut progress, r, &staging.dir)?;
    if architecture != opts.arch.debian() {
        bail!("debootstrap --arch={} made a root whose dpkg says {architecture:?}", opts.arch);
    }
    let kernel_file = trim(&mut progress, r, &staging.dir, &kernel, opts.arch)?;

    let raw = staging.dir.join("root.raw");
    progress.stage("mkfs", format!("ext4 of {} (mkfs.ext4 -d)", jobfile::units::human_size(opts.size)));
    ext4::make_filesystem(r, &raw, opts.size, "construir-root")?;
    // mkfs has copied the tree: free its room before the qcow2 needs its own.
    drop(root);
    progress.stage("qcow2", "converting the root disk to qcow2");
    ext4::to_qcow2(&raw, &staging.dir.join("root.qcow2"))?;

    progress.stage("manifest", "image.toml with every file's sha256");
    let manifest = ImageManifest {
        kind: "debootstrap".into(),
        arch: opts.arch,
        description: format!("construir Debian {} {} image: minbase + {}", opts.suite, opts.arch, packages.join(", ")),
        builder_version: env!("CARGO_PKG_VERSION").into(),
        created: rfc3339(std::time::SystemTime::now()),
        kernel_version: kernel.version,
        kernel: kernel_file,
        initrd: "initrd.img".into(),
        root_disk: Some("root.qcow2".into()),
        cmdline: format!("root=/dev/vda rootfstype=ext4 rootflags={ROOT_FLAGS}"),
        job_device: "/dev/vdb".into(),
        suite: Some(opts.suite.clone()),
        packages: installed,
        archive: Some(Archive {
            uri: mirror.clone(),
            suite: opts.suite.clone(),
            components: vec!["main".into()],
            architecture,
            dpkg_status: DPKG_STATUS.into(),
        }),
        sha256: Default::default(),
    };
    let out = staging.finish(manifest)?;
    let took = progress.finish();
    say!("image ready at {} in {:.0} s", out.display(), took.as_secs_f64());
    Ok(out)
}

/// The packages debootstrap installs: the base ones and each `--include`d, once.
fn packages(opts: &DebootstrapOptions) -> Result<Vec<String>> {
    let mut packages: Vec<String> = vec![opts.arch.kernel_package().to_owned()];
    packages.extend(BASE_PACKAGES.iter().map(|s| s.to_string()));
    for p in &opts.include {
        if !p.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c)) || p.is_empty() {
            bail!("--include {p:?} is not a Debian package name");
        }
        if !packages.contains(p) {
            packages.push(p.clone());
        }
    }
    Ok(packages)
}

/// debootstrap of minbase and `packages` into `r`, its progress shown.
fn download(
    progress: &mut Progress,
    opts: &DebootstrapOptions,
    r: &Path,
    mirror: &str,
    packages: &[String],
) -> Result<()> {
    progress.stage("download", format!("debootstrap {} (minbase + {}) from {mirror}", opts.suite, packages.join(",")));
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase", "--components=main"]).arg(format!("--include={}", packages.join(",")));
    cmd.arg(format!("--arch={}", opts.arch));
    if let Some(cache) = &opts.cache {
        fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
        cmd.arg(format!("--cache-dir={}", std::path::absolute(cache)?.display()));
    }
    cmd.arg(&opts.suite).arg(r).arg(mirror).env("LC_ALL", "C").env("DEBIAN_FRONTEND", "noninteractive");
    // The kernel package's hook would build Debian's initramfs, which is never
    // booted (ours replaces it, below): minutes under qemu-user for another
    // architecture. INITRD=No is the hook's own switch; with no initramfs
    // made, initramfs-tools' trigger finds none to update.
    cmd.env("INITRD", "No");
    let mut last = Instant::now();
    let mut installing = false;
    command::run(&mut cmd, "debootstrap", Duration::from_secs(60 * 60), |line| {
        // debootstrap downloads every package first, then unpacks and configures them.
        if !installing && (line.starts_with("I: Extracting") || line.starts_with("I: Installing")) {
            installing = true;
            progress.stage("install", "unpacking and configuring the packages");
            last = Instant::now();
        }
        if line.starts_with("E:") || line.starts_with("W:") || line.starts_with("I: Base system installed") {
            progress.note(line);
        } else if line.starts_with("I: ") && last.elapsed() > Duration::from_secs(10) {
            // One line in a while, so a long stage shows it is alive.
            progress.note(line);
            last = Instant::now();
        }
    })?;
    Ok(())
}

/// The initramfs (`initrd.img` in `staging`): construir-init as /init and
/// the modules the root disk needs, of the kernel installed in `r`.
/// Debian's own initramfs is never booted, and is removed.
fn initramfs(progress: &mut Progress, r: &Path, staging: &Path, (init, arch): (&Path, Arch)) -> Result<Kernel> {
    let kernel_version = installed_kernel(r)?;
    progress
        .stage("initramfs", format!("construir-init as /init and the root disk's modules (kernel {kernel_version})"));
    let kernel = Kernel {
        image: r.join(format!("boot/vmlinuz-{kernel_version}")),
        version: kernel_version.clone(),
        modules: r.join(format!("lib/modules/{kernel_version}")),
    };
    let wanted: Vec<&str> = mini::modules(arch).iter().chain(ROOT_MODULES).copied().collect();
    let modules = kernel.resolve_module_groups(&wanted).context("cannot resolve the root disk's modules")?;
    let names = |g: &Vec<PathBuf>| {
        g.iter().map(|m| m.file_name().unwrap_or_default().to_string_lossy()).collect::<Vec<_>>().join(" ")
    };
    progress.note(format_args!("modules: {}", modules.iter().map(names).collect::<Vec<_>>().join(" | ")));
    // The debug session's modules stay on the root: the initramfs is gone by then.
    let debug = kernel
        .resolve_module_groups(jobfile::image::DEBUG_MODULES)
        .context("cannot resolve the debug port's modules")?;
    let list = r.join(jobfile::image::DEBUG_MODULE_LIST.trim_start_matches('/'));
    fs::create_dir_all(list.parent().expect("in /etc/construir"))
        .and_then(|()| fs::write(&list, mini::module_list(&debug, r)))
        .with_context(|| format!("cannot write {}", list.display()))?;
    let initrd = staging.join("initrd.img");
    let file = fs::File::create(&initrd).with_context(|| format!("cannot create {}", initrd.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    mini::write_init(&mut cpio, init, &modules, r).context("cannot write the initramfs")?;
    cpio.dir(ROOT_MOUNT, 0o755).context("cannot write the initramfs")?;
    cpio.finish().context("cannot write the initramfs")?;
    for entry in fs::read_dir(r.join("boot")).context("the image has no /boot")?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("initrd.img") {
            fs::remove_file(entry.path()).with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(kernel)
}

/// What is installed in `r` and its architecture; dpkg's state is copied
/// into `staging`: what a job's packages are resolved against, with the archive.
fn installed(progress: &mut Progress, r: &Path, staging: &Path) -> Result<(Vec<Package>, String)> {
    progress.stage("packages", "listing what is installed");
    let listing = command::run(
        Command::new("chroot").arg(r).args(["dpkg-query", "-W", "-f", "${Package}\\t${Version}\\n"]),
        "dpkg-query",
        Duration::from_secs(120),
        |_| {},
    )?;
    let mut installed: Vec<Package> = listing
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(name, version)| Package { name: name.to_owned(), version: version.to_owned() })
        .collect();
    installed.sort_by(|a, b| a.name.cmp(&b.name));
    fs::copy(r.join("var/lib/dpkg/status"), staging.join(DPKG_STATUS)).context("cannot copy /var/lib/dpkg/status")?;
    let architecture = command::run(
        Command::new("chroot").arg(r).args(["dpkg", "--print-architecture"]),
        "dpkg --print-architecture",
        Duration::from_secs(60),
        |_| {},
    )?
    .trim()
    .to_owned();
    Ok((installed, architecture))
}

/// Exports the kernel into `staging` (its file's name returned) and drops
/// apt's lists, caches and docs from `r`, keeping what apt needs to run in a job.
fn trim(progress: &mut Progress, r: &Path, staging: &Path, kernel: &Kernel, arch: Arch) -> Result<String> {
    progress.stage("kernel", "exporting the kernel, dropping apt lists, caches and docs");
    let (kernel_file, pvh) =
        crate::kernel::install_kernel(&kernel.image, staging, arch).context("cannot copy the kernel")?;
    progress.note(format_args!(
        "kernel file {kernel_file}{}",
        if pvh { " (uncompressed, booted through its PVH entry)" } else { "" }
    ));
    for dir in [
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/cache/debconf",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "var/log",
        "tmp",
    ] {
        empty_dir(&r.join(dir)).with_context(|| format!("cannot clean /{dir}"))?;
    }
    fs::create_dir_all(r.join("var/lib/apt/lists/partial"))?;
    fs::create_dir_all(r.join("var/cache/apt/archives/partial"))?;
    fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    Ok(kernel_file.into())
}

fn install(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let _ = fs::remove_file(&path);
    fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(())
}

/// The one kernel debootstrap installed (`/boot/vmlinuz-<version>`).
fn installed_kernel(root: &Path) -> Result<String> {
    let mut versions: Vec<String> = fs::read_dir(root.join("boot"))
        .context("the image has no /boot")?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(str::to_owned))
        .collect();
    versions.sort();
    versions.pop().context("no kernel in the image's /boot (is the architecture's linux-image installed?)")
}

/// That the kernel runs `arch`'s programs for this machine: debootstrap
/// configures the packages in a chroot, which needs qemu-user-static
/// registered with binfmt_misc, with the F flag (the emulator opened at
/// registration, so it works inside the chroot).
pub fn check_binfmt(arch: Arch, binfmt_misc: &Path) -> Result<()> {
    let entry = binfmt_misc.join(format!("qemu-{}", arch.machine()));
    let text = fs::read_to_string(&entry).unwrap_or_default();
    let enabled = text.lines().next() == Some("enabled");
    let fixed = text.lines().any(|l| l.strip_prefix("flags: ").is_some_and(|f| f.contains('F')));
    if !enabled || !fixed {
        bail!(
            "this machine cannot run {arch} programs for debootstrap's chroot: {} is {}. \
             Install qemu-user-static and register it: mount -t binfmt_misc binfmt_misc {} (if not mounted), \
             then cat /usr/lib/binfmt.d/qemu-{}.conf > {}/register (scripts/lib.sh ensure_binfmt does this)",
            entry.display(),
            if text.is_empty() {
                "missing"
            } else if !enabled {
                "disabled"
            } else {
                "registered without the F flag"
            },
            binfmt_misc.display(),
            arch.machine(),
            binfmt_misc.display()
        );
    }
    Ok(())
}

fn empty_dir(dir: &Path) -> std::io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let p = e?.path();
                if p.symlink_metadata()?.is_dir() {
                    fs::remove_dir_all(&p)?;
                } else {
                    fs::remove_file(&p)?;
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_architecture_needs_its_emulator_registered_with_the_f_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entry = dir.path().join("qemu-aarch64");
        let why = |dir: &Path| check_binfmt(Arch::Arm64, dir).expect_err("refused").to_string();
        assert!(why(dir.path()).contains("qemu-aarch64 is missing"), "{}", why(dir.path()));
        fs::write(&entry, "disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\n").expect("w");
        assert!(why(dir.path()).contains("is disabled"));
        fs::write(&entry, "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: P\n").expect("w");
        let no_f = why(dir.path());
        assert!(no_f.contains("without the F flag") && no_f.contains("qemu-aarch64.conf"), "{no_f}");
        fs::write(&entry, "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\n").expect("w");
        check_binfmt(Arch::Arm64, dir.path()).expect("registered as Debian's package does");
    }
}
