//! A mini image for another architecture than this machine's: its kernel
//! (with modules) and static busybox are not on this machine, so they come
//! from the Debian archive this machine's apt sources name, for that
//! architecture. apt runs under a private configuration (no root, nothing
//! of the machine's apt touched), trusts only the archive keyring, and
//! refuses a file whose sha256 is not the one the signed lists give; the
//! packages are kept by sha256 in the cache and unpacked with `dpkg-deb`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use deps::apt::Apt;
use jobfile::arch::Arch;
use jobfile::deps::Pinned;
use jobfile::image::Archive;

use crate::say;

/// The Debian package that holds a static busybox.
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Where the archive is and where its packages are kept.
#[derive(Debug, Clone)]
pub struct Source {
    pub mirror: String,
    pub suite: String,
    /// apt's lists and the `.deb` files, kept between builds.
    pub cache: PathBuf,
}

/// The kernel package and busybox of `arch`, unpacked under `into` (which
/// then holds `boot/vmlinuz-*`, `lib/modules/*` and `bin/busybox`).
pub fn unpack_parts(arch: Arch, source: &Source, into: &Path) -> Result<()> {
    let apt = apt_for(arch, source)?;
    let pinned = choose(&apt, arch)?;
    let debs = fetch_verified(&apt, &pinned, &source.cache.join("debs"))?;
    for (p, deb) in pinned.iter().zip(&debs) {
        say!("unpacking {} {} ({arch})", p.name, p.version);
        jobfile::command::run(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(into),
            "dpkg-deb -x",
            Duration::from_secs(600),
            |_| {},
        )?;
    }
    Ok(())
}

/// apt for `source`'s archive as `arch` sees it, its lists fresh (within six hours).
fn apt_for(arch: Arch, source: &Source) -> Result<Apt> {
    let dir = source.cache.join(format!("apt-{}-{}", source.suite, arch.debian()));
    let archive = Archive {
        uri: source.mirror.clone(),
        suite: source.suite.clone(),
        components: vec!["main".into()],
        architecture: arch.debian().into(),
        dpkg_status: String::new(),
    };
    let keyring = Path::new(deps::DEFAULT_KEYRING);
    if !keyring.is_file() {
        bail!("the archive keyring {} is missing (apt-get install debian-archive-keyring)", keyring.display());
    }
    let apt = Apt::new(&dir, &archive, keyring).with_context(|| format!("cannot prepare apt in {}", dir.display()))?;
    if !apt.is_fresh(Duration::from_secs(6 * 3600)) {
        say!("reading the {} archive's lists for {arch} ({})", source.suite, source.mirror);
        apt.update(&|| false).context("cannot read the archive's lists")?;
    }
    Ok(apt)
}

/// The versioned kernel package (which the kernel metapackage names) and
/// busybox-static, as the archive records them; of everything else apt
/// would install with them, nothing is used.
fn choose(apt: &Apt, arch: Arch) -> Result<Vec<Pinned>> {
    let wanted = [arch.kernel_package().to_owned(), BUSYBOX_PACKAGE.to_owned()];
    let nothing = apt.dir().join("empty-status");
    fs::write(&nothing, "").with_context(|| format!("cannot write {}", nothing.display()))?;
    let plan = apt.satisfy(&nothing, &wanted, &|| false).context("the archive cannot give a kernel and busybox")?;
    let is_kernel =
        |name: &str| name.starts_with("linux-image-") && name.ends_with(arch.debian()) && name != arch.kernel_package();
    let chosen: Vec<(String, String)> =
        plan.install.iter().filter(|(name, _)| name == BUSYBOX_PACKAGE || is_kernel(name)).cloned().collect();
    if chosen.len() != 2 {
        bail!("expected one kernel and busybox-static from the archive for {arch}, apt chose {:?}", plan.install);
    }
    apt.show(&chosen).context("cannot read the packages' records")
}

/// Each package's `.deb` in `debs` (as `<sha256>.deb`), downloaded when
/// missing, and checked against its sha256 either way.
fn fetch_verified(apt: &Apt, pinned: &[Pinned], debs: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(debs).with_context(|| format!("cannot create {}", debs.display()))?;
    let path = |p: &Pinned| debs.join(format!("{}.deb", p.sha256));
    let missing: Vec<(&str, &str)> =
        pinned.iter().filter(|p| !path(p).is_file()).map(|p| (p.filename.as_str(), p.sha256.as_str())).collect();
    if !missing.is_empty() {
        say!(
            "downloading {}",
            pinned.iter().map(|p| format!("{} {}", p.name, p.version)).collect::<Vec<_>>().join(", ")
        );
        apt.fetch_files(&missing, debs, &|| false).context("cannot download the kernel and busybox")?;
    }
    pinned
        .iter()
        .map(|p| {
            let deb = path(p);
            let got = jobfile::image::sha256_file(&deb).with_context(|| format!("cannot read {}", deb.display()))?;
            if got != p.sha256 {
                let _ = fs::remove_file(&deb);
                bail!("{} {} from the archive has sha256 {got}, its lists say {}", p.name, p.version, p.sha256);
            }
            Ok(deb)
        })
        .collect()
}

/// `modules.dep` and the other indices for the unpacked kernel `version`
/// under `root` (the package leaves them to its install script): `depmod -b`.
pub fn index_modules(root: &Path, version: &str) -> Result<()> {
    jobfile::command::run(
        Command::new("depmod").arg("-b").arg(root).arg(version),
        "depmod",
        Duration::from_secs(300),
        |_| {},
    )?;
    Ok(())
}

/// The default cache for the archive's packages: `$XDG_CACHE_HOME/construir/image-builder`,
/// else `~/.cache/...`, else beside the image.
pub fn default_cache(out: &Path) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    match base {
        Some(b) => b.join("construir/image-builder"),
        None => jobfile::layout::sibling(out, ".image-builder-cache"),
    }
}

/// Runs `program` of `arch` with `args`: directly when this machine runs
/// it, else under its user-mode emulator (qemu-user-static).
pub fn command_for(arch: Arch, program: &Path) -> Command {
    if arch.is_native() {
        Command::new(program)
    } else {
        let mut cmd = Command::new(arch.user_emulator());
        cmd.arg(program);
        cmd
    }
}
