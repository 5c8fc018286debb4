//! What every job on a host gets: its VM's size, time and confinement, and
//! the host's packages, caches and signer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use construir_provenance::Machine;

use jobfile::arch::Arch;

use crate::caches::Caches;
use crate::cgroup;
use crate::emulators::{Emulator, Emulators};
use crate::image::BootFiles;
use crate::packages::Packages;
use crate::provenance::Signer;
use crate::qemu::{self, Accel, Bounds, Confiner, VmSpec};

/// What every job on this host gets.
#[derive(Debug, Clone)]
pub struct Limits {
    pub timeout: Duration,
    pub grace: Duration,
    pub memory_mib: u64,
    pub cpus: u32,
    pub networking: bool,
    pub console_limit: usize,
    /// The QEMU and accelerator of each guest architecture this host runs.
    pub emulators: Emulators,
    pub host_id: String,
    /// Each VM's uid, namespaces, minimal root and Landlock.
    pub confiner: Confiner,
    /// End a VM that prints nothing on its console for this long.
    pub silence: Option<Duration>,
    /// End a VM whose init has not said it started within this.
    pub boot: Duration,
    /// Where each VM gets a cgroup of its own (cgroup v2, writable).
    pub cgroups: Option<cgroup::Parent>,
    /// Jobs' packages: resolving, fetching, layers (`None`: jobs that declare packages are refused).
    pub packages: Option<Arc<Packages>>,
    /// Jobs' build caches (`None`: off; a job that names caches gets empty directories).
    pub caches: Option<Arc<Caches>>,
    /// Signs each result's provenance (`None`: results go without).
    pub signer: Option<Arc<Signer>>,
    /// How long a debug job's session may wait and last (`None`: `--no-debug`, jobs get none).
    pub debug: Option<crate::debug::DebugLimits>,
}

impl Limits {
    /// How long a VM may run, stay silent and take to boot.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            deadline: self.timeout + self.grace,
            silence: self.silence,
            boot: Some(self.boot),
            console_limit: self.console_limit,
        }
    }

    /// The QEMU binary an `arch` VM runs: the one in the minimal root when VMs are jailed in one.
    pub fn qemu_binary(&self, arch: Arch) -> PathBuf {
        let given = self.emulators.get(arch).map_or_else(|| PathBuf::from(arch.qemu()), |e| e.qemu.clone());
        self.confiner.root.as_ref().and_then(|r| r.qemu(arch)).map_or(given, Path::to_owned)
    }

    /// The accelerator of `arch` VMs.
    pub fn accel(&self, arch: Arch) -> Accel {
        self.emulators.get(arch).map_or(Accel::Tcg, |e| e.accel)
    }

    /// The guest's own watchdog: after the job's timeout and packing,
    /// before the host's kill (half the grace: the guest counts from its
    /// kernel's start, after the firmware).
    pub fn guest_deadline(&self) -> Duration {
        self.timeout + self.grace / 2
    }

    /// The VM's own cgroup `name`, where the host has cgroups: guest memory
    /// plus room for QEMU itself (TCG's translation cache among it).
    pub fn vm_cgroup(&self, name: &str) -> std::io::Result<Option<cgroup::Group>> {
        match &self.cgroups {
            Some(parent) => Ok(Some(parent.create(name, (self.memory_mib + 1024) << 20, 1024, self.cpus)?)),
            None => Ok(None),
        }
    }

    /// A VM of this host's size on `prepared`, booting `boot` with
    /// `cmdline` (the console, panics and quiet first), in its cgroup
    /// `group`, named `name`: no disks but the image's, which each caller
    /// adds to.
    pub fn vm_spec(
        &self,
        prepared: &qemu::Prepared,
        boot: BootFiles,
        cmdline: &str,
        group: Option<&cgroup::Group>,
        name: String,
    ) -> VmSpec {
        VmSpec {
            cgroup_procs: group.map(|g| g.procs.clone()),
            qemu: self.qemu_binary(boot.arch),
            accel: self.accel(boot.arch),
            arch: boot.arch,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            kernel: boot.kernel,
            initrd: Some(boot.initrd),
            cmdline: format!("console={} panic=-1 quiet loglevel=3 {cmdline}", boot.arch.console()),
            root_disk: boot.root_disk,
            layer: None,
            packages_disk: None,
            job_disk: None,
            cache_disks: Vec::new(),
            networking: self.networking,
            tmpdir: prepared.tmpdir(&self.confiner),
            name,
            file_size_limit: 0,
            live_console: None,
            debug_port: None,
        }
    }

    /// The machine a job's `arch` VM is, as its provenance names it.
    pub fn machine(&self, signer: &Signer, arch: Arch) -> Machine {
        let emulator = self.emulators.get(arch);
        Machine {
            qemu: emulator.map_or_else(|| signer.qemu.clone(), Emulator::version_text),
            architecture: arch.debian().to_owned(),
            emulator: emulator.map_or_else(|| arch.qemu().to_owned(), Emulator::name),
            accelerator: self.accel(arch).name().to_owned(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            networking: self.networking,
            timeout_secs: self.timeout.as_secs(),
            jail: signer.jail.clone(),
        }
    }
}
