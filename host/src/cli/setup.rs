//! `construir-host run`: what the daemon needs set up before it starts
//! (directories, identities, the jail, limits), then the daemon.

use construir_host::debug::DebugLimits;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use construir_host::caches::{Caches, CACHES_DIR};
use construir_host::daemon::{self, RunOptions};
use construir_host::emulators::{self, Emulators, Found};
use construir_host::jail::{IdPool, IdRange, JailRoot};
use construir_host::layers::Layers;
use construir_host::limits::Limits;
use construir_host::packages::Packages;
use construir_host::qemu::Confiner;
use construir_host::queue::{Dirs, Rules};
use construir_host::{cgroup, config, jail, kvm, logger};
use jobfile::arch::Arch;

use crate::cli::args::RunArgs;

pub(crate) fn run_queue(a: RunArgs) -> Result<()> {
    logger::init(a.verbose, a.log_format);
    let Some(queue) = a.queue.clone() else {
        bail!("no queue: give QUEUE, or set `queue` in {}", config::DEFAULT_PATH);
    };
    let host_id = a.host_id.clone().unwrap_or_else(daemon::default_host_id);
    if jobfile::name::check_name(&host_id).is_err() {
        bail!("--host-id {host_id:?}: use letters, digits, '.', '_' and '-'");
    }
    let (shared, work) = a.dirs.clone().resolve(queue);
    let dirs = Dirs::of(shared, &host_id, work);
    // Each architecture's QEMU, asked once: a host of a server fetches only images it can run.
    let found = emulators_found(&a)?;
    let remote = match &a.server {
        Some(server) => {
            if a.once {
                bail!("--once runs a local queue until it is empty; a host of a server runs until stopped");
            }
            let token = match &a.token_file {
                Some(f) => std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
                None => std::env::var("CONSTRUIR_HOST_TOKEN")
                    .context("no token: give --token-file FILE, or set CONSTRUIR_HOST_TOKEN")?,
            };
            let remote = construir_host::remote::Remote {
                server: server.clone(),
                token: token.trim().to_owned(),
                ca_cert: a.ca_cert.clone(),
                poll: a.poll,
            };
            // Before anything needs an image (the KVM test boots one's kernel).
            let api = remote.api()?;
            let archs: Vec<Arch> = found.iter().map(|(arch, ..)| *arch).collect();
            match construir_host::remote::fetch_images(&api, &dirs.images, &archs) {
                Ok(_) => {}
                Err(e) => log::warn!("cannot fetch the server's images now: {e:#}; trying again later"),
            }
            Some(remote)
        }
        None if a.token_file.is_some() || a.ca_cert.is_some() => {
            bail!("--token-file and --ca-cert are for a host of a server: give --server URL too")
        }
        None => None,
    };
    let (opts, stop) = prepare(&a, dirs, host_id, found)?;
    match remote {
        Some(remote) => {
            let opts = RunOptions { rules: Rules { settle: Duration::ZERO, ..opts.rules }, ..opts };
            construir_host::remote::run(&opts, &remote, stop)?;
        }
        None => {
            daemon::run(&opts, stop)?;
        }
    }
    Ok(())
}

/// Everything `run` needs besides the directories: QEMU checked, the VMs'
/// confinement, cgroups, the accelerator, limits, and the stop flag.
/// `found`: the emulators `emulators_found` found, once, at start.
pub(crate) fn prepare(
    a: &RunArgs,
    dirs: Dirs,
    host_id: String,
    found: Vec<Found>,
) -> Result<(RunOptions, Arc<AtomicBool>)> {
    let (major, minor) = found.iter().find(|(arch, ..)| arch.is_native()).map(|(_, _, v)| *v).unwrap_or_default();
    let root = jail::running_as_root();
    let confiner = confiner(a, root, &found)?;
    let cgroups = if root {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| cgroup::own_cgroup(&t));
        match cgroup::detect(Path::new("/sys/fs/cgroup"), own.as_deref().unwrap_or("/")) {
            Ok(parent) => Some(parent),
            Err(why) => {
                log::info!("no writable cgroup v2 here ({why}): VMs run without cgroup limits");
                None
            }
        }
    } else {
        None
    };
    let cgroups_on = cgroups.is_some();
    log::info!("{}", layers(major, minor, a.vm_ids, &confiner, cgroups_on, a.enable_networking));
    let decision = kvm::decide(a.accel.into(), &a.qemu, &dirs.images, &dirs.work, || Ok(confiner.clone()));
    match &decision {
        kvm::Decision::NotProbed(why) => {
            log::warn!("KVM not tested ({why}): using TCG (restart after adding images)")
        }
        kvm::Decision::NoDevice(_) | kvm::Decision::ProbeFailed => log::info!(
            "KVM does not run guests here (no usable /dev/kvm, or a test boot hung): using TCG, which is slower and not a security boundary"
        ),
        _ => {}
    }
    let emulators = Emulators::new(found, decision.accel());
    log::info!("guests: {}", emulators.describe());
    let cache = a.package_cache.clone().unwrap_or_else(|| daemon::sibling(&dirs.queue, "cache"));
    let packages = Packages {
        resolver: deps::Resolver::new(deps::Settings {
            keyring: a.archive_keyring.clone(),
            cache_bytes: a.package_cache_size,
            max_bytes: a.max_package_bytes,
            ..deps::Settings::new(&cache.join("packages"))
        }),
        layers: Layers::new(&cache.join("layers"), a.layer_cache_size),
    };
    // A local queue has no accounts: every job's caches are the one owner's, so they are off unless asked for.
    let caches = a.caches.then(|| {
        let caches =
            Caches::new(&cache.join(CACHES_DIR), a.cache_disk_size, a.cache_owner_size).with_total(a.cache_total_size);
        log::warn!(
            "build caches are on ({}): a server's jobs each get their account's; jobs put into this queue by hand all share each cache name, reading and writing what the others left in it",
            caches.dir().display()
        );
        Arc::new(caches)
    });
    let signer = Arc::new(signer(a, &dirs, &host_id, major, minor, &confiner, cgroups_on)?);
    let limits = Limits {
        packages: Some(Arc::new(packages)),
        caches,
        cgroups,
        confiner,
        silence: a.silence_timeout,
        boot: a.boot_timeout,
        timeout: a.timeout,
        grace: a.grace,
        memory_mib: (a.memory >> 20).max(128),
        cpus: a.cpus,
        networking: a.enable_networking,
        console_limit: usize::try_from(a.log_limit).unwrap_or(usize::MAX).max(4096),
        emulators,
        signer: Some(signer),
        host_id,
        debug: (!a.no_debug).then_some(DebugLimits { wait: a.debug_wait, max: a.debug_max }),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    let opts = RunOptions {
        dirs,
        once: a.once,
        workers: a.workers as usize,
        limits,
        rescan: a.rescan,
        rules: Rules { min_size: jobfile::MIN_JOB_SIZE, max_size: a.max_size, settle: a.settle },
        max_attempts: a.max_attempts,
        stop_timeout: a.stop_timeout,
        metrics_file: a.metrics_file.clone(),
    };
    Ok((opts, stop))
}

/// This host's signing key (made at first start) and the facts each
/// statement names; its public half published beside the queue for the server.
fn signer(
    a: &RunArgs,
    dirs: &Dirs,
    host_id: &str,
    major: u32,
    minor: u32,
    confiner: &Confiner,
    cgroups: bool,
) -> Result<construir_host::provenance::Signer> {
    let path = a.host_key.clone().unwrap_or_else(|| construir_host::provenance::default_key_path(&dirs.queue, host_id));
    let (key, made) = construir_provenance::HostKey::load_or_create(&path)
        .with_context(|| format!("cannot have a host key at {}", path.display()))?;
    log::info!("results are signed by {} ({}{})", key.public(), path.display(), if made { ", made now" } else { "" });
    construir_host::provenance::publish(&dirs.running, host_id, &key)
        .with_context(|| format!("cannot publish the host key in {}", dirs.running.display()))?;
    Ok(construir_host::provenance::Signer {
        key,
        qemu: format!("{major}.{minor}"),
        jail: layers(major, minor, a.vm_ids, confiner, cgroups, a.enable_networking),
    })
}

/// The QEMU given for `arch` (`--qemu`, `--qemu-arm64`).
pub(crate) fn qemu_for(a: &RunArgs, arch: Arch) -> &Path {
    match arch {
        Arch::Amd64 => &a.qemu,
        Arch::Arm64 => &a.qemu_arm64,
    }
}

/// Each architecture's QEMU that runs here, with its version. The host's
/// own architecture's must; another's may be missing (its jobs are then refused).
pub(crate) fn emulators_found(a: &RunArgs) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    for arch in Arch::ALL {
        let qemu = qemu_for(a, arch);
        match emulators::probe(arch, qemu) {
            Ok(version) => found.push((arch, qemu.to_owned(), version)),
            Err(e) if arch.is_native() => return Err(e.into()),
            Err(e) => log::info!("no {arch} guests: {e}"),
        }
    }
    Ok(found)
}

/// What each VM is confined by: its own uid, namespaces and root when the host is root.
pub(crate) fn confiner(a: &RunArgs, root: bool, found: &[Found]) -> Result<Confiner> {
    if !root {
        return Ok(Confiner { ids: None, root: None, landlock_abi: 0 });
    }
    if a.workers > a.vm_ids.count {
        bail!("--workers {} needs at least as many VM uids; --vm-ids {} has {}", a.workers, a.vm_ids, a.vm_ids.count);
    }
    jail::check_range(a.vm_ids, Path::new("/etc/passwd"), Path::new("/etc/group"))?;
    Ok(Confiner {
        ids: Some(IdPool::new(a.vm_ids, &a.vm_id_locks)?),
        root: Some(JailRoot::discover(&found.iter().map(|(arch, q, _)| (*arch, q.as_path())).collect::<Vec<_>>())?),
        landlock_abi: jail::landlock_abi(),
    })
}

/// One line naming each confinement layer and whether it is on.
pub(crate) fn layers(major: u32, minor: u32, ids: IdRange, c: &Confiner, cgroups: bool, networking: bool) -> String {
    let on_off = |on: bool| if on { "on" } else { "off" };
    let jailed = c.root.is_some();
    format!(
        "QEMU {major}.{minor} jail: uid {}; namespaces {}; minimal root {}; seccomp on (QEMU -sandbox); no_new_privs on; cgroup v2 {}; Landlock {}",
        if c.ids.is_some() { format!("one per VM from {}-{}", ids.first, ids.last()) } else { "this (unprivileged) user's".into() },
        if jailed { format!("mnt,pid,ipc,uts{}", if networking { " (network: user-mode NIC)" } else { ",net (empty)" }) } else { "off (needs root)".into() },
        if jailed { "on" } else { "off (needs root)" },
        on_off(cgroups),
        match c.landlock_abi {
            0 if jailed => "off (this kernel has none)".to_owned(),
            0 => "off (needs root)".to_owned(),
            abi => format!("on (ABI {abi})"),
        }
    )
}
