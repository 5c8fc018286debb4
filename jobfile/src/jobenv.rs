//! The environment a server gives a job, fixed by its inputs alone: the
//! name it sees as `CONSTRUIR_JOB` (the name its submitter gave, not the
//! queue's name, which carries the account and the job's id) and its
//! `SOURCE_DATE_EPOCH` (the newest modification time among the job's own
//! files). Two submissions of the same job file under the same name see
//! the same environment, which is what lets a result be reused
//! (`construir-server`'s result cache) and two runs be compared.
//!
//! The server leaves it for the host in `running/.pins/<file>.env`
//! (`crate::layout::Terms`).

use std::io::Read;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a job is given, beside the fixed variables every job gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnv {
    /// `CONSTRUIR_JOB`.
    pub name: String,
    /// `SOURCE_DATE_EPOCH`.
    pub epoch: u64,
}

/// The latest `SOURCE_DATE_EPOCH` a job is given: 9999-12-31, what `date` can still show.
pub const MAX_EPOCH: u64 = 253_402_300_799;

/// What scanning a job for its newest time may cost.
pub const SCAN_LIMITS: crate::ReadLimits = crate::ReadLimits::new(u64::MAX, Duration::from_secs(120));

impl JobEnv {
    /// Whether it can be acted on: a job name, an epoch within what `date` can show.
    pub fn check(&self) -> Result<(), String> {
        crate::name::check_name(&self.name).map_err(|e| format!("name: {e}"))?;
        if self.epoch > MAX_EPOCH {
            return Err(format!("epoch {} is past the year 9999", self.epoch));
        }
        Ok(())
    }

    /// The variables, as the job sees them.
    pub fn vars(&self) -> [(&'static str, String); 2] {
        [("CONSTRUIR_JOB", self.name.clone()), ("SOURCE_DATE_EPOCH", self.epoch.to_string())]
    }
}

/// The newest modification time among the entries of the job file read
/// from `input` (its tar.xz; the zero padding after it is never read), as
/// `SOURCE_DATE_EPOCH`: 0 for an archive without entries or whose times
/// are all before 1970, never past [`MAX_EPOCH`]. `Err` when it is no
/// archive this reader takes, within [`SCAN_LIMITS`].
pub fn newest_mtime<R: Read>(input: R) -> Result<u64, String> {
    let mut archive = crate::read_job(input, crate::xz::DEFAULT_MEMLIMIT)
        .map_err(|e| crate::error_chain(&e))?
        .with_limits(SCAN_LIMITS);
    let mut newest = 0i64;
    while let Some(h) = archive.next_entry().map_err(|e| crate::error_chain(&e))? {
        newest = newest.max(h.mtime);
    }
    Ok((newest.max(0) as u64).min(MAX_EPOCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_with(times: &[(&str, u64)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, mtime) in times {
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_mode(0o755);
            h.set_mtime(*mtime);
            h.set_cksum();
            b.append_data(&mut h, path, &b"x\n"[..]).expect("append");
        }
        let tar = b.into_inner().expect("tar");
        let stream = crate::xz::encoder(Default::default()).expect("encoder");
        let mut enc = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        std::io::Write::write_all(&mut enc, &tar).expect("xz");
        let mut xz = enc.finish().expect("xz");
        xz.resize(xz.len() + 4096, 0);
        xz
    }

    #[test]
    fn the_epoch_is_the_newest_time_among_the_job_s_files_and_the_env_is_checked() {
        let job = job_with(&[("bin/construir", 1_700_000_000), ("src/a.c", 1_700_000_500), ("b", 5)]);
        assert_eq!(newest_mtime(&job[..]), Ok(1_700_000_500));
        assert_eq!(newest_mtime(&job_with(&[])[..]), Ok(0));
        assert!(newest_mtime(&b"not xz at all"[..]).is_err());
        let env = JobEnv { name: "hello".into(), epoch: 1_700_000_500 };
        assert_eq!(env.check(), Ok(()));
        assert_eq!(env.vars()[1], ("SOURCE_DATE_EPOCH", "1700000500".to_owned()));
        assert!(JobEnv { name: "../x".into(), epoch: 1 }.check().is_err());
        assert!(JobEnv { name: "x".into(), epoch: MAX_EPOCH + 1 }.check().is_err());
    }
}
