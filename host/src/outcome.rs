//! How a run ends in `done/`: what came of it in words (the verdict, the
//! log's last line) and its delivery, the provenance signed over the
//! result as staged. The worker and a debug job's end (`debug_job`) both
//! end this way.

use std::ffi::OsStr;
use std::io;
use std::time::Instant;

use jobfile::JobStatus;

use crate::claim::Claim;
use crate::intake::{Intake, DISK};
use crate::metrics;
use crate::provenance::Record;
use crate::queue::{self, Ending};
use crate::stages::Stages;

/// What a run brings to its end besides the VM.
pub struct Ran {
    /// The log's start (a layer's build).
    pub preface: Vec<u8>,
    pub record: Option<Record>,
}

/// Lands a job's result (the working copy, with `st` as its status) in
/// done/, its provenance signed over it as staged.
pub fn deliver(
    claim: &Claim,
    intake: &Intake,
    st: &JobStatus,
    log: &[u8],
    verdict: String,
    record: Option<&Record>,
) -> io::Result<Ending> {
    let (dirs, limits, job) = (claim.dirs, claim.limits, claim.job);
    let delivering = Instant::now();
    let tag = queue::unique_tag(&limits.host_id);
    let dir = &intake.prepared.dir.fd;
    let mut staged = queue::stage(dirs, dir, OsStr::new(DISK), &intake.disk, claim.scanned.size, job, log, &tag)?;
    staged.provenance = limits.signer.as_ref().zip(record).and_then(|(signer, record)| {
        let result = dirs.done.join(&staged.result);
        let signing = Instant::now();
        let signed =
            crate::provenance::sign_staged(&dirs.done, signer, record, job, &result, log, &limits.host_id, &tag)
                .inspect_err(|e| {
                    log::error!("job {}: cannot sign its provenance: {}", claim.label(), jobfile::error_chain(e))
                })
                .ok()?;
        log::info!(
            "job {}: provenance signed: job file hashed in {} ms, result and its files hashed and signed in {} ms",
            claim.label(),
            record.hashed.as_millis(),
            signing.elapsed().as_millis()
        );
        Some(signed)
    });
    queue::note_delivery(dirs, claim.file_name, &staged)?;
    let delivery = queue::land(dirs, job, &staged)?;
    log::info!(
        "job {}: delivered {:.2} s after its result was read; {:.1} s from claim to delivery",
        claim.label(),
        delivering.elapsed().as_secs_f64(),
        intake.stages.since_claim().as_secs_f64()
    );
    metrics::job_finished(st.result.as_str(), job.image());
    if let Some(secs) = st.duration_secs {
        metrics::observe_run(job.image(), secs);
    }
    queue::end_delivered(dirs, claim.file_name, job, delivery, verdict)
}

/// The verdict: how the job ended, how long it ran, `how` the VM ended, where the time went.
pub fn verdict(st: &JobStatus, how: &str, stages: &Stages) -> String {
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
    v.push_str(&format!("; {how}; {}", stages.from_claim_to_result()));
    if let Some(m) = &st.message {
        v.push_str(&format!("; {}", jobfile::sanitize(m.as_bytes())));
    }
    v
}
