//! A construir server, as one account: the job file goes up as `construir
//! submit` sends it, and is followed, cancelled and fetched as `construir`
//! does (its result checked with the key of the host the server recorded).

use std::fs::File;
use std::path::Path;

use wire::client::{Api, CallError, Upload};

use super::{Backend, Fetched, Place};
use crate::spec::Spec;

pub struct Server {
    pub api: Api,
}

fn said(e: CallError) -> String {
    jobfile::sanitize(e.to_string().as_bytes())
}

impl Server {
    fn job(&self, id: &str) -> Result<wire::Job, String> {
        self.api.get(&format!("jobs/{id}")).map_err(said)
    }
}

impl Backend for Server {
    fn describe(&self) -> String {
        format!("the construir server at {}", self.api.server())
    }

    fn submit(&self, file: &Path, spec: &Spec) -> Result<String, String> {
        let f = File::open(file).map_err(|e| format!("cannot open {}: {e}", file.display()))?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        let mut path = format!("jobs?name={}&image={}", super::file_job_name(file)?, spec.image);
        if let Some(n) = spec.verify_on.filter(|n| *n == 2) {
            path.push_str(&format!("&verify_on={n}"));
        }
        let upload = Upload { len, content_type: "application/x-xz", expect_continue: true, body: f };
        let job: wire::Job = self.api.post_stream(&path, upload).map_err(said)?;
        Ok(job.id)
    }

    fn find(&self, name: &str, image: &str) -> Result<Option<String>, String> {
        let list: wire::JobList = self.api.get("jobs").map_err(said)?;
        Ok(list.jobs.into_iter().rev().find(|j| j.name == name && j.image == image).map(|j| j.id))
    }

    fn place(&self, id: &str) -> Result<Place, String> {
        let job = self.job(id)?;
        Ok(match &job.place {
            wire::Place::Waiting { .. } | wire::Place::Missing => Place::Waiting(job.place.describe()),
            wire::Place::Running { .. } => Place::Running(job.place.describe()),
            wire::Place::Failed { reason } => Place::Failed(reason.clone()),
            wire::Place::Done { verdict, .. } => {
                let ok = job.status.as_ref().is_some_and(|s| s.result == jobfile::Outcome::Ok);
                let debug = job.debug.as_ref().map(|d| format!("attach by {}, it ends by {}", d.attach_by, d.ends_by));
                match &job.rebuild {
                    None => Place::Done { ok, verdict: verdict.clone(), debug },
                    Some(r) => match &r.verdict {
                        None => Place::Running(format!("its second run: {}", r.second.describe())),
                        Some(v) => Place::Done {
                            ok: ok && v.outcome == wire::RebuildOutcome::Reproducible,
                            verdict: format!("{verdict}; verified rebuild: {}", v.summary()),
                            debug,
                        },
                    },
                }
            }
        })
    }

    fn console(&self, id: &str, from: u64) -> Result<Vec<u8>, String> {
        let mut raw = Vec::new();
        match self.api.download(&format!("jobs/{id}/log"), from, None, &mut raw) {
            Ok(_) => Ok(raw),
            // No console yet (waiting): nothing so far.
            Err(CallError::Refused(r)) if r.status == 404 || r.status == 416 => Ok(Vec::new()),
            Err(e) => Err(said(e)),
        }
    }

    fn cancel(&self, id: &str) -> Result<String, String> {
        let job: wire::Job = self.api.post_bytes(&format!("jobs/{id}/cancel"), b"").map_err(said)?;
        Ok(job.cancel.unwrap_or_else(|| job.place.describe()))
    }

    fn fetch(&self, id: &str, into: &Path) -> Result<Fetched, String> {
        let job = self.job(id)?;
        let name = jobfile::JobName::new(&job.name, &job.image).map_err(|e| e.to_string())?;
        let result = into.join(name.done_file_name());
        let mut file = File::create(&result).map_err(|e| format!("cannot create {}: {e}", result.display()))?;
        self.api.download(&format!("jobs/{id}/result"), 0, None, &mut file).map_err(said)?;
        let verified = construir_client::results::verified(&self.api, &job, id, 1, &result)
            .map_err(|e| format!("its result is not verified: {e:#}"))?;
        Ok(Fetched { provenance: jobfile::layout::provenance_beside(&result), result, verified: verified.summary() })
    }

    fn debug_command(&self, id: &str) -> String {
        format!("construir --server {} debug {id}", self.api.server())
    }
}
