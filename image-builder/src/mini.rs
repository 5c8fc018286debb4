//! `image-builder mini`: the build machine's kernel and an initramfs holding
//! construir-init as `/init`, the virtio modules, and static busybox. No root
//! disk: `/job` lives in RAM. Boots in seconds; for tests and quick jobs.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use jobfile::arch::Arch;
use jobfile::image::{ImageManifest, MODULE_LIST};
use jobfile::units::rfc3339;

use crate::foreign::{self, Source};
use crate::initramfs::Cpio;
use crate::kernel::Kernel;
use crate::output::{elf_machine, is_static_elf, Staging};
use crate::{say, sources};

/// Modules the guest needs to see its job disk (virtio-blk over PCI, on q35
/// and on `virt`); on amd64, pvpanic-pci tells QEMU when the guest kernel
/// panics (Debian's arm64 kernel has no pvpanic: the host reads its console).
pub fn modules(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Amd64 => &["virtio_pci", "virtio_blk", "pvpanic_pci"],
        Arch::Arm64 => &["virtio_pci", "virtio_blk"],
    }
}

#[derive(Debug, Clone)]
pub struct MiniOptions {
    pub out: PathBuf,
    /// The guest's architecture; another than this machine's takes its kernel and busybox from the archive.
    pub arch: Arch,
    pub kernel: Option<PathBuf>,
    pub init: Option<PathBuf>,
    /// [default: /bin/busybox for this machine's architecture]
    pub busybox: Option<PathBuf>,
    /// For another architecture: the Debian suite and mirror, and where their packages are kept.
    pub suite: String,
    pub mirror: Option<String>,
    pub cache: Option<PathBuf>,
    pub force: bool,
}

/// Where the kernel, its modules and busybox are: this machine's, or
/// another architecture's unpacked from the archive (removed when dropped).
struct Parts {
    kernel: Kernel,
    busybox: PathBuf,
    /// The root the module paths are under (`/`, or the unpacked packages).
    modules_root: PathBuf,
    unpacked: Option<PathBuf>,
}

impl Drop for Parts {
    fn drop(&mut self) {
        if let Some(dir) = &self.unpacked {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl Parts {
    fn find(opts: &MiniOptions) -> Result<Parts> {
        if opts.arch.is_native() {
            let kernel = Kernel::find(opts.kernel.as_deref(), Path::new("/boot"), Path::new("/lib/modules"))?;
            let busybox = opts.busybox.clone().unwrap_or_else(|| PathBuf::from("/bin/busybox"));
            return Ok(Parts { kernel, busybox, modules_root: PathBuf::from("/"), unpacked: None });
        }
        if opts.kernel.is_some() || opts.busybox.is_some() {
            bail!(
                "--kernel and --busybox are this machine's ({}); an {} image's come from the Debian archive (--suite, --mirror)",
                Arch::host(),
                opts.arch
            );
        }
        let mirror = match &opts.mirror {
            Some(m) => m.clone(),
            None => sources::mirror_for(&sources::system_sources(Path::new("/etc/apt")), &opts.suite).with_context(
                || format!("no apt source on this machine serves {:?}; give the mirror with --mirror URL", opts.suite),
            )?,
        };
        let cache = opts.cache.clone().unwrap_or_else(|| foreign::default_cache(&opts.out));
        let dir = jobfile::layout::sibling(&opts.out, &format!(".mini-{}.parts-{}", opts.arch, std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut parts = Parts {
            kernel: Kernel { image: PathBuf::new(), version: String::new(), modules: PathBuf::new() },
            busybox: dir.join("bin/busybox"),
            modules_root: dir.clone(),
            unpacked: Some(dir.clone()),
        };
        foreign::unpack_parts(opts.arch, &Source { mirror, suite: opts.suite.clone(), cache }, &dir)?;
        parts.kernel = Kernel::find(None, &dir.join("boot"), &dir.join("lib/modules"))?;
        foreign::index_modules(&dir, &parts.kernel.version)?;
        Ok(parts)
    }
}

pub fn build(opts: &MiniOptions) -> Result<PathBuf> {
    // The init first: without it, nothing is worth fetching.
    let init = find_init(opts.init.as_deref(), opts.arch)?;
    let parts = Parts::find(opts)?;
    let kernel = &parts.kernel;
    say!("kernel {} ({}, {})", kernel.version, kernel.image.display(), opts.arch);
    say!("init {}", init.display());
    check_program(&parts.busybox, opts.arch, "busybox (install busybox-static)")?;
    let modules = kernel.resolve_module_groups(modules(opts.arch))?;
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
    let (kernel_file, pvh) = crate::kernel::install_kernel(&kernel.image, &staging.dir, opts.arch)
        .with_context(|| format!("cannot copy {}", kernel.image.display()))?;
    say!("kernel file {kernel_file}{}", if pvh { " (uncompressed, booted through its PVH entry)" } else { "" });
    let initrd = staging.dir.join("initrd.img");
    let file = fs::File::create(&initrd).with_context(|| format!("cannot create {}", initrd.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    let root = &parts.modules_root;
    write_root(&mut cpio, &init, (&parts.busybox, opts.arch), &modules, root).context("cannot write the initramfs")?;
    write_debug_modules(&mut cpio, &modules, &debug_modules, root).context("cannot write the initramfs")?;
    cpio.finish().context("cannot write the initramfs")?;
    say!("initramfs {} bytes", fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0));

    let manifest = ImageManifest {
        kind: "mini".into(),
        arch: opts.arch,
        description: if opts.arch.is_native() {
            "construir mini image: host kernel, construir-init as /init, static busybox; /job in RAM".into()
        } else {
            format!(
                "construir mini image for {}: Debian {}'s kernel, construir-init as /init, static busybox; /job in RAM",
                opts.arch, opts.suite
            )
        },
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
    (busybox, arch): (&Path, Arch),
    modules: &[Vec<PathBuf>],
    modules_root: &Path,
) -> std::io::Result<()> {
    for dir in ["job", "root", "etc/construir", "bin", "sbin", "usr/bin", "usr/sbin"] {
        cpio.dir(dir, 0o755)?;
    }
    write_init(cpio, init, modules, modules_root)?;
    cpio.copy("bin/busybox", 0o755, busybox)?;
    for applet in busybox_applets(busybox, arch)? {
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
    modules_root: &Path,
) -> std::io::Result<()> {
    for module in debug.iter().flatten().filter(|m| !modules.iter().flatten().any(|have| have == *m)) {
        let inside = module.strip_prefix(modules_root).unwrap_or(module);
        let rel = inside.strip_prefix("/").unwrap_or(inside).to_string_lossy().into_owned();
        cpio.copy(&rel, 0o644, module)?;
    }
    cpio.file(jobfile::image::DEBUG_MODULE_LIST, 0o644, module_list(debug, modules_root).as_bytes())
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

/// busybox's applets, asking it (through qemu-user-static when it is another architecture's).
fn busybox_applets(busybox: &Path, arch: Arch) -> std::io::Result<Vec<String>> {
    let out = foreign::command_for(arch, busybox).arg("--list-full").output().map_err(|e| {
        if arch.is_native() {
            e
        } else {
            std::io::Error::new(
                e.kind(),
                format!("cannot run {} (install qemu-user-static): {e}", arch.user_emulator()),
            )
        }
    })?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("{} --list-full failed", busybox.display())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
}

/// construir-init's file name beside image-builder for `arch`: `construir-init`
/// for this machine's, `construir-init-<uname -m>` for another's (`construir-init-aarch64`).
pub fn init_name(arch: Arch) -> String {
    if arch.is_native() {
        "construir-init".into()
    } else {
        format!("construir-init-{}", arch.machine())
    }
}

/// `--init`, else construir-init for `arch` beside this program (a cargo
/// build puts this machine's there; scripts/lib.sh `build_init` the others').
pub fn find_init(explicit: Option<&Path>, arch: Arch) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => {
            let me = std::env::current_exe().context("cannot find this program's own path")?;
            let name = init_name(arch);
            let beside = me.with_file_name(&name);
            if !beside.exists() {
                let how = if arch.is_native() {
                    "run `cargo build --workspace`".to_owned()
                } else {
                    "build it with `scripts/build-init` (Debian's Rust; scripts/test and scripts/install run it)"
                        .to_owned()
                };
                bail!("cannot find {name} beside {} ({how}, or give --init PATH)", me.display());
            }
            beside
        }
    };
    check_program(&path, arch, "construir-init")?;
    Ok(path)
}

/// That `path` is a static 64-bit program for `arch`.
fn check_program(path: &Path, arch: Arch, what: &str) -> Result<()> {
    let is_static = is_static_elf(path).with_context(|| format!("cannot read {what} at {}", path.display()))?;
    if !is_static {
        bail!("{what} at {} is not a statically linked 64-bit program", path.display());
    }
    let machine = elf_machine(path).with_context(|| format!("cannot read {what} at {}", path.display()))?;
    if machine != arch.elf_machine() {
        bail!("{what} at {} is not an {} ({}) program", path.display(), arch, arch.machine());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_architecture_has_its_init_and_modules() {
        assert_eq!(init_name(Arch::host()), "construir-init");
        let foreign = Arch::ALL.into_iter().find(|a| !a.is_native()).expect("another architecture");
        assert_eq!(init_name(foreign), format!("construir-init-{}", foreign.machine()));
        assert!(modules(Arch::Amd64).contains(&"pvpanic_pci"));
        assert_eq!(modules(Arch::Arm64), ["virtio_pci", "virtio_blk"], "Debian's arm64 kernel has no pvpanic");
        // This machine's busybox is no program of the other architecture.
        let err = check_program(Path::new("/bin/busybox"), foreign, "busybox").expect_err("wrong machine");
        assert!(err.to_string().contains(&format!("is not an {foreign}")), "{err}");
        check_program(Path::new("/bin/busybox"), Arch::host(), "busybox").expect("static, this machine's");
    }
}
