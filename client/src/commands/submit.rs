//! `construir submit`: a job file, or a directory packed first; then maybe `wait`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use jobfile::tools::{self, PackRequest};
use jobfile::units::human_size;
use wire::client::{Api, Upload};

use crate::show::{checked_id, describe};

/// What `submit` is given.
pub struct Submit {
    pub path: PathBuf,
    pub image: Option<String>,
    pub size: Option<u64>,
    pub name: Option<String>,
    pub packages: Vec<String>,
    pub debian_control: Option<String>,
    pub caches: Vec<String>,
    pub verify_on: Option<u32>,
    pub debug: bool,
    pub no_result_cache: bool,
    pub wait: bool,
}

pub fn run(api: &Api, s: Submit) -> Result<ExitCode> {
    let scratch = tempfile::tempdir()?;
    let file = job_file(&s, scratch.path())?;
    let job = submit(api, &file, s.verify_on, s.debug, s.no_result_cache)?;
    let id = checked_id(&job.id)?.to_owned();
    println!("{id}");
    eprintln!("construir: submitted {} as {id}: {}", file.display(), describe(&job));
    if s.wait {
        return super::wait::run(api, &id);
    }
    Ok(ExitCode::SUCCESS)
}

/// The job file to send: the path given, or the directory given packed into `scratch`.
fn job_file(s: &Submit, scratch: &Path) -> Result<PathBuf> {
    if !s.path.is_dir() {
        if !s.packages.is_empty() || s.debian_control.is_some() || !s.caches.is_empty() {
            bail!("--packages, --debian-control and --cache pack a directory; {} is a job file, which carries its own construir.toml", s.path.display());
        }
        return Ok(s.path.clone());
    }
    let (Some(image), Some(size)) = (s.image.clone(), s.size) else {
        bail!("{} is a directory: give --image N and --size SIZE to pack it", s.path.display());
    };
    let packed = tools::pack(&PackRequest {
        dir: s.path.clone(),
        image,
        size,
        name: s.name.clone(),
        out: scratch.to_owned(),
        preset: jobfile::xz::DEFAULT_PRESET,
        force: false,
        packages: s.packages.clone(),
        debian_control: s.debian_control.clone(),
        caches: s.caches.clone(),
        // Asked of the server instead (`debug=true`), for a directory and a job file alike.
        debug: false,
    })?;
    eprintln!("construir: packed {} into a {} job file", human_size(packed.compressed), human_size(packed.size));
    Ok(packed.path)
}

/// Sends the job file `file` (`POST /v1/jobs`).
fn submit(api: &Api, file: &Path, verify_on: Option<u32>, debug: bool, no_result_cache: bool) -> Result<wire::Job> {
    let file_name = file.file_name().and_then(|n| n.to_str()).context("the job file has no name")?;
    let job = jobfile::JobName::parse_input(file_name)
        .with_context(|| format!("{file_name} is not a job file name (<name>_i<image>.tar.xz)"))?;
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata()?.len();
    let mut path = format!("jobs?name={}&image={}", job.name(), job.image());
    if let Some(n) = verify_on {
        path.push_str(&format!("&verify_on={n}"));
    }
    if debug {
        path.push_str("&debug=true");
    }
    if no_result_cache {
        path.push_str("&no_result_cache=true");
    }
    // The server may refuse on the headers alone (a limit, a bad name): then no byte of the body is sent.
    let upload = Upload { len, content_type: "application/x-xz", expect_continue: true, body: f };
    Ok(api.post_stream(&path, upload)?)
}
