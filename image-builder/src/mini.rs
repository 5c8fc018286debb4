//! `image-builder mini`: the build machine's kernel and an initramfs holding
//! construir-init as `/init`, the virtio modules, and static busybox. No root
//! disk: `/job` lives in RAM. Boots in seconds; for tests and quick jobs.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use jobfile::image::{ImageManifest, MODULE_LIST};
use jobfile::units::rfc3339;

use crate::initramfs::Cpio;
use crate::kernel::Kernel;
use crate::output::{is_static_elf, Staging};
use crate::say;

/// Modules the guest needs to see its job disk (q35, virtio-blk over PCI);
/// pvpanic-pci tells QEMU when the guest kernel panics.
pub const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "pvpanic_pci"];

#[derive(Debug, Clone)]
pub struct MiniOptions {
    pub out: PathBuf,
    pub kernel: Option<PathBuf>,
    pub init: Option<PathBuf>,
    pub busybox: PathBuf,
    pub force: bool,
}

pub fn build(opts: &MiniOptions) -> Result<PathBuf> {
    let kernel = Kernel::find(opts.kernel.as_deref(), Path::new("/boot"), Path::new("/lib/modules"))?;
    say!("kernel {} ({})", kernel.version, kernel.image.display());
    let init = find_init(opts.init.as_deref())?;
    say!("init {}", init.display());
    check_static(&opts.busybox, "busybox (install busybox-static)")?;
    let modules = kernel.resolve_module_groups(MODULES)?;
    let debug_modules = kernel.resolve_module_groups(jobfile::image::DEBUG_MODULES)?;
    say!(
        "modules: {}",
        modules
            .iter()
            .flatten()
            .map(|m| m.file_name().unwrap_or_default().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );

    let staging = Staging::new(&opts.out, opts.force)?;
    let (kernel_file, pvh) = crate::kernel::install_kernel(&kernel.image, &staging.dir)
        .with_context(|| format!("cannot copy {}", kernel.image.display()))?;
    say!("kernel file {kernel_file}{}", if pvh { " (uncompressed, booted through its PVH entry)" } else { "" });
    let initrd = staging.dir.join("initrd.img");
    let file = fs::File::create(&initrd).with_context(|| format!("cannot create {}", initrd.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    write_root(&mut cpio, &init, &opts.busybox, &modules).context("cannot write the initramfs")?;
    write_debug_modules(&mut cpio, &modules, &debug_modules).context("cannot write the initramfs")?;
    cpio.finish().context("cannot write the initramfs")?;
    say!("initramfs {} bytes", fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0));

    let manifest = ImageManifest {
        kind: "mini".into(),
        description: "construir mini image: host kernel, construir-init as /init, static busybox; /job in RAM".into(),
        builder_version: env!("CARGO_PKG_VERSION").into(),
        created: rfc3339(std::time::SystemTime::now()),
        kernel_version: kernel.version.clone(),
        kernel: kernel_file.into(),
        initrd: "initrd.img".into(),
        root_disk: None,
        cmdline: "rdinit=/init".into(),
        job_device: "/dev/vda".into(),
        suite: None,
        packages: Vec::new(),
        archive: None,
        sha256: Default::default(),
    };
    let out = staging.finish(manifest)?;
    say!("image ready at {}", out.display());
    Ok(out)
}

fn write_root<W: std::io::Write>(
    cpio: &mut Cpio<W>,
    init: &Path,
    busybox: &Path,
    modules: &[Vec<PathBuf>],
) -> std::io::Result<()> {
    for dir in ["job", "root", "etc/construir", "bin", "sbin", "usr/bin", "usr/sbin"] {
        cpio.dir(dir, 0o755)?;
    }
    write_init(cpio, init, modules, Path::new("/"))?;
    cpio.copy("bin/busybox", 0o755, busybox)?;
    for applet in busybox_applets(busybox)? {
        if applet != "bin/busybox" && applet != "init" && applet != "linuxrc" {
            cpio.symlink(&applet, "/bin/busybox")?;
        }
    }
    cpio.file("etc/hostname", 0o644, b"construir\n")?;
    cpio.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    cpio.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// What every initramfs of ours holds: the mount points, the two device
/// nodes the kernel needs before devtmpfs, construir-init as `/init`, and the
/// modules (files under `modules_root`, e.g. a Debian root being built) with
/// the list init loads them from: groups in load order, separated by blank
/// lines, which init loads side by side.
pub fn write_init<W: std::io::Write>(
    cpio: &mut Cpio<W>,
    init: &Path,
    modules: &[Vec<PathBuf>],
    modules_root: &Path,
) -> std::io::Result<()> {
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        cpio.dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    // The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.char_device("dev/null", 0o666, 1, 3)?;
    cpio.copy("init", 0o755, init)?;
    for module in modules.iter().flatten() {
        let inside = module.strip_prefix(modules_root).unwrap_or(module);
        let rel = inside.strip_prefix("/").unwrap_or(inside).to_string_lossy().into_owned();
        cpio.copy(&rel, 0o644, module)?;
    }
    cpio.file(MODULE_LIST, 0o644, module_list(modules, modules_root).as_bytes())
}

/// The modules a debug session needs (`jobfile::image::DEBUG_MODULE_LIST`),
/// those not already in `modules` copied in, and their list.
fn write_debug_modules<W: std::io::Write>(
    cpio: &mut Cpio<W>,
    modules: &[Vec<PathBuf>],
    debug: &[Vec<PathBuf>],
) -> std::io::Result<()> {
    for module in debug.iter().flatten().filter(|m| !modules.iter().flatten().any(|have| have == *m)) {
        let rel = module.strip_prefix("/").unwrap_or(module).to_string_lossy().into_owned();
        cpio.copy(&rel, 0o644, module)?;
    }
    cpio.file(jobfile::image::DEBUG_MODULE_LIST, 0o644, module_list(debug, Path::new("/")).as_bytes())
}

/// A module list as init reads it: groups in load order, separated by
/// blank lines, each module by its path inside the guest.
pub fn module_list(groups: &[Vec<PathBuf>], modules_root: &Path) -> String {
    let mut list = String::new();
    for group in groups {
        if !list.is_empty() {
            list.push('\n');
        }
        for module in group {
            let inside = module.strip_prefix(modules_root).unwrap_or(module);
            list.push('/');
            list.push_str(&inside.strip_prefix("/").unwrap_or(inside).to_string_lossy());
            list.push('\n');
        }
    }
    list
}

fn busybox_applets(busybox: &Path) -> std::io::Result<Vec<String>> {
    let out = Command::new(busybox).arg("--list-full").output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("{} --list-full failed", busybox.display())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
}

/// `--init`, else construir-init beside this program (a normal cargo build puts them together).
pub fn find_init(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => {
            let me = std::env::current_exe().context("cannot find this program's own path")?;
            let beside = me.with_file_name("construir-init");
            if !beside.exists() {
                bail!(
                    "cannot find construir-init beside {} (run `cargo build --workspace`, or give --init PATH)",
                    me.display()
                );
            }
            beside
        }
    };
    check_static(&path, "construir-init")?;
    Ok(path)
}

fn check_static(path: &Path, what: &str) -> Result<()> {
    let is_static = is_static_elf(path).with_context(|| format!("cannot read {what} at {}", path.display()))?;
    if !is_static {
        bail!("{what} at {} is not a statically linked 64-bit program", path.display());
    }
    Ok(())
}
