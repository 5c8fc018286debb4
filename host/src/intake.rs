//! What a host reads of a claimed job before any VM: its image, its
//! working copy (taken out of its submitter's hands), its digest for the
//! provenance, its terms, its declaration and the plan for its packages.
//! A job refused here ends in `failed/` with why, without a VM.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::time::{Duration, Instant};

use jobfile::deps::Declaration;
use jobfile::layout::{Member, Terms};

use crate::claim::Claim;
use crate::image::Image;
use crate::packages::{self, NoPlan, Plan};
use crate::qemu;
use crate::queue::{self, Ending};
use crate::stages::Stages;

/// The working copy's name in the VM's directory.
pub const DISK: &str = "disk";

/// A claimed job, ready for its VM.
pub struct Intake {
    pub image: Image,
    /// The VM's directory (and uid), with the working copy in it.
    pub prepared: qemu::Prepared,
    /// The working copy, and its size in whole sectors.
    pub disk: File,
    pub size: u64,
    /// When it was claimed, RFC 3339.
    pub claimed_at: String,
    /// The job file's sha256 as it came (on a host that signs), and how long that took.
    pub job_sha256: Option<String>,
    pub hashed: Duration,
    pub terms: Terms,
    pub declaration: Option<(Declaration, Vec<String>)>,
    /// Whether it declares packages (the guest is told so).
    pub declared: bool,
    /// The plan for its packages (taken by the run, which leaves `Plain`).
    pub plan: Plan,
    /// Its time from the claim, stage by stage.
    pub stages: Stages,
}

/// Reads the claimed job; `Err` is how it ended when it cannot run.
pub fn take(claim: &Claim) -> io::Result<Result<Intake, Ending>> {
    let mut stages = Stages::from(Instant::now());
    let (limits, job, label) = (claim.limits, claim.job, claim.label());
    let image = match Image::load(&claim.dirs.images, job.image()) {
        Ok(image) => image,
        Err(e) => {
            let reason = format!("unknown image i{}: {}", job.image(), jobfile::error_chain(&e));
            return claim.fail("unknown_image", &reason, None).map(Err);
        }
    };
    if let Some(why) = limits.emulators.refusal(image.manifest.arch) {
        return claim.fail("unsupported_arch", &format!("image i{}: {why}", job.image()), None).map(Err);
    }
    let prepared = match limits.confiner.prepare(&claim.dirs.work.join(format!("{}.{label}", limits.host_id))) {
        Ok(p) => p,
        Err(e) => {
            log::error!("job {label}: cannot prepare its VM: {}", jobfile::error_chain(&e));
            return claim.requeue("its VM could not be prepared").map(Err);
        }
    };
    let (disk, size) = match queue::take_claimed(&claim.path(), claim.scanned, &prepared.dir.fd, OsStr::new(DISK)) {
        Ok(taken) => taken,
        Err(e) => return claim.fail("not_taken", &format!("cannot take the claimed job file: {e}"), None).map(Err),
    };
    // For its provenance: the job file as it came, before any VM has it.
    let claimed_at = jobfile::units::rfc3339(std::time::SystemTime::now());
    let hashing = Instant::now();
    let job_sha256 = match limits.signer {
        Some(_) => Some(crate::files::sha256(&disk)?),
        None => None,
    };
    let hashed = hashing.elapsed();
    let (terms, declaration, plan) = match read_terms_and_plan(claim, &image, &disk, &mut stages)? {
        Ok(read) => read,
        Err(ending) => return Ok(Err(ending)),
    };
    let declared = plan.declared();
    Ok(Ok(Intake {
        image,
        prepared,
        disk,
        size,
        claimed_at,
        job_sha256,
        hashed,
        terms,
        declaration,
        declared,
        plan,
        stages,
    }))
}

type Planned = (Terms, Option<(Declaration, Vec<String>)>, Plan);

/// Its terms (a verified rebuild's run gets the name and SOURCE_DATE_EPOCH
/// its other run gets too) and its packages: refused here, before any VM,
/// when they cannot be had.
fn read_terms_and_plan(
    claim: &Claim,
    image: &Image,
    disk: &File,
    stages: &mut Stages,
) -> io::Result<Result<Planned, Ending>> {
    let terms = match Terms::read(&claim.dirs.running, claim.file_name) {
        Ok(t) => t,
        Err(bad) if bad.member == Member::Pin => return claim.fail("bad_packages", &bad.to_string(), None).map(Err),
        Err(bad) => return claim.fail("bad_terms", &bad.to_string(), None).map(Err),
    };
    let declaration = match packages::read_declaration(disk) {
        Ok(d) => d,
        Err(why) => return claim.fail("bad_packages", &format!("packages: {why}"), None).map(Err),
    };
    let halt = || claim.halted();
    let label = claim.label();
    let pinned = terms.pin.clone();
    match packages::plan(claim.limits.packages.as_deref(), image, declaration.as_ref(), &label, pinned, &halt, stages) {
        Ok(plan) => Ok(Ok((terms, declaration, plan))),
        Err(NoPlan::Refused(why)) => claim.fail("bad_packages", &format!("packages: {why}"), None).map(Err),
        Err(NoPlan::Halted) if claim.cancelled() => {
            let reason = "cancelled at its submitter's request while its packages were fetched";
            log::info!("job {label}: {reason}");
            claim.fail("cancelled", reason, None).map(Err)
        }
        Err(NoPlan::Halted) => claim.requeue("the host is stopping; its packages were not all fetched").map(Err),
    }
}
