//! A job's terms: what the server (or a remote host, from its lease) leaves
//! for the host that runs a job, beside the queue in `running/.pins/`.
//!
//! ```text
//! running/.pins/<file>.json     pin      the packages resolved at submit, installed exactly
//! running/.pins/<file>.owner    owner    whose build caches the job uses (`a<id>`)
//! running/.pins/<file>.rebuild  rebuild  a verified rebuild's run: its sibling, name, epoch
//! running/.pins/<file>.debug    debug    its submitter asked for a debug session (`crate::debug`)
//! running/.pins/<file>.env      env      the name and SOURCE_DATE_EPOCH it is given (`crate::jobenv`)
//! ```
//!
//! The terms are written before the job is in the queue and read by the
//! host that claims it. The pin and the owner go when the run ends; the
//! rebuild's terms stay until the pair's verdict, because the sibling's
//! host reads them to keep the two runs apart.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{read_small, write_whole};
use crate::deps::Resolution;
use crate::jobenv::JobEnv;
use crate::rebuild;

/// A job's terms, each checked as it is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Terms {
    pub pin: Option<Resolution>,
    pub owner: Option<String>,
    pub rebuild: Option<rebuild::Terms>,
    /// When it does not end ok, keep its VM up for its owner's shell.
    pub debug: bool,
    /// The name and `SOURCE_DATE_EPOCH` a server gives it (a verified
    /// rebuild's terms, when there are both, say the same).
    pub env: Option<JobEnv>,
}

/// One of a job's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    Pin,
    Owner,
    Rebuild,
    Debug,
    Env,
}

/// A member of a job's terms that is there but cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTerms {
    pub member: Member,
    pub why: String,
}

impl std::fmt::Display for BadTerms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.member {
            Member::Pin => "packages",
            Member::Owner => "owner of its caches",
            Member::Rebuild => "verified rebuild",
            Member::Debug => "debug session",
            Member::Env => "environment",
        };
        write!(f, "{what}: {}", self.why)
    }
}

impl std::error::Error for BadTerms {}

/// `running/.pins/<file><ext>`.
fn pins_entry(running: &Path, file_name: &OsStr, ext: &str) -> PathBuf {
    let mut name = file_name.to_owned();
    name.push(ext);
    running.join(".pins").join(name)
}

/// The pin's file: `running/.pins/<file>.json`.
pub fn pin_file(running: &Path, file_name: &OsStr) -> PathBuf {
    pins_entry(running, file_name, ".json")
}

/// The debug request's file: `running/.pins/<file>.debug`.
pub fn debug_file(running: &Path, file_name: &OsStr) -> PathBuf {
    pins_entry(running, file_name, ".debug")
}

/// The environment's file: `running/.pins/<file>.env`.
pub fn env_file(running: &Path, file_name: &OsStr) -> PathBuf {
    pins_entry(running, file_name, ".env")
}

/// What the debug request's file holds.
const DEBUG_WORD: &[u8] = b"debug\n";

/// The owner's file: `running/.pins/<file>.owner`.
pub fn owner_file(running: &Path, file_name: &OsStr) -> PathBuf {
    pins_entry(running, file_name, ".owner")
}

impl Terms {
    /// Reads the terms left for `file_name`: each a regular file with one
    /// name, never through a link, bounded, valid. A member that is not
    /// there is `None`; `Err` says what is wrong with one that is.
    pub fn read(running: &Path, file_name: &OsStr) -> Result<Terms, BadTerms> {
        let bad = |member| move |why| BadTerms { member, why };
        Ok(Terms {
            pin: read_pin(running, file_name).map_err(bad(Member::Pin))?,
            owner: read_owner(running, file_name).map_err(bad(Member::Owner))?,
            rebuild: rebuild::read_terms(running, file_name).map_err(bad(Member::Rebuild))?,
            debug: read_debug(running, file_name).map_err(bad(Member::Debug))?,
            env: read_env(running, file_name).map_err(bad(Member::Env))?,
        })
    }

    /// Writes each member that is there whole, for a host to find before
    /// the job is in its queue.
    pub fn write(&self, running: &Path, file_name: &OsStr) -> io::Result<()> {
        if let Some(pin) = &self.pin {
            pin.check().map_err(io::Error::other)?;
            let raw = serde_json::to_vec_pretty(pin).expect("a Resolution always serializes");
            write_whole(&pin_file(running, file_name), &raw)?;
        }
        if let Some(owner) = &self.owner {
            crate::caches::check_owner(owner).map_err(io::Error::other)?;
            write_whole(&owner_file(running, file_name), owner.as_bytes())?;
        }
        if let Some(terms) = &self.rebuild {
            rebuild::write_terms(running, file_name, terms)?;
        }
        if self.debug {
            write_whole(&debug_file(running, file_name), DEBUG_WORD)?;
        }
        if let Some(env) = &self.env {
            env.check().map_err(io::Error::other)?;
            write_whole(&env_file(running, file_name), &serde_json::to_vec(env).expect("an env always serializes"))?;
        }
        Ok(())
    }

    /// Removes what a run reads (its pin and its owner), when it has ended.
    /// A rebuild's terms stay until its verdict (`rebuild::remove_terms`).
    pub fn remove_run(running: &Path, file_name: &OsStr) {
        let _ = fs::remove_file(pin_file(running, file_name));
        let _ = fs::remove_file(owner_file(running, file_name));
        let _ = fs::remove_file(debug_file(running, file_name));
        let _ = fs::remove_file(env_file(running, file_name));
    }

    /// Removes every member (a job that never ran: cancelled or deleted).
    pub fn remove_all(running: &Path, file_name: &OsStr) {
        Terms::remove_run(running, file_name);
        rebuild::remove_terms(running, file_name);
    }
}

fn read_pin(running: &Path, file_name: &OsStr) -> Result<Option<Resolution>, String> {
    let path = pin_file(running, file_name);
    let Some(raw) = read_small(&path, 4 << 20)? else { return Ok(None) };
    let res: Resolution =
        serde_json::from_slice(&raw).map_err(|e| format!("{} is not a resolution: {e}", path.display()))?;
    res.check().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(res))
}

fn read_debug(running: &Path, file_name: &OsStr) -> Result<bool, String> {
    let path = debug_file(running, file_name);
    match read_small(&path, 64)? {
        None => Ok(false),
        Some(raw) if raw == DEBUG_WORD => Ok(true),
        Some(_) => Err(format!("{} does not say debug", path.display())),
    }
}

fn read_env(running: &Path, file_name: &OsStr) -> Result<Option<JobEnv>, String> {
    let path = env_file(running, file_name);
    let Some(raw) = read_small(&path, 4096)? else { return Ok(None) };
    let env: JobEnv =
        serde_json::from_slice(&raw).map_err(|e| format!("{} is not a job's environment: {e}", path.display()))?;
    env.check().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(env))
}

fn read_owner(running: &Path, file_name: &OsStr) -> Result<Option<String>, String> {
    let path = owner_file(running, file_name);
    let Some(raw) = read_small(&path, 256)? else { return Ok(None) };
    let owner = String::from_utf8_lossy(&raw).trim().to_owned();
    crate::caches::check_owner(&owner).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(owner))
}

/// A job's terms as one server left them, to be copied where another
/// reads them (a Slurm attempt, a node's private queue): each file's raw
/// bytes, read once (never through a link, bounded), and one digest over
/// all of them, so that whoever is handed the digest on a channel the
/// files did not travel can tell whether the files are the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TermFiles {
    /// (file name in `.pins/`, its bytes), for each that is there, in a fixed order.
    pub files: Vec<(OsString, Vec<u8>)>,
}

impl TermFiles {
    /// Reads the terms of `file_name` under `running`.
    pub fn read(running: &Path, file_name: &OsStr) -> Result<TermFiles, String> {
        let mut files = Vec::new();
        for path in [
            pin_file(running, file_name),
            owner_file(running, file_name),
            rebuild::terms_file(running, file_name),
            debug_file(running, file_name),
            env_file(running, file_name),
        ] {
            if let Some(raw) = read_small(&path, 4 << 20)? {
                files.push((path.file_name().expect("a file name").to_owned(), raw));
            }
        }
        Ok(TermFiles { files })
    }

    /// sha256 over every file's name and bytes, each length-prefixed.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for (name, raw) in &self.files {
            for part in [name.as_encoded_bytes(), raw.as_slice()] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
        }
        crate::hex(&h.finalize())
    }

    /// Writes the files, as read, under `running/.pins/`.
    pub fn write(&self, running: &Path) -> io::Result<()> {
        for (name, raw) in &self.files {
            write_whole(&running.join(".pins").join(name), raw)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{debug_file, owner_file, pin_file, Member, TermFiles, Terms};
    use crate::rebuild;
    use std::ffi::OsStr;

    #[test]
    fn terms_are_written_read_copied_and_removed_as_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (running, file) = (tmp.path(), OsStr::new("a_i1.tar.xz"));
        assert_eq!(Terms::read(running, file).expect("none"), Terms::default());
        let rebuild = rebuild::Terms { sibling: "b_i1.tar.xz".into(), name: "a".into(), epoch: 1, apart_until: 0 };
        let env = Some(crate::jobenv::JobEnv { name: "a".into(), epoch: 1 });
        let terms = Terms { pin: None, owner: Some("a7".into()), rebuild: Some(rebuild), debug: true, env };
        terms.write(running, file).expect("write");
        assert_eq!(Terms::read(running, file).expect("read"), terms);
        let copy = TermFiles::read(running, file).expect("copy");
        assert_eq!(copy.files.len(), 4, "the owner, the rebuild's terms, the debug request and the env");
        let elsewhere = tmp.path().join("node");
        copy.write(&elsewhere).expect("copied");
        assert_eq!(TermFiles::read(&elsewhere, file).expect("again").digest(), copy.digest());
        Terms::remove_run(running, file);
        assert_eq!(
            Terms::read(running, file).expect("read"),
            Terms { owner: None, debug: false, env: None, ..terms.clone() }
        );
        Terms::remove_all(running, file);
        assert_eq!(Terms::read(running, file).expect("read"), Terms::default());
        std::fs::write(debug_file(running, file), "yes please").expect("w");
        assert_eq!(Terms::read(running, file).map_err(|e| e.member), Err(Member::Debug), "says nothing else");
        std::fs::remove_file(debug_file(running, file)).expect("rm");
        std::fs::write(super::env_file(running, file), r#"{"name":"../x","epoch":1}"#).expect("w");
        assert_eq!(Terms::read(running, file).map_err(|e| e.member), Err(Member::Env), "no job's name");
        std::fs::remove_file(super::env_file(running, file)).expect("rm");
        std::fs::write(owner_file(running, file), "../x").expect("w");
        assert_eq!(Terms::read(running, file).map_err(|e| e.member), Err(Member::Owner), "no account's");
        std::fs::remove_file(owner_file(running, file)).expect("rm");
        std::fs::write(pin_file(running, file), "{").expect("w");
        let bad = Terms::read(running, file).expect_err("a bad pin");
        assert!(bad.member == Member::Pin && bad.to_string().starts_with("packages: "), "{bad}");
    }
}
