//! `job_status.json`: what happened to a job, written by the guest, read by
//! the host and the submitter's tools (who must treat it as untrusted).

use serde::{Deserialize, Serialize};

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The script exited 0.
    Ok,
    /// The script exited non-zero or was killed by a signal.
    Failed,
    /// The script ran past its timeout and was killed.
    TimedOut,
    /// The script ran, but `/job` did not fit back into the job file.
    OutputTooLarge,
    /// The archive has no `bin/construir`.
    NoJobScript,
    /// The job file could not be read or unpacked.
    BadArchive,
    /// The job's packages could not be installed; its script did not run.
    InstallFailed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::OutputTooLarge => "output_too_large",
            Outcome::NoJobScript => "no_job_script",
            Outcome::BadArchive => "bad_archive",
            Outcome::InstallFailed => "install_failed",
        }
    }
}

/// The contents of `job_status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobStatus {
    pub result: Outcome,
    pub exit_code: Option<i32>,
    /// Signal number, when the script was killed by one.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// RFC 3339, UTC.
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_secs: Option<f64>,
    pub init_version: String,
    pub image: Option<String>,
    pub job: Option<String>,
    /// Bytes the script wrote to `job_output.txt`.
    pub output_bytes: Option<u64>,
    /// Processes the script left running, killed before packing.
    pub killed_leftovers: Option<u32>,
    /// For `output_too_large`: bytes the packed `/job` needed, and what the file held.
    pub needed_bytes: Option<u64>,
    pub capacity_bytes: Option<u64>,
    /// Whether `needed_bytes` is an estimate: packing stops soon after the
    /// result is known not to fit, and the rest of `/job` is assumed to pack
    /// as well as what was packed.
    pub needed_bytes_estimated: bool,
    /// Entries of the job archive that were not unpacked, with why.
    pub skipped_entries: Vec<String>,
    /// A human-readable explanation when something went wrong.
    pub message: Option<String>,
    /// The packages installed for the job (its `construir.toml`), each
    /// exactly, with its `.deb`'s sha256.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<crate::deps::Pinned>,
    /// The layer the job booted from (the digest of its image and packages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// The build caches the job named: the version each started from, and
    /// whether it was mounted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<crate::caches::CacheStatus>,
    /// Where the time went before the job's end, stage by stage from its
    /// claim: the host's before the VM, then the guest's (`crate::stages`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<crate::stages::StageTime>,
}

impl Default for JobStatus {
    fn default() -> Self {
        JobStatus {
            result: Outcome::BadArchive,
            exit_code: None,
            signal: None,
            timed_out: false,
            started_at: None,
            ended_at: None,
            duration_secs: None,
            init_version: String::new(),
            image: None,
            job: None,
            output_bytes: None,
            killed_leftovers: None,
            needed_bytes: None,
            capacity_bytes: None,
            needed_bytes_estimated: false,
            skipped_entries: Vec::new(),
            message: None,
            packages: Vec::new(),
            layer: None,
            caches: Vec::new(),
            stages: Vec::new(),
        }
    }
}

impl JobStatus {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a JobStatus always serializes");
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_missing_fields() {
        let st = JobStatus {
            result: Outcome::TimedOut,
            exit_code: None,
            signal: Some(9),
            timed_out: true,
            ..Default::default()
        };
        let back: JobStatus = serde_json::from_slice(&st.to_json()).expect("parse");
        assert_eq!(back, st);
        assert!(String::from_utf8(st.to_json()).expect("utf8").contains("\"result\": \"timed_out\""));
        let partial: JobStatus = serde_json::from_str(r#"{"result":"ok","exit_code":0,"extra":1}"#).expect("parse");
        assert_eq!((partial.result, partial.exit_code), (Outcome::Ok, Some(0)));
    }
}
