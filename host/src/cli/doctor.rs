//! `construir-host doctor`: the checks, as this host would run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use construir_host::daemon;
use construir_host::queue::Dirs;
use construir_host::{cgroup, config, jail, kvm};

use crate::cli::args::{AccelChoice, RunArgs};
use crate::cli::setup::{confiner, emulators_found, qemu_for};
use jobfile::arch::Arch;

/// `construir-host doctor`: prints one line per requirement; fails when one blocks `run`.
pub(crate) fn doctor(a: RunArgs, config_file: Option<PathBuf>) -> Result<ExitCode> {
    use construir_host::doctor::{self, Check, Level, Setup};
    let mut checks: Vec<Check> = Vec::new();
    checks.push(match &config_file {
        Some(path) => Check {
            level: Level::Ok,
            what: "config",
            detail: format!("{} read, every key valid", path.display()),
            fix: None,
        },
        None => Check {
            level: Level::Ok,
            what: "config",
            detail: format!("no {} (defaults and flags only)", config::DEFAULT_PATH),
            fix: None,
        },
    });
    let Some(queue) = a.queue.clone() else {
        bail!("no queue: give QUEUE, or set `queue` in {}", config::DEFAULT_PATH);
    };
    let host_id = a.host_id.clone().unwrap_or_else(daemon::default_host_id);
    let (shared, work) = a.dirs.clone().resolve(queue);
    let dirs = Dirs::of(shared, &host_id, work);
    let root = jail::running_as_root();
    let setup = Setup {
        qemu: a.qemu.clone(),
        dirs: dirs.clone(),
        workers: a.workers,
        vm_ids: a.vm_ids,
        vm_id_locks: a.vm_id_locks.clone(),
        passwd: PathBuf::from("/etc/passwd"),
        group: PathBuf::from("/etc/group"),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        cgroup_own: std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| cgroup::own_cgroup(&t))
            .unwrap_or_else(|| "/".into()),
        min_free: 1 << 30,
    };
    let qemu_check = doctor::qemu(&setup);
    let qemu_ok = qemu_check.level == Level::Ok;
    checks.push(qemu_check);
    for arch in Arch::ALL.into_iter().filter(|a| !a.is_native()) {
        checks.push(doctor::foreign_qemu(&setup, arch, qemu_for(&a, arch)));
    }
    checks.push(doctor::vm_ids(&setup, root));
    checks.push(doctor::directories(&setup));
    checks.extend(doctor::images(&setup));
    checks.push(kvm_check(&a, &dirs, root, qemu_ok));
    checks.push(doctor::cgroups(&setup, root));
    checks.push(doctor::landlock());
    let key = a.host_key.clone().unwrap_or_else(|| construir_host::provenance::default_key_path(&dirs.queue, &host_id));
    checks.push(doctor::host_key(&key));
    checks.extend(doctor::free_space(&setup));
    for c in &checks {
        println!("{c}");
    }
    let worst = checks.iter().map(|c| c.level).max().unwrap_or(Level::Ok);
    let (fails, warns) = (
        checks.iter().filter(|c| c.level == Level::Fail).count(),
        checks.iter().filter(|c| c.level == Level::Warn).count(),
    );
    Ok(if worst == Level::Fail {
        println!("{fails} problem(s) stop `construir-host run` as configured; {warns} warning(s)");
        ExitCode::FAILURE
    } else {
        println!("ready to run; {warns} warning(s)");
        ExitCode::SUCCESS
    })
}

/// Whether VMs get KVM, as `run` decides it (`kvm::decide`).
pub(crate) fn kvm_check(a: &RunArgs, dirs: &Dirs, root: bool, qemu_ok: bool) -> construir_host::doctor::Check {
    use construir_host::doctor::{Check, Level};
    use kvm::Decision;
    let check =
        |level, detail: String, fix: Option<&str>| Check { level, what: "kvm", detail, fix: fix.map(str::to_owned) };
    let confiner = || {
        if !qemu_ok {
            return Err("QEMU is missing".to_owned());
        }
        let found = emulators_found(a).map_err(|e| format!("{e:#}"))?;
        confiner(a, root, &found).map_err(|e| format!("{e:#}"))
    };
    match kvm::decide(a.accel.into(), &a.qemu, &dirs.images, &dirs.work, confiner) {
        Decision::TcgChosen => check(
            Level::Warn,
            "not used (accel = tcg): VMs are slower, and TCG is no security boundary".into(),
            Some("accel = \"auto\" uses KVM where it works"),
        ),
        Decision::KvmChosen(Err(e)) => check(
            Level::Fail,
            format!("accel = kvm, but /dev/kvm cannot be opened: {e}"),
            Some("load kvm_intel or kvm_amd (and enable virtualization in firmware), or use accel = \"auto\""),
        ),
        Decision::KvmChosen(Ok(())) => check(Level::Ok, "accel = kvm; /dev/kvm opens".into(), None),
        Decision::NoDevice(e) => check(
            Level::Warn,
            format!("/dev/kvm cannot be opened ({e}): jobs run under TCG, slower and no security boundary"),
            Some("load kvm_intel or kvm_amd; in a VM, enable nested virtualization"),
        ),
        Decision::NotProbed(why) => check(Level::Warn, format!("not probed: {why}"), Some("build an image, and fix what doctor says above")),
        Decision::ProbeBooted => check(Level::Ok, "a test VM booted with KVM".into(), None),
        Decision::ProbeFailed => check(Level::Warn, "/dev/kvm opens but a test VM did not boot with it (nested virtualization off?): jobs run under TCG, slower and no security boundary".into(), Some("enable nested virtualization for this machine, or run on bare metal")),
    }
}

impl From<AccelChoice> for kvm::Choice {
    fn from(c: AccelChoice) -> kvm::Choice {
        match c {
            AccelChoice::Auto => kvm::Choice::Auto,
            AccelChoice::Kvm => kvm::Choice::Kvm,
            AccelChoice::Tcg => kvm::Choice::Tcg,
        }
    }
}
