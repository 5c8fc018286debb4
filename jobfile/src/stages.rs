//! Where a job's time went, stage by stage, counted from its claim.
//!
//! The host's stages before any VM (`resolve`, `fetch`, `layer`) are told
//! to the guest on its command line (`construir.stages=resolve:1.234,…`);
//! the guest adds its own (`boot`: the kernel's start to init's, `unpack`,
//! `job`) and writes them all in `job_status.json` as `stages`. The host's
//! verdict line names its own view of the VM (`boot` from QEMU's start,
//! `job`, `pack`: the rest of the VM's life) after those before it.
//! Stage times are times: two runs of a verified rebuild are compared
//! without them (`rebuild::STATUS_TIMES`).

use serde::{Deserialize, Serialize};

/// One stage and the seconds it took (to the millisecond).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTime {
    pub stage: String,
    pub secs: f64,
}

impl StageTime {
    pub fn new(stage: &str, took: std::time::Duration) -> StageTime {
        StageTime { stage: stage.to_owned(), secs: (took.as_secs_f64() * 1000.0).round() / 1000.0 }
    }
}

/// The host's stages before the VM, in order: the only ones a command line may name.
pub const BEFORE_VM: [&str; 3] = ["resolve", "fetch", "layer"];

/// The guest's own, in order.
pub const IN_GUEST: [&str; 3] = ["boot", "unpack", "job"];

/// `resolve:1.234,fetch:0.2` for `construir.stages=`.
pub fn to_cmdline(stages: &[StageTime]) -> String {
    stages.iter().map(|s| format!("{}:{}", s.stage, s.secs)).collect::<Vec<_>>().join(",")
}

/// Reads `construir.stages=`: the host's stages, each at most once; a word
/// naming another stage, or no time, is reported and left out.
pub fn from_cmdline(value: &str) -> (Vec<StageTime>, Vec<String>) {
    let (mut stages, mut bad) = (Vec::<StageTime>::new(), Vec::new());
    for word in value.split(',').filter(|w| !w.is_empty()) {
        let parsed = word.split_once(':').and_then(|(stage, secs)| {
            let secs = secs.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)?;
            let known = BEFORE_VM.contains(&stage) && !stages.iter().any(|s| s.stage == stage);
            known.then(|| StageTime { stage: stage.to_owned(), secs })
        });
        match parsed {
            Some(s) => stages.push(s),
            None => bad.push(format!("ignoring stage {word:?}")),
        }
    }
    (stages, bad)
}

/// `resolve 1.2 s, fetch 0.0 s, boot 1.4 s`.
pub fn summary(stages: &[StageTime]) -> String {
    stages.iter().map(|s| format!("{} {:.1} s", s.stage, s.secs)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_hosts_stages_cross_the_command_line_and_nothing_else_does() {
        let stages = vec![
            StageTime::new("resolve", Duration::from_micros(1_234_567)),
            StageTime::new("fetch", Duration::from_millis(200)),
            StageTime::new("layer", Duration::ZERO),
        ];
        assert_eq!(to_cmdline(&stages), "resolve:1.235,fetch:0.2,layer:0");
        assert_eq!(from_cmdline(&to_cmdline(&stages)), (stages.clone(), vec![]));
        assert_eq!(summary(&stages), "resolve 1.2 s, fetch 0.2 s, layer 0.0 s");
        let (read, bad) = from_cmdline("resolve:1,job:5,fetch:x,fetch:-1,layer:inf,resolve:2,fetch");
        assert_eq!(read, vec![StageTime { stage: "resolve".into(), secs: 1.0 }]);
        assert_eq!(bad.len(), 6, "{bad:?}");
    }
}
