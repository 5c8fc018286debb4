//! One job, from claimed to delivered: working copy, VM, verdict, result.
//! Whatever happens, the claimed file ends in exactly one of `done/`
//! (after its result is durable), `failed/`, or back in `queue/` when the
//! host is stopping.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobfile::{JobName, JobStatus};

use crate::caches::{self, Caches, Checkout};
use crate::files::ReadAt;
use crate::image::{self, BootFiles, Image};
use crate::layers::{self, Layer};
use crate::packages::{self, NoPlan, Packages, Plan};
use crate::qemu::{self, Accel, Bounds, Confinement, Confiner, Cut, LayerDisk, VmSpec};
use crate::queue::{self, Dirs, Ending, Scanned};
use crate::{cgroup, metrics};

/// What every job on this host gets.
#[derive(Debug, Clone)]
pub struct Limits {
    pub timeout: Duration,
    pub grace: Duration,
    pub memory_mib: u64,
    pub cpus: u32,
    pub networking: bool,
    pub console_limit: usize,
    pub accel: Accel,
    pub qemu: PathBuf,
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
    pub signer: Option<Arc<crate::provenance::Signer>>,
}

/// The working copy's name in the VM's directory.
const DISK: &str = "disk";

/// Runs a claimed job (`running/<file_name>`, as the scan saw it) to its end.
pub fn run(
    dirs: &Dirs,
    limits: &Limits,
    file_name: &OsString,
    job: &JobName,
    scanned: &Scanned,
    stop: &Arc<AtomicBool>,
    cancel: &AtomicBool,
) -> io::Result<Ending> {
    let label = job.input_file_name();
    let claimed = dirs.host_dir.join(file_name);
    // A note left by an earlier claim of the same name must not speak for this one.
    queue::drop_delivery_note(dirs, file_name)?;
    let image = match Image::load(&dirs.images, job.image()) {
        Ok(image) => image,
        Err(e) => {
            return fail(
                dirs,
                job,
                "unknown_image",
                &claimed,
                &format!("unknown image i{}: {}", job.image(), jobfile::error_chain(&e)),
                None,
            )
        }
    };
    let manifest = &image.manifest;
    let prepared = match limits.confiner.prepare(&dirs.work.join(format!("{}.{label}", limits.host_id))) {
        Ok(p) => p,
        Err(e) => {
            log::error!("job {label}: cannot prepare its VM: {}; back in the queue", jobfile::error_chain(&e));
            queue::requeue(dirs, file_name)?;
            return Ok(Ending::Requeued);
        }
    };
    let (disk, size) = match queue::take_claimed(&claimed, scanned, &prepared.dir.fd, OsStr::new(DISK)) {
        Ok(taken) => taken,
        Err(e) => {
            return fail(dirs, job, "not_taken", &claimed, &format!("cannot take the claimed job file: {e}"), None)
        }
    };
    // For its provenance: the job file as it came, before any VM has it.
    let claimed_at = jobfile::status::rfc3339(std::time::SystemTime::now());
    let hashing = Instant::now();
    let job_sha256 = match limits.signer {
        Some(_) => Some(crate::files::sha256(&disk)?),
        None => None,
    };
    let hashed = hashing.elapsed();
    // Its packages: refused here, before any VM, when they cannot be had.
    let pinned = match jobfile::layout::read_pin(&dirs.running, file_name) {
        Ok(p) => p,
        Err(why) => return fail(dirs, job, "bad_packages", &claimed, &format!("packages: {why}"), None),
    };
    // A verified rebuild's run: the name and SOURCE_DATE_EPOCH its other run gets too.
    let rebuild = match jobfile::rebuild::read_terms(&dirs.running, file_name) {
        Ok(t) => t,
        Err(why) => return fail(dirs, job, "bad_terms", &claimed, &format!("verified rebuild: {why}"), None),
    };
    let declaration = match packages::read_declaration(&disk) {
        Ok(d) => d,
        Err(why) => return fail(dirs, job, "bad_packages", &claimed, &format!("packages: {why}"), None),
    };
    let halt = || stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
    let plan = match packages::plan(limits.packages.as_deref(), &image, declaration.as_ref(), &label, pinned, &halt) {
        Ok(plan) => plan,
        Err(NoPlan::Refused(why)) => {
            return fail(dirs, job, "bad_packages", &claimed, &format!("packages: {why}"), None)
        }
        Err(NoPlan::Halted) if cancel.load(Ordering::Relaxed) => {
            let reason = "cancelled at its submitter's request while its packages were fetched";
            log::info!("job {label}: {reason}");
            return fail(dirs, job, "cancelled", &claimed, reason, None);
        }
        Err(NoPlan::Halted) => {
            queue::requeue(dirs, file_name)?;
            log::info!("job {label}: the host is stopping; its packages were not all fetched; back in the queue");
            return Ok(Ending::Requeued);
        }
    };
    let declared = plan.declared();
    let started = Instant::now();
    // What its provenance names, once the caches it is lent and the layer it boots are known.
    let make_record = |given: &[jobfile::caches::Given], layer: Option<&jobfile::deps::LayerRecord>| {
        limits.signer.as_ref().zip(job_sha256.clone()).map(|(signer, job_sha256)| {
            let owner = jobfile::layout::read_owner(&dirs.running, file_name).ok().flatten();
            let inputs = crate::provenance::Inputs {
                file_name,
                job_sha256,
                image: &image,
                packages: declaration.as_ref().map(|(d, _)| d.packages.clone()).unwrap_or_default(),
                caches: given,
                layer,
                owner: owner.as_deref().or(Some(caches::LOCAL_OWNER)),
                rebuild: rebuild.as_ref(),
            };
            crate::provenance::Record::new(inputs, claimed_at.clone(), limits, &signer.jail, &signer.qemu, hashed)
        })
    };
    let (layer, preface) = match plan {
        Plan::Plain | Plan::Satisfied => (None, Vec::new()),
        Plan::Layer(layer) => {
            log::info!(
                "job {label}: booting from layer {} ({} packages)",
                layer.record.key,
                layer.record.install.len()
            );
            (Some(layer), Vec::new())
        }
        Plan::Build { key, resolution, fetched } => {
            match build_layer(limits, &prepared, &image, job, &key, &resolution, &fetched, stop, cancel)? {
                Built::Layer(layer, console) => (Some(layer), console),
                Built::InstallFailed(result, console) => {
                    // The job's result is the installation's: its status, apt's last words, its console.
                    let mut disk = disk;
                    jobfile::fallback::write_onto(&mut disk, &result)?;
                    let st = read_status(&disk).unwrap_or_default();
                    let verdict = verdict(&st, "the job did not run", started.elapsed());
                    let mut log = console;
                    log.extend_from_slice(format!("{}{verdict}\n", jobfile::tools::VERDICT_PREFIX).as_bytes());
                    let record = make_record(&[], None);
                    return deliver(
                        dirs,
                        limits,
                        &prepared,
                        &disk,
                        scanned,
                        job,
                        file_name,
                        &st,
                        &log,
                        verdict,
                        record.as_ref(),
                    );
                }
                Built::Broken(reason, log) => return fail(dirs, job, "layer_failed", &claimed, &reason, Some(&log)),
                Built::Stopped => {
                    queue::requeue(dirs, file_name)?;
                    log::info!("job {label}: stopped while its layer was built; back in the queue");
                    return Ok(Ending::Requeued);
                }
            }
        }
    };
    // Its build caches: each lent as a working copy of its last kept version.
    let cache_names = declaration.as_ref().map(|(d, _)| d.caches.clone()).unwrap_or_default();
    let (checkouts, given) = lend_caches(dirs, limits, file_name, job, &cache_names, rebuild.is_some());
    let record = make_record(&given, layer.as_ref().map(|l| &l.record));
    let guest = jobfile::cmdline::Settings {
        job_device: manifest.job_device.clone().into(),
        layer: layer.as_ref().map(|l| l.record.key.clone()),
        declared,
        timeout: Some(limits.timeout),
        // The guest's own watchdog: after the job's timeout and packing, before the host's kill.
        // (Half the grace: the guest counts from its kernel's start, after the firmware.)
        deadline: Some(limits.timeout + limits.grace / 2),
        name: Some(rebuild.as_ref().map_or_else(|| job.name().to_owned(), |t| t.name.clone())),
        image: Some(job.image().to_owned()),
        console_max: limits.console_limit as u64,
        caches: given,
        epoch: rebuild.as_ref().map(|t| t.epoch),
        ..Default::default()
    };
    let cmdline = format!("console=ttyS0 panic=-1 quiet loglevel=3 {} {}", manifest.cmdline, guest.to_cmdline());
    let BootFiles { kernel, initrd, root_disk } = match image.open() {
        Ok(f) => f,
        Err(e) => {
            return fail(
                dirs,
                job,
                "image_incomplete",
                &claimed,
                &format!("image i{} is incomplete: {e}", job.image()),
                None,
            )
        }
    };
    let root_size = root_disk.as_ref().and_then(image::qcow2_virtual_size).unwrap_or(0);
    // Guest memory plus room for QEMU itself (TCG's translation cache among it).
    let group = vm_cgroup(limits, &format!("{}.{label}", limits.host_id))?;
    let jailed = matches!(prepared.confinement(&limits.confiner), Confinement::Jailed { .. });
    let spec = VmSpec {
        cgroup_procs: group.as_ref().map(|g| g.procs.clone()),
        qemu: limits.confiner.root.as_ref().map_or_else(|| limits.qemu.clone(), |r| r.qemu.clone()),
        accel: limits.accel,
        memory_mib: limits.memory_mib,
        cpus: limits.cpus,
        kernel,
        initrd: Some(initrd),
        cmdline,
        root_disk,
        layer: match &layer {
            Some(l) => Some(LayerDisk { file: open_layer(l)?, write: false }),
            None => None,
        },
        packages_disk: None,
        job_disk: Some(disk.try_clone()?),
        cache_disks: checkouts.iter().map(|c| c.file.try_clone()).collect::<io::Result<_>>()?,
        networking: limits.networking,
        tmpdir: prepared.tmpdir(&limits.confiner),
        name: format!("construir.{}.{}", limits.host_id, job.input_file_name()),
        // The job disk never grows; the snapshot overlay grows at most to the root disk's size;
        // a cache disk is written within its size.
        file_size_limit: size.max(root_size).max(checkouts.iter().map(|c| c.len).max().unwrap_or(0)) + (1 << 30),
        live_console: create_live_console(dirs, file_name),
    };
    log::info!(
        "job {label}: booting image i{} ({}, {} MiB, {} CPUs, job disk {} bytes{})",
        job.image(),
        limits.accel.name(),
        limits.memory_mib,
        limits.cpus,
        size,
        match &prepared.lease {
            Some(l) if jailed => format!(", QEMU as uid {} in its own namespaces and root", l.id.uid),
            Some(l) => format!(", QEMU as uid {}", l.id.uid),
            None => String::new(),
        }
    );
    let bounds = Bounds {
        deadline: limits.timeout + limits.grace,
        silence: limits.silence,
        boot: Some(limits.boot),
        console_limit: limits.console_limit,
    };
    let vm = qemu::run(&spec, prepared.confinement(&limits.confiner), bounds, stop, cancel);
    let _ = fs::remove_file(queue::live_console(dirs, file_name));
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            return fail(
                dirs,
                job,
                "qemu_error",
                &claimed,
                &format!("cannot run QEMU: {}", jobfile::error_chain(&e)),
                None,
            )
        }
    };
    drop(spec); // QEMU is gone: nothing else holds the working copy now
    if let Some(took) = vm.booted {
        metrics::observe_boot(job.image(), took);
    }
    if let Some(cut) = vm.cut {
        metrics::vm_killed(match cut {
            Cut::Deadline => "deadline",
            Cut::Silence => "silence",
            Cut::NoBoot => "no_boot",
            Cut::Stop => "stop",
            Cut::Cancel => "cancel",
        });
    }
    if vm.cut == Some(Cut::Stop) {
        queue::requeue(dirs, file_name)?;
        log::info!("job {label}: VM stopped because the host is stopping; back in the queue");
        return Ok(Ending::Requeued);
    }
    if vm.cut == Some(Cut::Cancel) {
        let reason = format!("cancelled at its submitter's request after {:.1} s", vm.elapsed.as_secs_f64());
        log::info!("job {label}: {reason}");
        let log = vm.console.finish(&format!("failed: {reason}"));
        return fail(dirs, job, "cancelled", &claimed, &reason, Some(&log));
    }
    if vm.cut == Some(Cut::NoBoot) {
        return no_boot(dirs, file_name, job, limits.boot, vm);
    }
    queue::forget_no_boot(dirs, file_name);
    let secs = vm.elapsed.as_secs_f64();
    let how = match (vm.cut, &vm.status) {
        (Some(Cut::Deadline), _) => format!(
            "VM killed after {secs:.1} s: past the job timeout ({} s) plus grace ({} s)",
            limits.timeout.as_secs(),
            limits.grace.as_secs()
        ),
        (Some(Cut::Silence), _) => format!(
            "VM killed after {secs:.1} s: no console output for {} s",
            limits.silence.map_or(0, |s| s.as_secs())
        ),
        (_, Some(st)) if st.success() => format!("VM powered off after {secs:.1} s"),
        // pvpanic with -action panic=exit-failure: QEMU exits 1 when the guest kernel panics.
        (_, Some(st)) if st.code() == Some(1) && vm.stderr.is_empty() => {
            format!("the guest kernel panicked after {secs:.1} s")
        }
        (_, Some(st)) => format!("QEMU exited with {st} after {secs:.1} s{}", stderr_note(&vm.stderr)),
        (_, None) => "QEMU ended".to_owned(),
    };
    log::info!("job {label}: {how}; {} bytes of console output", vm.console.received());

    // Only a clean power-off means init packed and synced the result: after a
    // panic, a kill or a crash the disk may hold half a result whose status
    // (packed first) still reads well.
    let powered_off = vm.cut.is_none() && vm.status.is_some_and(|st| st.success());
    let status = if powered_off { read_status(&disk) } else { None };
    match status {
        Some(st) => {
            settle_caches(limits, &label, checkouts, &st);
            report_caches(dirs, limits);
            let verdict = verdict(&st, &how, started.elapsed());
            let mut log = preface;
            log.extend(vm.console.finish(&verdict));
            deliver(dirs, limits, &prepared, &disk, scanned, job, file_name, &st, &log, verdict, record.as_ref())
        }
        None => {
            let reason = if powered_off {
                format!("no result: {how}; the job disk holds no job_status.json")
            } else {
                format!("no result: {how}; without a clean power-off the job disk is not read")
            };
            let log = vm.console.finish(&format!("failed: {reason}"));
            fail(dirs, job, "no_result", &claimed, &reason, Some(&log))
        }
    }
}

/// Lends the job each cache it names, from this host's caches: those of
/// the owner the server named for the job (its account), or of `local`
/// for a job with none (a local queue has no accounts), at the generation
/// the server last said. With caches off, or when one cannot be lent, the
/// guest is told it is not given (an empty directory). A verified
/// rebuild's run (`rebuild`) is lent none: a poisoned cache would feed both
/// runs the same objects, so each starts empty.
fn lend_caches(
    dirs: &Dirs,
    limits: &Limits,
    file_name: &OsStr,
    job: &JobName,
    names: &[String],
    rebuild: bool,
) -> (Vec<Checkout>, Vec<jobfile::caches::Given>) {
    let label = job.input_file_name();
    let (mut checkouts, mut given) = (Vec::new(), Vec::new());
    if rebuild && !names.is_empty() {
        log::info!("job {label}: a verified rebuild's run: its build caches start empty");
    }
    let terms = if names.is_empty() || limits.caches.is_none() || rebuild {
        None
    } else {
        let owner = jobfile::layout::read_owner(&dirs.running, file_name)
            .map(|o| o.unwrap_or_else(|| caches::LOCAL_OWNER.to_owned()));
        match owner.and_then(|o| Ok((o, jobfile::layout::read_generations(&dirs.running)?))) {
            Ok(terms) => Some(terms),
            Err(why) => {
                log::warn!("job {label}: its build caches are not given: {why}");
                None
            }
        }
    };
    for name in names {
        let lent = limits.caches.as_ref().zip(terms.as_ref()).and_then(|(caches, (owner, generations))| {
            let tag = queue::unique_tag(&limits.host_id);
            let generation = jobfile::caches::generation(generations, owner, name);
            caches
                .checkout(owner, job.image(), name, generation, &tag)
                .inspect_err(|e| log::warn!("job {label}: cannot lend it build cache {name}: {e}; it runs without"))
                .ok()
        });
        given.push(jobfile::caches::Given { name: name.clone(), version: lent.as_ref().map(|c| c.version) });
        if let Some(c) = lent {
            log::info!("job {label}: build cache {name} at version {}", c.version);
            checkouts.push(c);
        }
    }
    (checkouts, given)
}

/// What the job's end means for each cache it was lent: kept as the new
/// version when the job ended ok with the cache mounted; started again,
/// empty, when the guest could not mount it (garbage from a former job of
/// the same key); otherwise dropped.
fn settle_caches(limits: &Limits, label: &str, checkouts: Vec<Checkout>, st: &JobStatus) {
    let Some(caches) = &limits.caches else { return };
    for c in checkouts {
        let name = c.name.clone();
        let seen = st.caches.iter().find(|s| s.name == name);
        match seen {
            Some(s) if s.mounted && st.result == jobfile::Outcome::Ok => match caches.keep(c) {
                Ok(v) => log::info!("job {label}: build cache {name} kept as version {v}"),
                Err(e) => log::warn!("job {label}: cannot keep build cache {name}: {e}"),
            },
            Some(s) if !s.mounted && s.version.is_some() => {
                let why = s.problem.as_deref().map(|p| jobfile::sanitize(p.as_bytes())).unwrap_or_default();
                log::warn!("job {label}: build cache {name} did not mount in the VM ({why}); it starts again empty");
                if let Err(e) = caches.reset(c) {
                    log::warn!("job {label}: cannot reset build cache {name}: {e}");
                }
            }
            _ => log::info!("job {label}: build cache {name} not kept (the job ended {})", st.result.as_str()),
        }
    }
}

/// Writes what this host's caches hold for the server (after removing
/// those their owners cleared); nothing with caches off.
pub fn report_caches(dirs: &Dirs, limits: &Limits) {
    let Some(caches) = &limits.caches else { return };
    let done = jobfile::layout::read_generations(&dirs.running)
        .map_err(io::Error::other)
        .and_then(|generations| caches.report(&dirs.running, &limits.host_id, &generations));
    if let Err(e) = done {
        log::warn!("cannot report this host's build caches: {e}");
    }
}

/// Lands a job's result (the working copy, with `st` as its status) in done/.
#[allow(clippy::too_many_arguments)]
fn deliver(
    dirs: &Dirs,
    limits: &Limits,
    prepared: &qemu::Prepared,
    disk: &File,
    scanned: &Scanned,
    job: &JobName,
    file_name: &OsStr,
    st: &JobStatus,
    log: &[u8],
    verdict: String,
    record: Option<&crate::provenance::Record>,
) -> io::Result<Ending> {
    let tag = queue::unique_tag(&limits.host_id);
    let staged = queue::stage(dirs, &prepared.dir.fd, OsStr::new(DISK), disk, scanned.size, job, log, &tag)?;
    // Its provenance, signed over the result as staged; in place once the result is.
    let signed = limits.signer.as_ref().zip(record).and_then(|(signer, record)| {
        let result = dirs.done.join(&staged.result);
        let signing = Instant::now();
        let signed =
            crate::provenance::sign_staged(&dirs.done, signer, record, job, &result, log, &limits.host_id, &tag)
                .inspect_err(|e| {
                    log::error!(
                        "job {}: cannot sign its provenance: {}",
                        job.input_file_name(),
                        jobfile::error_chain(e)
                    )
                })
                .ok()?;
        log::info!(
            "job {}: provenance signed: job file hashed in {} ms, result and its files hashed and signed in {} ms",
            job.input_file_name(),
            record.hashed.as_millis(),
            signing.elapsed().as_millis()
        );
        Some(signed)
    });
    queue::note_delivery(dirs, file_name, &staged)?;
    let delivery = queue::land(dirs, job, &staged)?;
    if let Some(prov) = signed {
        match &delivery {
            queue::Delivery::Done(_) => {
                if let Err(e) = crate::provenance::land_beside(&dirs.done, &prov, job) {
                    log::error!("job {}: cannot put its provenance in place: {e}", job.input_file_name());
                }
            }
            queue::Delivery::Taken { .. } => {
                let _ = fs::remove_file(dirs.done.join(prov));
            }
        }
    }
    metrics::job_finished(st.result.as_str(), job.image());
    if let Some(secs) = st.duration_secs {
        metrics::observe_run(job.image(), secs);
    }
    queue::end_delivered(dirs, file_name, job, delivery, verdict)
}

/// How a layer's build ended.
enum Built {
    /// Built and kept; the build's console, for the start of the job's log.
    Layer(Layer, Vec<u8>),
    /// apt could not install the packages: the status disk's content (the
    /// fallback result, status first) and the console, without a verdict.
    InstallFailed(Vec<u8>, Vec<u8>),
    /// The build went wrong otherwise: why, and the console.
    Broken(String, Vec<u8>),
    /// The host is stopping.
    Stopped,
}

/// The status disk of a layer's build: as small as a result can be.
const STATUS_DISK: u64 = jobfile::fallback::FALLBACK_MAX;

/// Builds the layer `key`: a new overlay on the image's root disk, booted
/// writable with the packages on a read-only disk and a status disk, in a
/// VM confined like any job's; kept when construir-init says it installed them.
#[allow(clippy::too_many_arguments)]
fn build_layer(
    limits: &Limits,
    prepared: &qemu::Prepared,
    image: &Image,
    job: &JobName,
    key: &str,
    resolution: &jobfile::deps::Resolution,
    fetched: &deps::Fetched,
    stop: &Arc<AtomicBool>,
    cancel: &AtomicBool,
) -> io::Result<Built> {
    let label = job.input_file_name();
    let pk = limits.packages.as_ref().expect("a layer is planned only when the host has packages");
    let manifest = &image.manifest;
    let Some(root_name) = &manifest.root_disk else {
        return Ok(Built::Broken(format!("image i{} has no root disk to build a layer on", image.number), Vec::new()));
    };
    let base = packages::base_sha256(image).unwrap_or_default();
    let staging = pk.layers.staging(key)?;
    let overlay = staging.path().join(layers::DISK);
    let made = jobfile::command::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.dir.join(root_name))
            .arg(&overlay),
        "qemu-img create",
        Duration::from_secs(60),
        |_| {},
    );
    if let Err(e) = made {
        return Ok(Built::Broken(
            format!("cannot create the layer's overlay: {}", jobfile::error_chain(&e)),
            Vec::new(),
        ));
    }
    // The package disk and the status disk live in the VM's own directory, not in the layer.
    let scratch = tempfile::Builder::new().prefix(".packages.").tempdir_in(pk.layers.dir())?;
    let raw = scratch.path().join("packages.raw");
    if let Err(e) = deps::disk::write(resolution, fetched, scratch.path(), &raw) {
        return Ok(Built::Broken(format!("cannot write the package disk: {e}"), Vec::new()));
    }
    let status_path = scratch.path().join("status");
    let status_disk = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&status_path)?;
    status_disk.set_len(STATUS_DISK)?;
    let guest = jobfile::cmdline::Settings {
        job_device: manifest.job_device.clone().into(),
        packages: Some("/dev/vdc".into()),
        deadline: Some(limits.timeout + limits.grace / 2),
        name: Some(job.name().to_owned()),
        image: Some(job.image().to_owned()),
        console_max: limits.console_limit as u64,
        ..Default::default()
    };
    let BootFiles { kernel, initrd, root_disk } = image.open()?;
    let root_size = root_disk.as_ref().and_then(image::qcow2_virtual_size).unwrap_or(0);
    let group = vm_cgroup(limits, &format!("{}.{label}.layer", limits.host_id))?;
    let spec = VmSpec {
        cgroup_procs: group.as_ref().map(|g| g.procs.clone()),
        qemu: limits.confiner.root.as_ref().map_or_else(|| limits.qemu.clone(), |r| r.qemu.clone()),
        accel: limits.accel,
        memory_mib: limits.memory_mib,
        cpus: limits.cpus,
        kernel,
        initrd: Some(initrd),
        cmdline: format!("console=ttyS0 panic=-1 quiet loglevel=3 {} {}", manifest.cmdline, guest.to_cmdline()),
        root_disk,
        layer: Some(LayerDisk { file: fs::OpenOptions::new().read(true).write(true).open(&overlay)?, write: true }),
        packages_disk: Some(File::open(&raw)?),
        job_disk: Some(status_disk.try_clone()?),
        cache_disks: Vec::new(),
        networking: false,
        tmpdir: prepared.tmpdir(&limits.confiner),
        name: format!("construir.{}.{label}.layer", limits.host_id),
        // The overlay grows at most to the root disk's size.
        file_size_limit: root_size + (1 << 30),
        live_console: None,
    };
    log::info!("job {label}: installing {} packages into layer {key}", resolution.install.len());
    let bounds = Bounds {
        deadline: limits.timeout + limits.grace,
        silence: limits.silence,
        boot: Some(limits.boot),
        console_limit: limits.console_limit,
    };
    let vm = match qemu::run(&spec, prepared.confinement(&limits.confiner), bounds, stop, cancel) {
        Ok(vm) => vm,
        Err(e) => return Ok(Built::Broken(format!("cannot run QEMU: {}", jobfile::error_chain(&e)), Vec::new())),
    };
    drop(spec);
    let secs = vm.elapsed.as_secs_f64();
    match vm.cut {
        Some(Cut::Stop) => return Ok(Built::Stopped),
        Some(cut) => {
            let why = match cut {
                Cut::Cancel => {
                    format!("cancelled at its submitter's request after {secs:.1} s, while its packages were installed")
                }
                Cut::Deadline => format!(
                    "installing its packages took longer than the job timeout ({} s) plus grace",
                    limits.timeout.as_secs()
                ),
                Cut::Silence => format!(
                    "installing its packages printed nothing for {} s",
                    limits.silence.map_or(0, |s| s.as_secs())
                ),
                Cut::NoBoot => {
                    format!("the VM that installs its packages did not boot within {} s", limits.boot.as_secs())
                }
                Cut::Stop => unreachable!("handled above"),
            };
            let log = vm.console.finish(&format!("failed: {why}"));
            return Ok(Built::Broken(why, log));
        }
        None => {}
    }
    let powered_off = vm.status.is_some_and(|st| st.success());
    let status = if powered_off { read_status(&status_disk) } else { None };
    match status {
        Some(st) if st.result == jobfile::Outcome::Ok => {
            drop(status_disk);
            let layer = pk.layers.commit(staging, key, &image.number, &base, resolution)?;
            log::info!("job {label}: layer {key} built in {secs:.1} s ({} bytes)", layer.record.bytes);
            let note = format!(
                "[construir-host: installed {} packages into layer {key} in {secs:.1} s; the job boots from it]",
                resolution.install.len()
            );
            let mut log = vm.console.finish(&note);
            // The verdict line belongs to the job's own run: this one is a note.
            if let Some(at) = log
                .windows(jobfile::tools::VERDICT_PREFIX.len())
                .rposition(|w| w == jobfile::tools::VERDICT_PREFIX.as_bytes())
            {
                log.truncate(at);
                log.extend_from_slice(note.as_bytes());
                log.push(b'\n');
            }
            Ok(Built::Layer(layer, log))
        }
        Some(st) => {
            let mut result = vec![0u8; STATUS_DISK as usize];
            std::os::unix::fs::FileExt::read_exact_at(&status_disk, &mut result, 0)?;
            log::info!("job {label}: its packages could not be installed: {}", st.message.as_deref().unwrap_or("?"));
            Ok(Built::InstallFailed(result, vm.console.text()))
        }
        None => {
            let why = format!("the layer's build gave no status (QEMU: {:?}, after {secs:.1} s)", vm.status);
            let log = vm.console.finish(&format!("failed: {why}"));
            Ok(Built::Broken(why, log))
        }
    }
}

/// The VM's own cgroup `name`, where the host has cgroups: guest memory
/// plus room for QEMU itself (TCG's translation cache among it).
fn vm_cgroup(limits: &Limits, name: &str) -> io::Result<Option<cgroup::Group>> {
    match &limits.cgroups {
        Some(parent) => Ok(Some(parent.create(name, (limits.memory_mib + 1024) << 20, 1024, limits.cpus)?)),
        None => Ok(None),
    }
}

/// A layer's overlay, for a job to boot from (read-only; QEMU's snapshot takes the writes).
fn open_layer(layer: &Layer) -> io::Result<File> {
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(layer.disk())
}

/// A VM whose init never said it started: back in the queue once, without
/// counting against the job; the second time in a row, to failed/ with the console.
fn no_boot(dirs: &Dirs, file_name: &OsStr, job: &JobName, limit: Duration, vm: qemu::VmRun) -> io::Result<Ending> {
    let label = job.input_file_name();
    if queue::note_no_boot(dirs, file_name)? {
        log::warn!(
            "job {label}: the VM did not boot within {} s; killed, and the job goes back to the queue once",
            limit.as_secs()
        );
        queue::requeue(dirs, file_name)?;
        return Ok(Ending::Requeued);
    }
    queue::forget_no_boot(dirs, file_name);
    let reason = format!(
        "the VM did not boot within {} s, twice in a row (construir-init never said it started); the image or this host is broken",
        limit.as_secs()
    );
    let log = vm.console.finish(&format!("failed: {reason}"));
    fail(dirs, job, "no_boot", &dirs.host_dir.join(file_name), &reason, Some(&log))
}

/// Sends a claimed job to failed/ without a result; `result` is the word metrics count it under.
fn fail(
    dirs: &Dirs,
    job: &JobName,
    result: &str,
    claimed: &Path,
    reason: &str,
    log: Option<&[u8]>,
) -> io::Result<Ending> {
    let path = queue::fail(dirs, claimed, reason, log)?;
    metrics::job_finished(result, job.image());
    Ok(Ending::Failed { path, reason: reason.to_owned() })
}

/// The file the console goes to as it arrives (see `queue::live_console`);
/// none if it cannot be made (the job still runs, and its log still lands).
fn create_live_console(dirs: &Dirs, file_name: &OsStr) -> Option<File> {
    let path = queue::live_console(dirs, file_name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o644)
        .open(&path);
    file.map_err(|e| log::warn!("cannot write the live console to {}: {e}", path.display())).ok()
}

/// The status at the start of the working copy (see `jobfile::read_status`).
pub fn read_status(disk: &File) -> Option<JobStatus> {
    jobfile::read_status(ReadAt::new(disk))
}

fn verdict(st: &JobStatus, how: &str, total: Duration) -> String {
    let mut v = st.result.as_str().to_owned();
    if let Some(code) = st.exit_code {
        v.push_str(&format!(" (exit code {code})"));
    }
    if let Some(sig) = st.signal {
        v.push_str(&format!(" (signal {sig})"));
    }
    if let Some(d) = st.duration_secs {
        v.push_str(&format!("; the job ran {d:.1} s"));
    }
    v.push_str(&format!("; {how}; {:.1} s from claim to result", total.as_secs_f64()));
    if let Some(m) = &st.message {
        v.push_str(&format!("; {}", jobfile::sanitize(m.as_bytes())));
    }
    v
}

fn stderr_note(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", jobfile::sanitize(stderr.lines().last().unwrap_or_default().as_bytes()))
    }
}
