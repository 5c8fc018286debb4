//! A local queue that construir-host runs: the job file is renamed into it,
//! followed through the queue's directories (`layout::Beside::locate`),
//! cancelled as `construir-host cancel` does, and its result checked with
//! the keys the queue's hosts publish in `running/.keys/`.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use jobfile::layout::{self, Beside, Found};

use super::{Backend, Fetched, Place};
use crate::spec::Spec;

pub struct Queue {
    pub dirs: Beside,
}

/// Most of a console read at once.
const CONSOLE_READ: u64 = 1 << 20;

impl Queue {
    fn locate(&self, file_name: &str) -> Found {
        self.dirs.locate(file_name, &self.dirs.host_dirs(), layout::lone_file)
    }

    /// Each key the queue's hosts publish, bound to its host's id.
    fn signers(&self) -> Vec<(String, construir_provenance::PublicKey)> {
        let Ok(rd) = fs::read_dir(self.dirs.running.join(".keys")) else { return Vec::new() };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let host = name.strip_suffix(".pub")?.to_owned();
                let text = layout::read_small(&e.path(), 4096).ok()??;
                let key = construir_provenance::PublicKey::parse(String::from_utf8_lossy(&text).trim()).ok()?;
                Some((host, key))
            })
            .collect()
    }
}

impl Backend for Queue {
    fn describe(&self) -> String {
        format!("the local queue {}", self.dirs.queue.display())
    }

    fn submit(&self, file: &Path, spec: &Spec) -> Result<String, String> {
        if spec.verify_on == Some(2) {
            return Err(
                "CONSTRUIR_VERIFY_ON=2: a local queue runs each job once; a verified rebuild needs a construir server"
                    .into(),
            );
        }
        let name = file.file_name().and_then(OsStr::to_str).ok_or("the job file has no name")?.to_owned();
        // Renamed in whole: the host takes it without waiting for it to settle.
        let target = self.dirs.queue.join(&name);
        layout::rename_noreplace(file, &target)
            .map_err(|e| format!("cannot move it into {}: {e}", target.display()))?;
        Ok(name)
    }

    fn find(&self, name: &str, image: &str) -> Result<Option<String>, String> {
        let file = jobfile::JobName::new(name, image).map_err(|e| e.to_string())?.input_file_name();
        Ok((!matches!(self.locate(&file), Found::Missing)).then_some(file))
    }

    fn place(&self, file: &str) -> Result<Place, String> {
        Ok(match self.locate(file) {
            Found::Waiting(_) => Place::Waiting(format!("waiting in {}", self.dirs.queue.display())),
            Found::Running { host, .. } => Place::Running(format!("running on {host}")),
            Found::Failed { reason, .. } => {
                Place::Failed(reason.map_or_else(|| "failed, with no reason written".to_owned(), |r| r.why))
            }
            Found::Done { result, .. } => {
                let status: jobfile::JobStatus = jobfile::tools::raw_status(&result)
                    .ok()
                    .and_then(|raw| serde_json::from_slice(&raw).ok())
                    .ok_or_else(|| format!("{}: its status cannot be read", result.display()))?;
                let verdict = layout::log_beside(&result)
                    .and_then(|log| jobfile::tools::log_verdict(&log))
                    .unwrap_or_else(|| status.result.as_str().to_owned());
                let debug = fs::symlink_metadata(jobfile::debug::session_file(&self.dirs.running, OsStr::new(file)))
                    .is_ok()
                    .then(|| "while the host keeps it".to_owned());
                Place::Done { ok: status.result == jobfile::Outcome::Ok, verdict, debug }
            }
            Found::Missing => Place::Failed(format!("{file} is in none of the queue's directories")),
        })
    }

    fn console(&self, file: &str, from: u64) -> Result<Vec<u8>, String> {
        let path = match self.locate(file) {
            Found::Running { dir, .. } => layout::live_console(&dir, OsStr::new(file)),
            Found::Done { log, .. } => log,
            Found::Failed { log: Some(log), .. } => log,
            _ => return Ok(Vec::new()),
        };
        let Ok(mut f) = layout::open_unfollowed(&path) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        f.seek(SeekFrom::Start(from))
            .and_then(|_| f.take(CONSOLE_READ).read_to_end(&mut out))
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn cancel(&self, file: &str) -> Result<String, String> {
        // Still waiting: out of the queue, unless a host claims it first (the rename decides).
        let waiting = self.dirs.queue.join(file);
        let reason = "cancelled: its GitLab job was cancelled";
        match layout::fail(&self.dirs.failed, &waiting, OsStr::new(file), reason, None) {
            Ok(Some(_)) => return Ok("taken out of the queue".to_owned()),
            Ok(None) => {}
            Err(e) => return Err(format!("cannot move it to {}: {e}", self.dirs.failed.display())),
        }
        let request = layout::cancel_request(&self.dirs.running, OsStr::new(file));
        fs::create_dir_all(layout::cancel_dir(&self.dirs.running))
            .and_then(|()| fs::write(&request, b""))
            .map_err(|e| format!("cannot write {}: {e}", request.display()))?;
        Ok("asked its host to stop its VM".to_owned())
    }

    fn fetch(&self, file: &str, into: &Path) -> Result<Fetched, String> {
        let Found::Done { result: done, log, .. } = self.locate(file) else {
            return Err(format!("{file} has no result in {}", self.dirs.done.display()));
        };
        let result = into.join(done.file_name().unwrap_or_default());
        let provenance = layout::provenance_beside(&result);
        fs::copy(&done, &result).map_err(|e| format!("cannot copy {}: {e}", done.display()))?;
        fs::copy(layout::provenance_beside(&done), &provenance).map_err(|e| format!("no provenance beside it: {e}"))?;
        let signers = self.signers();
        if signers.is_empty() {
            return Err(format!("no host publishes a key in {}", self.dirs.running.join(".keys").display()));
        }
        let (host, verified) = construir_provenance::verify_signed_as(&result, &provenance, &signers, Some(&log))
            .map_err(|e| format!("its result is not verified: {}", jobfile::error_chain(&e)))?;
        Ok(Fetched { result, provenance, verified: format!("{} (host {host})", verified.summary()) })
    }

    fn debug_command(&self, file: &str) -> String {
        format!(
            "construir-host debug {}",
            self.dirs
                .done
                .join(jobfile::JobName::parse(file).map(|j| j.done_file_name()).unwrap_or_default())
                .display()
        )
    }
}
