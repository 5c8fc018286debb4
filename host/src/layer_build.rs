//! Building a package layer for a job: a new overlay on its image's root
//! disk, booted writable with the packages on a read-only disk and a status
//! disk, in a VM confined like any job's; kept when construir-init says it
//! installed them.

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::time::Duration;

use jobfile::deps::Resolution;

use crate::claim::Claim;
use crate::files::read_status;
use crate::image::{self, Image};
use crate::layers::{self, Layer};
use crate::packages;
use crate::qemu::{self, Cut, LayerDisk, VmRun, VmSpec};

/// How a layer's build ended.
pub enum Built {
    /// Built and kept; the build's console, for the start of the job's log.
    Layer(Box<Layer>, Vec<u8>),
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

/// What a layer's build VM is given, besides the image.
struct Disks {
    overlay: File,
    packages: File,
    status: File,
}

/// Builds the layer `key` with `resolution`'s packages (`fetched`) for the
/// claimed job, in a VM in `prepared`.
pub fn build(
    claim: &Claim,
    prepared: &qemu::Prepared,
    image: &Image,
    key: &str,
    resolution: &Resolution,
    fetched: &deps::Fetched,
) -> io::Result<Built> {
    let pk = claim.limits.packages.as_ref().expect("a layer is planned only when the host has packages");
    let Some(root_name) = &image.manifest.root_disk else {
        return Ok(Built::Broken(format!("image i{} has no root disk to build a layer on", image.number), Vec::new()));
    };
    let base = packages::base_sha256(image).unwrap_or_default();
    let staging = pk.layers.staging(key)?;
    let overlay = staging.path().join(layers::DISK);
    if let Err(e) = create_overlay(&image.dir.join(root_name), &overlay) {
        return Ok(Built::Broken(format!("cannot create the layer's overlay: {e}"), Vec::new()));
    }
    // The package disk and the status disk live in the VM's own directory, not in the layer.
    let scratch = tempfile::Builder::new().prefix(".packages.").tempdir_in(pk.layers.dir())?;
    let disks = match disks(scratch.path(), &overlay, resolution, fetched)? {
        Ok(disks) => disks,
        Err(why) => return Ok(Built::Broken(why, Vec::new())),
    };
    let status = disks.status.try_clone()?;
    log::info!("job {}: installing {} packages into layer {key}", claim.label(), resolution.install.len());
    let vm = match boot(claim, prepared, image, disks)? {
        Ok(vm) => vm,
        Err(ended) => return Ok(ended),
    };
    let secs = vm.elapsed.as_secs_f64();
    let powered_off = vm.status.is_some_and(|st| st.success());
    let st = if powered_off { read_status(&status) } else { None };
    match st {
        Some(st) if st.result == jobfile::Outcome::Ok => {
            drop(status);
            let layer = pk.layers.commit(staging, key, &image.number, &base, resolution)?;
            log::info!("job {}: layer {key} built in {secs:.1} s ({} bytes)", claim.label(), layer.record.bytes);
            Ok(Built::Layer(Box::new(layer), installed_log(vm, key, resolution.install.len())))
        }
        Some(st) => {
            let mut result = vec![0u8; STATUS_DISK as usize];
            std::os::unix::fs::FileExt::read_exact_at(&status, &mut result, 0)?;
            let why = st.message.as_deref().unwrap_or("?");
            log::info!("job {}: its packages could not be installed: {why}", claim.label());
            Ok(Built::InstallFailed(result, vm.console.text()))
        }
        None => {
            let why = format!("the layer's build gave no status (QEMU: {:?}, after {secs:.1} s)", vm.status);
            let log = vm.console.finish(&format!("failed: {why}"));
            Ok(Built::Broken(why, log))
        }
    }
}

/// Boots the build VM and waits for its end: the VM when it ran to its
/// own end, how the build ended when it did not.
fn boot(claim: &Claim, prepared: &qemu::Prepared, image: &Image, disks: Disks) -> io::Result<Result<VmRun, Built>> {
    let spec = spec(claim, prepared, image, disks)?;
    let limits = claim.limits;
    let ran = qemu::run(&spec, prepared.confinement(&limits.confiner), limits.bounds(), claim.stop, claim.cancel);
    Ok(match ran {
        Ok(vm) => cut_short(claim, vm),
        Err(e) => Err(Built::Broken(format!("cannot run QEMU: {}", jobfile::error_chain(&e)), Vec::new())),
    })
}

/// The build VM's disks: the overlay it installs into, the packages (a raw
/// disk written in `scratch`) and an empty status disk. `Err` inside: why
/// the package disk cannot be written.
fn disks(
    scratch: &Path,
    overlay: &Path,
    resolution: &Resolution,
    fetched: &deps::Fetched,
) -> io::Result<Result<Disks, String>> {
    let raw = scratch.join("packages.raw");
    if let Err(e) = deps::disk::write(resolution, fetched, scratch, &raw) {
        return Ok(Err(format!("cannot write the package disk: {e}")));
    }
    let status = fs::OpenOptions::new().read(true).write(true).create_new(true).open(scratch.join("status"))?;
    status.set_len(STATUS_DISK)?;
    Ok(Ok(Disks {
        overlay: fs::OpenOptions::new().read(true).write(true).open(overlay)?,
        packages: File::open(&raw)?,
        status,
    }))
}

/// `qemu-img create` of a qcow2 overlay at `overlay` backed by `root`.
fn create_overlay(root: &Path, overlay: &Path) -> Result<(), String> {
    jobfile::command::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(root)
            .arg(overlay),
        "qemu-img create",
        Duration::from_secs(60),
        |_| {},
    )
    .map(drop)
    .map_err(|e| jobfile::error_chain(&e))
}

/// The layer's build VM.
fn spec(claim: &Claim, prepared: &qemu::Prepared, image: &Image, disks: Disks) -> io::Result<VmSpec> {
    let (limits, job, label) = (claim.limits, claim.job, claim.label());
    let guest = jobfile::cmdline::Settings {
        job_device: image.manifest.job_device.clone().into(),
        packages: Some("/dev/vdc".into()),
        deadline: Some(limits.guest_deadline()),
        name: Some(job.name().to_owned()),
        image: Some(job.image().to_owned()),
        console_max: limits.console_limit as u64,
        ..Default::default()
    };
    let boot = image.open()?;
    let root_size = boot.root_disk.as_ref().and_then(image::qcow2_virtual_size).unwrap_or(0);
    let group = limits.vm_cgroup(&format!("{}.{label}.layer", limits.host_id))?;
    let cmdline = format!("{} {}", image.manifest.cmdline, guest.to_cmdline());
    let name = format!("construir.{}.{label}.layer", limits.host_id);
    Ok(VmSpec {
        layer: Some(LayerDisk { file: disks.overlay, write: true }),
        packages_disk: Some(disks.packages),
        job_disk: Some(disks.status),
        networking: false,
        // The overlay grows at most to the root disk's size.
        file_size_limit: root_size + (1 << 30),
        ..limits.vm_spec(prepared, boot, &cmdline, group.as_ref(), name)
    })
}

/// How a build VM that was cut short ended the build; the VM when it was not.
fn cut_short(claim: &Claim, vm: VmRun) -> Result<VmRun, Built> {
    let limits = claim.limits;
    let secs = vm.elapsed.as_secs_f64();
    let Some(cut) = vm.cut else { return Ok(vm) };
    let why = match cut {
        Cut::Stop => return Err(Built::Stopped),
        Cut::Cancel => {
            format!("cancelled at its submitter's request after {secs:.1} s, while its packages were installed")
        }
        Cut::Deadline => format!(
            "installing its packages took longer than the job timeout ({} s) plus grace",
            limits.timeout.as_secs()
        ),
        Cut::Silence => {
            format!("installing its packages printed nothing for {} s", limits.silence.map_or(0, |s| s.as_secs()))
        }
        Cut::NoBoot => format!("the VM that installs its packages did not boot within {} s", limits.boot.as_secs()),
    };
    let log = vm.console.finish(&format!("failed: {why}"));
    Err(Built::Broken(why, log))
}

/// The build's console, for the start of the job's log, ending in a note
/// where its verdict line was (the verdict belongs to the job's own run).
fn installed_log(vm: VmRun, key: &str, packages: usize) -> Vec<u8> {
    let secs = vm.elapsed.as_secs_f64();
    let note = format!(
        "[construir-host: installed {packages} packages into layer {key} in {secs:.1} s; the job boots from it]"
    );
    let mut log = vm.console.finish(&note);
    if let Some(at) =
        log.windows(jobfile::tools::VERDICT_PREFIX.len()).rposition(|w| w == jobfile::tools::VERDICT_PREFIX.as_bytes())
    {
        log.truncate(at);
        log.extend_from_slice(note.as_bytes());
        log.push(b'\n');
    }
    log
}
