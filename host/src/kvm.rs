//! Does KVM work here? `/dev/kvm` can exist, accept a VM, run a trivial
//! guest, and still hang a real kernel's boot (seen with nested
//! virtualization off). So the probe is the real thing: QEMU with KVM boots
//! an image's kernel with no root, which ends in a panic. If the panic is
//! not on the console within the limit, KVM does not work. The probe's QEMU
//! is jailed like every other and dies with the host. The answer is cached
//! per machine boot.

use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use jobfile::arch::Arch;

use crate::qemu::{self, Accel, Bounds, Confiner, VmSpec};

/// Whether QEMU at `qemu` boots `kernel` with KVM within `limit`. The probe
/// VM's directory goes under `work`; the answer is cached in `work/.accel-probe`
/// (keyed by boot id, QEMU and kernel).
pub fn kvm_works(qemu: &Path, kernel: &Path, limit: Duration, work: &Path, confiner: &Confiner) -> bool {
    if OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return false;
    }
    let cache = work.join(".accel-probe");
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let key = format!("{} {} {}", boot_id.trim(), qemu.display(), kernel.display());
    if let Ok(text) = fs::read_to_string(&cache) {
        if let Some(answer) = text.strip_prefix(&key).and_then(|rest| rest.trim().parse::<bool>().ok()) {
            return answer;
        }
    }
    let answer = match boot_probe(qemu, kernel, limit, work, confiner) {
        Ok(answer) => answer,
        Err(e) => {
            log::warn!("the KVM probe could not run: {}", jobfile::error_chain(&*e));
            false
        }
    };
    let _ = fs::write(&cache, format!("{key} {answer}\n"));
    answer
}

fn boot_probe(
    qemu: &Path,
    kernel: &Path,
    limit: Duration,
    work: &Path,
    confiner: &Confiner,
) -> Result<bool, Box<dyn std::error::Error>> {
    let prepared = confiner.prepare(&work.join(format!(".kvm-probe.{}", std::process::id())))?;
    let spec = VmSpec {
        qemu: confiner.root.as_ref().and_then(|r| r.qemu(Arch::host())).map_or_else(|| qemu.to_owned(), Path::to_owned),
        accel: Accel::Kvm,
        arch: Arch::host(),
        memory_mib: 256,
        cpus: 1,
        kernel: File::open(kernel)?,
        initrd: None,
        cmdline: format!("console={} panic=-1 quiet", Arch::host().console()),
        root_disk: None,
        layer: None,
        packages_disk: None,
        job_disk: None,
        cache_disks: Vec::new(),
        networking: false,
        tmpdir: prepared.tmpdir(confiner),
        name: "construir.kvm-probe".into(),
        file_size_limit: 1 << 20,
        cgroup_procs: None,
        live_console: None,
        debug_port: None,
    };
    let bounds = Bounds { deadline: limit, silence: None, boot: None, console_limit: 64 << 10 };
    let never = AtomicBool::new(false);
    let vm = qemu::run(&spec, prepared.confinement(confiner), bounds, &never, &never)?;
    let console = vm.console.finish("");
    // No root disk: a kernel that really booted panics, saying so.
    let booted = vm.cut.is_none() && console.windows(12).any(|w| w == b"Kernel panic");
    if !booted {
        let why = match vm.cut {
            Some(_) => format!("no kernel panic within {} s (the boot hung)", limit.as_secs()),
            None if !vm.stderr.is_empty() => format!("QEMU said: {}", vm.stderr.lines().last().unwrap_or_default()),
            None => "QEMU ended before the kernel got anywhere".to_owned(),
        };
        log::info!("KVM probe: {why}");
    }
    Ok(booted)
}

/// What the host was asked to use (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// KVM where it really runs guests, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator decision, with why: one for `run` and `doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `--accel tcg`.
    TcgChosen,
    /// `--accel kvm`: used as asked; `Err` says why `/dev/kvm` will not open.
    KvmChosen(Result<(), String>),
    /// Auto, and `/dev/kvm` will not open: TCG.
    NoDevice(String),
    /// Auto, and the probe could not be made (no image, no QEMU, no jail): TCG.
    NotProbed(String),
    /// Auto, and a test VM did not boot with KVM: TCG.
    ProbeFailed,
    /// Auto, and a test VM booted with KVM.
    ProbeBooted,
}

impl Decision {
    /// What VMs run with.
    pub fn accel(&self) -> Accel {
        match self {
            Decision::KvmChosen(_) | Decision::ProbeBooted => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }
}

/// Decides the accelerator: asked for, or (auto) probed by booting a kernel
/// from `images` with KVM. `confiner` is the probe VM's jail, or why there is none.
pub fn decide(
    choice: Choice,
    qemu: &Path,
    images: &Path,
    work: &Path,
    confiner: impl FnOnce() -> Result<Confiner, String>,
) -> Decision {
    let device = || OpenOptions::new().read(true).write(true).open("/dev/kvm").map(drop).map_err(|e| e.to_string());
    match choice {
        Choice::Tcg => Decision::TcgChosen,
        Choice::Kvm => Decision::KvmChosen(device()),
        Choice::Auto => {
            if let Err(e) = device() {
                return Decision::NoDevice(e);
            }
            let Some(kernel) = crate::image::any_kernel(images) else {
                return Decision::NotProbed(format!("no image in {} to boot", images.display()));
            };
            let confiner = match confiner() {
                Ok(c) => c,
                Err(e) => return Decision::NotProbed(e),
            };
            let _ = fs::create_dir_all(work);
            if kvm_works(qemu, &kernel, Duration::from_secs(15), work, &confiner) {
                Decision::ProbeBooted
            } else {
                Decision::ProbeFailed
            }
        }
    }
}

#[cfg(test)]
mod decision_tests {
    use super::*;

    #[test]
    fn the_decision_names_its_accelerator_and_why() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (qemu, images, work) = (Path::new("/nonexistent/qemu"), tmp.path().join("images"), tmp.path().join("work"));
        let no_jail = || -> Result<Confiner, String> { panic!("no probe is made without an image") };
        assert_eq!(decide(Choice::Tcg, qemu, &images, &work, no_jail), Decision::TcgChosen);
        let forced = decide(Choice::Kvm, qemu, &images, &work, no_jail);
        assert!(matches!(forced, Decision::KvmChosen(_)), "{forced:?}");
        assert_eq!(forced.accel(), Accel::Kvm, "asked for KVM, KVM it is (the VM fails if it cannot have it)");
        // Auto with no image to boot: never KVM untested.
        let auto = decide(Choice::Auto, qemu, &images, &work, no_jail);
        assert!(matches!(&auto, Decision::NoDevice(_) | Decision::NotProbed(_)), "{auto:?}");
        if let Decision::NotProbed(why) = &auto {
            assert!(why.contains("no image in"), "{why}");
        }
        assert_eq!(auto.accel(), Accel::Tcg);
        for (d, accel) in [
            (Decision::ProbeBooted, Accel::Kvm),
            (Decision::ProbeFailed, Accel::Tcg),
            (Decision::NoDevice("x".into()), Accel::Tcg),
            (Decision::KvmChosen(Err("x".into())), Accel::Kvm),
        ] {
            assert_eq!(d.accel(), accel, "{d:?}");
        }
    }
}
