//! `construir fetch`: download a job's result and its signed provenance,
//! checked against the key of the host the server recorded for the run.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use jobfile::units::human_size;
use wire::client::Api;

use crate::show::checked_id;

/// What `fetch` is given.
pub struct Fetch {
    pub id: String,
    pub out: Option<PathBuf>,
    pub unpack: Option<PathBuf>,
    pub no_verify: bool,
    pub run: u32,
}

pub fn run(api: &Api, f: Fetch) -> Result<ExitCode> {
    let (id, run) = (checked_id(&f.id)?, f.run);
    let job = super::job(api, id)?;
    let out = f.out.unwrap_or_else(|| PathBuf::from(result_name(&job, id, run)));
    let tmp = out.with_extension("part");
    let mut file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let n = match api.download(&format!("jobs/{id}/result?run={run}"), 0, None, &mut file) {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    file.sync_all()?;
    std::fs::rename(&tmp, &out)?;
    eprintln!("construir: {id} ({}) -> {}", human_size(n), out.display());
    if !f.no_verify {
        match construir_client::results::verified(api, &job, id, run, &out) {
            Ok(v) => {
                eprintln!("construir: verified: {}", v.summary());
                if job.from_cache.is_some() && run == 1 {
                    let record = construir_client::results::cache_hit(api, id, &out)?;
                    eprintln!("construir: {}", record);
                }
            }
            Err(e) => {
                let aside = out.with_extension("xz.unverified");
                std::fs::rename(&out, &aside)?;
                eprintln!(
                    "construir: {}: not verified: {e:#}; kept as {} (--no-verify takes a result without checking)",
                    out.display(),
                    aside.display()
                );
                return Ok(ExitCode::from(1));
            }
        }
    }
    if let Some(dir) = f.unpack {
        super::unpack::run(&out, &dir)?;
    }
    println!("{}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// `<name>_d<image>.tar.xz`, `.run2` before the suffix for a verified rebuild's second run.
fn result_name(job: &wire::Job, id: &str, run: u32) -> String {
    let name = jobfile::JobName::new(&job.name, &job.image)
        .map(|j| j.done_file_name())
        .unwrap_or_else(|_| format!("{id}.tar.xz"));
    match run {
        1 => name,
        n => format!("{}.run{n}{}", name.strip_suffix(jobfile::name::SUFFIX).unwrap_or(&name), jobfile::name::SUFFIX),
    }
}
