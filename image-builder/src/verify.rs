//! `image-builder verify images/iN`: checks every file against image.toml's
//! sha256, then boots the image with a smoke job through a throwaway queue
//! (with construir-host, as a build host would) and reports whether the job
//! ran and came back.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jobfile::image::ImageManifest;
use jobfile::xz::{EncodeOptions, DEFAULT_MEMLIMIT};
use jobfile::{path_is, JobStatus, Outcome, PackOptions};

use crate::say;

/// The smoke job: proves the script ran, where, on what machine, and that /job is writable.
const SMOKE: &str = "#!/bin/sh\nset -e\necho construir-verify: running as $(id -u) on $(uname -r)\necho construir-verify: machine $(uname -m)\ndf -k /job | tail -n 1\necho written > written.txt\necho construir-verify: ok\n";

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub image: PathBuf,
    pub host: Option<PathBuf>,
    pub timeout: Duration,
    pub accel: String,
}

/// What verify found, for tests and for printing.
#[derive(Debug, Clone)]
pub struct Report {
    pub status: JobStatus,
    pub output: String,
    pub seconds: f64,
}

pub fn verify(opts: &VerifyOptions) -> Result<Report> {
    let image = std::path::absolute(&opts.image)?;
    let manifest = ImageManifest::load(&image).with_context(|| format!("{} is not an image", image.display()))?;
    say!("checking {} files against image.toml", manifest.sha256.len());
    manifest.verify_files(&image)?;
    let host = match &opts.host {
        Some(h) => h.clone(),
        None => std::env::current_exe()?.with_file_name("construir-host"),
    };
    let scratch = std::env::temp_dir().join(format!("construir-verify-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    let cleanup = Scratch(scratch.clone());
    let (images, queue, job) = (scratch.join("images"), scratch.join("queue"), scratch.join("job"));
    for d in [&images, &queue, &job.join("bin")] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    std::os::unix::fs::symlink(&image, images.join("i0"))?;
    fs::write(job.join("bin/construir"), SMOKE)?;
    fs::set_permissions(job.join("bin/construir"), fs::Permissions::from_mode(0o755))?;
    let job_file = queue.join("verify_i0.tar.xz");
    let (_, packed) = jobfile::pack_dir(
        &job,
        Vec::new(),
        1 << 20,
        &PackOptions { encode: EncodeOptions::default(), ..Default::default() },
    )?;
    let mut data = packed;
    data.resize(1 << 20, 0);
    fs::write(&job_file, data)?;

    say!("booting {} ({}) with a smoke job ({} acceleration)", image.display(), manifest.arch, opts.accel);
    let started = Instant::now();
    let out = Command::new(&host)
        .arg("run")
        .arg(&queue)
        .args(["--once", "--accel", &opts.accel, "--timeout"])
        .arg(format!("{}s", opts.timeout.as_secs()))
        .args(["--grace", "3m", "--memory", "1G", "--cpus", "1", "--images"])
        .arg(&images)
        .output()
        .with_context(|| format!("cannot run {} (build it, or give --host)", host.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let result = scratch.join("done/verify_d0.tar.xz");
    if !result.exists() {
        let reason = fs::read_to_string(scratch.join("failed/verify_i0.tar.xz.reason")).unwrap_or_default();
        let log = fs::read_to_string(scratch.join("failed/verify_i0.tar.xz.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!(
            "the smoke job did not come back: {}\nhost: {}\nconsole (end):\n{}",
            reason.trim(),
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default(),
            tail.join("\n")
        );
    }
    let (status, output) = read_result(&result)?;
    drop(cleanup);
    if status.result != Outcome::Ok || !output.contains("construir-verify: ok") {
        bail!("the smoke job came back with result {} and output:\n{output}", status.result.as_str());
    }
    let machine = format!("construir-verify: machine {}\n", manifest.arch.machine());
    if !output.contains(&machine) {
        bail!("image.toml says {}, but the guest is not {}:\n{output}", manifest.arch, manifest.arch.machine());
    }
    Ok(Report { status, output, seconds })
}

fn read_result(path: &Path) -> Result<(JobStatus, String)> {
    let mut archive = jobfile::read_job(fs::File::open(path)?, DEFAULT_MEMLIMIT)?;
    let (mut status, mut output) = (None, String::new());
    while let Some(h) = archive.next_entry()? {
        let mut data = Vec::new();
        if path_is(&h.path, jobfile::STATUS_FILE) {
            archive.data().take(1 << 20).read_to_end(&mut data)?;
            status = Some(serde_json::from_slice(&data)?);
        } else if path_is(&h.path, jobfile::OUTPUT_FILE) {
            archive.data().take(1 << 20).read_to_end(&mut data)?;
            output = String::from_utf8_lossy(&data).into_owned();
        }
    }
    Ok((status.context("the result has no job_status.json")?, output))
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
