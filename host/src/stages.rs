//! A job's time on this host, from its claim, stage by stage
//! (`jobfile::stages`): resolving and fetching its packages and building
//! their layer before any VM (told to the guest, which writes them in
//! `job_status.json`), then the VM as the host saw it: `boot` (QEMU's start
//! to init's first line), `job` (as the guest timed it) and `pack` (the rest
//! of the VM's life: unpacking, packing, syncing, powering off). The
//! verdict line names them all; delivery, which comes after the log is
//! final, is in the host's own log.

use std::time::{Duration, Instant};

use jobfile::stages::StageTime;

#[derive(Debug, Clone)]
pub struct Stages {
    claimed: Instant,
    /// The stages before the VM, in order.
    before_vm: Vec<StageTime>,
    /// The VM's, once it ended.
    vm: Vec<StageTime>,
}

impl Stages {
    /// Counting from the claim, at `claimed`.
    pub fn from(claimed: Instant) -> Stages {
        Stages { claimed, before_vm: Vec::new(), vm: Vec::new() }
    }

    /// A stage before the VM (`jobfile::stages::BEFORE_VM`) took `took`.
    pub fn before_vm(&mut self, stage: &str, took: Duration) {
        self.before_vm.push(StageTime::new(stage, took));
    }

    /// The stages before the VM, for the guest's command line.
    pub fn for_guest(&self) -> &[StageTime] {
        &self.before_vm
    }

    /// The VM's stages: booted after `booted` (none when init never said
    /// so), the job ran `job_secs` (as the guest timed it), the VM lived `elapsed`.
    pub fn vm(&mut self, booted: Option<Duration>, job_secs: Option<f64>, elapsed: Duration) {
        let job = job_secs.and_then(|s| Duration::try_from_secs_f64(s).ok());
        self.vm.clear();
        self.vm.extend(booted.map(|b| StageTime::new("boot", b)));
        self.vm.extend(job.map(|j| StageTime::new("job", j)));
        if let Some(boot) = booted {
            let rest = elapsed.saturating_sub(boot).saturating_sub(job.unwrap_or_default());
            self.vm.push(StageTime::new("pack", rest));
        }
    }

    /// The time since the claim.
    pub fn since_claim(&self) -> Duration {
        self.claimed.elapsed()
    }

    /// `12.3 s from claim to result (resolve 1.1 s, fetch 0.0 s, boot 1.4 s, job 9.2 s, pack 0.6 s)`.
    pub fn from_claim_to_result(&self) -> String {
        let all: Vec<StageTime> = self.before_vm.iter().chain(&self.vm).cloned().collect();
        let total = format!("{:.1} s from claim to result", self.since_claim().as_secs_f64());
        if all.is_empty() {
            total
        } else {
            format!("{total} ({})", jobfile::stages::summary(&all))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_counts_from_the_claim_and_names_each_stage() {
        let mut stages = Stages::from(Instant::now() - Duration::from_secs(12));
        stages.before_vm("resolve", Duration::from_millis(1100));
        stages.before_vm("fetch", Duration::from_millis(20));
        assert_eq!(stages.for_guest().len(), 2);
        stages.vm(Some(Duration::from_millis(1400)), Some(9.2), Duration::from_millis(11_200));
        let line = stages.from_claim_to_result();
        assert!(line.starts_with("12.0 s from claim to result (") || line.starts_with("12.1 s"), "{line}");
        assert!(line.ends_with("(resolve 1.1 s, fetch 0.0 s, boot 1.4 s, job 9.2 s, pack 0.6 s)"), "{line}");
        // A VM that never booted has no boot, and no pack is made up for it.
        stages.vm(None, None, Duration::from_secs(30));
        assert!(line.contains("boot") && !stages.from_claim_to_result().contains("boot"));
        assert!(Stages::from(Instant::now()).from_claim_to_result().ends_with("s from claim to result"));
    }
}
