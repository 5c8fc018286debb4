//! One job, from claimed to delivered: working copy, VM, verdict, result.
//! Whatever happens, the claimed file ends in exactly one of `done/`
//! (after its result is durable), `failed/`, or back in `queue/` when the
//! host is stopping. What comes before the VM is `intake`'s; a layer's
//! build is `layer_build`'s; the caches lent are `lending`'s.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobfile::caches::Given;
use jobfile::deps::LayerRecord;
use jobfile::JobName;

use crate::caches::{self, Checkout};
use crate::claim::Claim;
use crate::debug::DebugLimits;
use crate::debug_job;
use crate::files::read_status;
use crate::image;
use crate::intake::{self, Intake};
use crate::layer_build::{self, Built};
use crate::layers::Layer;
use crate::lending;
use crate::limits::Limits;
use crate::metrics;
use crate::outcome::{deliver, verdict, Ran};
use crate::packages::Plan;
use crate::provenance::{Inputs, Record};
use crate::qemu::{self, Confinement, Cut, LayerDisk, VmRun, VmSpec, Watched};
use crate::queue::{self, Dirs, Ending, Scanned};

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
    let claim = Claim { dirs, limits, file_name, job, scanned, stop, cancel };
    // A note left by an earlier claim of the same name must not speak for this one.
    queue::drop_delivery_note(dirs, file_name)?;
    let mut intake = match intake::take(&claim)? {
        Ok(intake) => intake,
        Err(ending) => return Ok(ending),
    };
    let (layer, preface) = match layer_for(&claim, &mut intake)? {
        Ok(layer) => layer,
        Err(ending) => return Ok(ending),
    };
    // Its build caches: each lent as a working copy of its last kept version.
    let names = intake.declaration.as_ref().map(|(d, _)| d.caches.clone()).unwrap_or_default();
    let owner = intake.terms.owner.as_deref();
    let (checkouts, given) = lending::lend(dirs, limits, owner, job, &names, intake.terms.rebuild.is_some());
    let (debug, port) = debug_job::prepare(&claim, &intake)?.unzip();
    let record = record(&claim, &intake, &given, layer.as_ref().map(|l| &l.record), debug.is_some());
    let spec = match spec(&claim, &intake, layer.as_ref(), &checkouts, given, debug.as_ref().map(|d| d.limits))? {
        Ok(spec) => VmSpec { debug_port: port, ..spec },
        Err(ending) => return Ok(ending),
    };
    log_boot(&claim, &intake);
    let confinement = intake.prepared.confinement(&limits.confiner);
    let watched = qemu::start(&spec, confinement, limits.bounds())
        .and_then(|mut vm| Ok((vm.watch(stop, cancel, debug.is_some())?, vm)));
    let _ = fs::remove_file(queue::live_console(dirs, file_name));
    let (watched, vm) = match watched {
        Ok(w) => w,
        Err(e) => return claim.fail("qemu_error", &format!("cannot run QEMU: {}", jobfile::error_chain(&e)), None),
    };
    let ran = Ran { preface, record };
    if let (Watched::SessionOpen, Some(debug)) = (watched, debug) {
        return debug_job::opened(&claim, &mut intake, vm, checkouts, ran, debug);
    }
    let vm = vm.finish(match watched {
        Watched::Cut(cut) => Some(cut),
        Watched::Ended | Watched::SessionOpen => None,
    });
    drop(spec); // QEMU is gone: nothing else holds the working copy now
    let vm = match cut_short(&claim, vm)? {
        Ok(vm) => vm,
        Err(ending) => return Ok(ending),
    };
    ended(&claim, &mut intake, vm, checkouts, ran)
}

/// The layer a job boots from (`None`: its image alone), and the console
/// its build left for the start of the job's log.
type Booting = (Option<Layer>, Vec<u8>);

/// The layer the job boots from, built first when it is not there yet, and
/// the build's console for the start of the job's log. `Err` is how the job
/// ended when the build did not make one: a result of the failed install,
/// `failed/`, or back in the queue.
fn layer_for(claim: &Claim, intake: &mut Intake) -> io::Result<Result<Booting, Ending>> {
    let label = claim.label();
    let (key, resolution, fetched) = match std::mem::replace(&mut intake.plan, Plan::Plain) {
        Plan::Plain | Plan::Satisfied => return Ok(Ok((None, Vec::new()))),
        Plan::Layer(layer) => {
            let packages = layer.record.install.len();
            log::info!("job {label}: booting from layer {} ({packages} packages)", layer.record.key);
            return Ok(Ok((Some(layer), Vec::new())));
        }
        Plan::Build { key, resolution, fetched } => (key, resolution, fetched),
    };
    let building = Instant::now();
    let built = layer_build::build(claim, &intake.prepared, &intake.image, &key, &resolution, &fetched)?;
    intake.stages.before_vm("layer", building.elapsed());
    match built {
        Built::Layer(layer, console) => Ok(Ok((Some(*layer), console))),
        Built::InstallFailed(result, console) => {
            // The job's result is the installation's: its status, apt's last words, its console.
            jobfile::fallback::write_onto(&mut intake.disk, &result)?;
            let st = read_status(&intake.disk).unwrap_or_default();
            let verdict = verdict(&st, "the job did not run", &intake.stages);
            let mut log = console;
            log.extend_from_slice(format!("{}{verdict}\n", jobfile::tools::VERDICT_PREFIX).as_bytes());
            let record = record(claim, intake, &[], None, false);
            deliver(claim, intake, &st, &log, verdict, record.as_ref()).map(Err)
        }
        Built::Broken(reason, log) => claim.fail("layer_failed", &reason, Some(&log)).map(Err),
        Built::Stopped => claim.requeue("stopped while its layer was built").map(Err),
    }
}

/// What its provenance names, once the caches it is lent and the layer it
/// boots are known; `None` on a host that does not sign.
fn record(claim: &Claim, intake: &Intake, given: &[Given], layer: Option<&LayerRecord>, debug: bool) -> Option<Record> {
    let signer = claim.limits.signer.as_ref()?;
    let inputs = Inputs {
        file_name: claim.file_name,
        job_sha256: intake.job_sha256.clone()?,
        image: &intake.image,
        packages: intake.declaration.as_ref().map(|(d, _)| d.packages.clone()).unwrap_or_default(),
        caches: given,
        layer,
        owner: intake.terms.owner.as_deref().or(Some(caches::LOCAL_OWNER)),
        rebuild: intake.terms.rebuild.as_ref(),
        debug,
        env: intake.terms.env.as_ref(),
    };
    Some(Record::new(
        inputs,
        intake.claimed_at.clone(),
        claim.limits.machine(signer, intake.image.manifest.arch),
        intake.hashed,
    ))
}

/// The job's VM: its image (and layer) booted with the working copy and
/// the caches lent. `Err` is how the job ended when its image is incomplete.
fn spec(
    claim: &Claim,
    intake: &Intake,
    layer: Option<&Layer>,
    checkouts: &[Checkout],
    given: Vec<Given>,
    debug: Option<DebugLimits>,
) -> io::Result<Result<VmSpec, Ending>> {
    let (limits, job, label) = (claim.limits, claim.job, claim.label());
    let (manifest, rebuild, env) = (&intake.image.manifest, intake.terms.rebuild.as_ref(), intake.terms.env.as_ref());
    let guest = jobfile::cmdline::Settings {
        job_device: manifest.job_device.clone().into(),
        layer: layer.map(|l| l.record.key.clone()),
        declared: intake.declared,
        timeout: Some(limits.timeout),
        // A debug session's time comes after the job's: the guest's watchdog waits for it too.
        deadline: Some(limits.guest_deadline() + debug.map_or(Duration::ZERO, |d| d.max)),
        // A verified rebuild's run, then what the server fixed, then the queue's name.
        name: Some(
            rebuild.map(|t| &t.name).or(env.map(|e| &e.name)).map_or_else(|| job.name().to_owned(), Clone::clone),
        ),
        image: Some(job.image().to_owned()),
        console_max: limits.console_limit as u64,
        caches: given,
        epoch: rebuild.map(|t| t.epoch).or(env.map(|e| e.epoch)),
        stages: intake.stages.for_guest().to_vec(),
        debug: debug.is_some(),
        ..Default::default()
    };
    let boot = match intake.image.open() {
        Ok(f) => f,
        Err(e) => {
            let reason = format!("image i{} is incomplete: {e}", job.image());
            return claim.fail("image_incomplete", &reason, None).map(Err);
        }
    };
    let root_size = boot.root_disk.as_ref().and_then(image::qcow2_virtual_size).unwrap_or(0);
    let group = limits.vm_cgroup(&format!("{}.{label}", limits.host_id))?;
    let biggest_cache = checkouts.iter().map(|c| c.len).max().unwrap_or(0);
    let cmdline = format!("{} {}", manifest.cmdline, guest.to_cmdline());
    let name = format!("construir.{}.{label}", limits.host_id);
    Ok(Ok(VmSpec {
        layer: match layer {
            Some(l) => Some(LayerDisk { file: open_layer(l)?, write: false }),
            None => None,
        },
        job_disk: Some(intake.disk.try_clone()?),
        cache_disks: checkouts.iter().map(|c| c.file.try_clone()).collect::<io::Result<_>>()?,
        // The job disk never grows; the snapshot overlay grows at most to the root disk's size;
        // a cache disk is written within its size.
        file_size_limit: intake.size.max(root_size).max(biggest_cache) + (1 << 30),
        live_console: create_live_console(claim.dirs, claim.file_name),
        ..limits.vm_spec(&intake.prepared, boot, &cmdline, group.as_ref(), name)
    }))
}

fn log_boot(claim: &Claim, intake: &Intake) {
    let limits = claim.limits;
    let jailed = matches!(intake.prepared.confinement(&limits.confiner), Confinement::Jailed { .. });
    log::info!(
        "job {}: booting image i{} ({}, {} MiB, {} CPUs, job disk {} bytes{})",
        claim.label(),
        claim.job.image(),
        limits.accel(intake.image.manifest.arch).name(),
        limits.memory_mib,
        limits.cpus,
        intake.size,
        match &intake.prepared.lease {
            Some(l) if jailed => format!(", QEMU as uid {} in its own namespaces and root", l.id.uid),
            Some(l) => format!(", QEMU as uid {}", l.id.uid),
            None => String::new(),
        }
    );
}

/// A VM the host stopped itself: for the host's stop (back in the queue),
/// a cancel (`failed/`) or no boot. Counted in the metrics; the VM when it
/// ran to its own end or past a limit.
fn cut_short(claim: &Claim, vm: VmRun) -> io::Result<Result<VmRun, Ending>> {
    if let Some(took) = vm.booted {
        metrics::observe_boot(claim.job.image(), took);
    }
    let Some(cut) = vm.cut else { return Ok(Ok(vm)) };
    metrics::vm_killed(match cut {
        Cut::Deadline => "deadline",
        Cut::Silence => "silence",
        Cut::NoBoot => "no_boot",
        Cut::Stop => "stop",
        Cut::Cancel => "cancel",
    });
    match cut {
        Cut::Stop => claim.requeue("VM stopped because the host is stopping").map(Err),
        Cut::Cancel => {
            let reason = format!("cancelled at its submitter's request after {:.1} s", vm.elapsed.as_secs_f64());
            log::info!("job {}: {reason}", claim.label());
            let log = vm.console.finish(&format!("failed: {reason}"));
            claim.fail("cancelled", &reason, Some(&log)).map(Err)
        }
        Cut::NoBoot => no_boot(claim, vm).map(Err),
        Cut::Deadline | Cut::Silence => Ok(Ok(vm)),
    }
}

/// How the VM ended, in words for the verdict.
fn how(limits: &Limits, vm: &VmRun) -> String {
    let secs = vm.elapsed.as_secs_f64();
    match (vm.cut, &vm.status) {
        (Some(Cut::Deadline), _) => format!(
            "VM killed after {secs:.1} s: past the job timeout ({} s) plus grace ({} s)",
            limits.timeout.as_secs(),
            limits.grace.as_secs()
        ),
        (Some(Cut::Silence), _) => format!(
            "VM killed after {secs:.1} s: no console output for {} s",
            limits.silence.map_or(0, |s| s.as_secs())
        ),
        // Where no pvpanic device tells (arm64), the kernel's reboot on panic ends QEMU as a power-off would.
        (None, Some(st)) if st.success() && vm.panicked => format!("the guest kernel panicked after {secs:.1} s"),
        (_, Some(st)) if st.success() => format!("VM powered off after {secs:.1} s"),
        // pvpanic with -action panic=exit-failure: QEMU exits 1 when the guest kernel panics.
        (_, Some(st)) if st.code() == Some(1) && vm.stderr.is_empty() => {
            format!("the guest kernel panicked after {secs:.1} s")
        }
        (_, Some(st)) => format!("QEMU exited with {st} after {secs:.1} s{}", stderr_note(&vm.stderr)),
        (_, None) => "QEMU ended".to_owned(),
    }
}

/// The end of a VM that ran to its own end or past a limit: a result when
/// it powered off cleanly with a status, else `failed/`.
fn ended(claim: &Claim, intake: &mut Intake, vm: VmRun, checkouts: Vec<Checkout>, ran: Ran) -> io::Result<Ending> {
    queue::forget_no_boot(claim.dirs, claim.file_name);
    let how = how(claim.limits, &vm);
    log::info!("job {}: {how}; {} bytes of console output", claim.label(), vm.console.received());
    // Only a clean power-off means init packed and synced the result: after a
    // panic, a kill or a crash the disk may hold half a result whose status
    // (packed first) still reads well.
    let powered_off = vm.cut.is_none() && vm.status.is_some_and(|st| st.success()) && !vm.panicked;
    let status = if powered_off { read_status(&intake.disk) } else { None };
    let Some(st) = status else {
        let reason = if powered_off {
            format!("no result: {how}; the job disk holds no job_status.json")
        } else {
            format!("no result: {how}; without a clean power-off the job disk is not read")
        };
        let log = vm.console.finish(&format!("failed: {reason}"));
        return claim.fail("no_result", &reason, Some(&log));
    };
    lending::settle(claim.limits, &claim.label(), checkouts, &st);
    lending::report(claim.dirs, claim.limits);
    intake.stages.vm(vm.booted, st.duration_secs, vm.elapsed);
    let verdict = verdict(&st, &how, &intake.stages);
    let mut log = ran.preface;
    log.extend(vm.console.finish(&verdict));
    deliver(claim, intake, &st, &log, verdict, ran.record.as_ref())
}

/// A layer's overlay, for a job to boot from (read-only; QEMU's snapshot takes the writes).
fn open_layer(layer: &Layer) -> io::Result<File> {
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(layer.disk())
}

/// A VM whose init never said it started: back in the queue once, without
/// counting against the job; the second time in a row, to failed/ with the console.
fn no_boot(claim: &Claim, vm: VmRun) -> io::Result<Ending> {
    let (dirs, file_name, limit) = (claim.dirs, claim.file_name, claim.limits.boot);
    if queue::note_no_boot(dirs, file_name)? {
        log::warn!(
            "job {}: the VM did not boot within {} s; killed, and the job goes back to the queue once",
            claim.label(),
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
    claim.fail("no_boot", &reason, Some(&log))
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

fn stderr_note(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", jobfile::sanitize(stderr.lines().last().unwrap_or_default().as_bytes()))
    }
}
