//! `job_status.json`: what happened to a job, written by the guest, read by
//! the host and the submitter's tools (who must treat it as untrusted).

use std::time::{SystemTime, UNIX_EPOCH};

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

/// Formats a time as RFC 3339 in UTC, to the second (`2026-11-24T06:15:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_table() {
        let table = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_795_500_000, "2026-11-24T06:00:00Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ];
        for (secs, want) in table {
            assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(secs)), want);
        }
    }

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
