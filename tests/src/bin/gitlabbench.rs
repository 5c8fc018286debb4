//! `construir-gitlabbench`: what a CI job pays for coming through
//! construir-gitlab, against the same job sent with `construir submit --wait`.
//!
//! Usage: construir-gitlabbench BIN_DIR SERVER_URL TOKEN_FILE RUNS SCRATCH
//!
//! It starts GitLab's job API on loopback (`gitlab-runner-mock`) and
//! `construir-gitlab run` against it and the server (`--poll 1s`), makes a
//! git repository whose one script prints a line, then RUNS times, in turn:
//! queues a CI job running it (image 0, size 1M) and times it from queued to
//! finished in GitLab; and packs the same checkout and script into a job
//! directory and times `construir submit DIR --image 0 --size 1M --wait`.
//! Prints `gitlab SECONDS` and `submit SECONDS` lines.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use construir_e2e::gitlab::{enqueue, repo, write_secret, CiJob};
use gitlab_runner_mock::{GitlabRunnerMock, MockJobState};

const SCRIPT: &str = "./hello.sh";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bin, server, token_file, runs, scratch] = args.as_slice() else {
        eprintln!("usage: construir-gitlabbench BIN_DIR SERVER_URL TOKEN_FILE RUNS SCRATCH");
        return ExitCode::from(2);
    };
    let Ok(runs) = runs.parse::<u32>() else {
        eprintln!("construir-gitlabbench: RUNS must be a number");
        return ExitCode::from(2);
    };
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match rt.block_on(bench(Path::new(bin), server, Path::new(token_file), runs, Path::new(scratch))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("construir-gitlabbench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(bin: &Path, server: &str, token_file: &Path, runs: u32, scratch: &Path) -> Result<(), String> {
    let files = [("hello.sh", "#!/bin/sh\necho hello from the checkout\n")];
    let repo = repo(&scratch.join("repo"), &files);
    // The same job by hand: the checkout (its files) and a script running the same line.
    let dir = scratch.join("by-hand");
    std::fs::create_dir_all(dir.join("bin")).map_err(|e| e.to_string())?;
    construir_e2e::sh(&format!("cp -a '{}/.' '{}/src'", scratch.join("repo").display(), dir.display()), scratch);
    let by_hand = format!("#!/bin/sh\ncd /job/src\nset -e\n{SCRIPT}\n");
    std::fs::write(dir.join("bin/construir"), by_hand).map_err(|e| e.to_string())?;
    construir_e2e::sh("chmod +x bin/construir", &dir);

    let mock = GitlabRunnerMock::start().await;
    let runner_token = scratch.join("runner-token");
    write_secret(&runner_token, mock.runner_token());
    let log = scratch.join("gitlab.log");
    let mut runner = Command::new(bin.join("construir-gitlab"))
        .args(["run", "--gitlab-url", mock.uri().as_str(), "--poll", "1s", "--server", server])
        .arg("--runner-token-file")
        .arg(&runner_token)
        .arg("--token-file")
        .arg(token_file)
        .arg("--state-dir")
        .arg(scratch.join("state"))
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start construir-gitlab: {e}"))?;
    let token = std::fs::read_to_string(token_file).map_err(|e| e.to_string())?;
    let result = async {
        for _ in 0..runs {
            let vars = [("CONSTRUIR_IMAGE", "0", false), ("CONSTRUIR_JOB_SIZE", "1M", false)];
            let start = Instant::now();
            let job =
                enqueue(&mock, &repo, &CiJob { name: "bench", script: &[SCRIPT], vars: &vars, ..CiJob::default() });
            while !job.finished() {
                if start.elapsed() > Duration::from_secs(300) {
                    return Err(format!("a CI job did not end: {}", std::fs::read_to_string(&log).unwrap_or_default()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if job.state() != MockJobState::Success {
                return Err(format!("a CI job failed: {}", String::from_utf8_lossy(&job.log())));
            }
            println!("gitlab {:.3}", start.elapsed().as_secs_f64());
            println!("submit {:.3}", submit_wait(bin, server, token.trim(), &dir)?);
        }
        Ok(())
    }
    .await;
    let _ = runner.kill();
    let _ = runner.wait();
    result
}

/// `construir submit DIR --image 0 --size 1M --wait`, timed.
fn submit_wait(bin: &Path, server: &str, token: &str, dir: &PathBuf) -> Result<f64, String> {
    let start = Instant::now();
    let out = Command::new(bin.join("construir"))
        .args(["--server", server, "--token", token, "submit"])
        .arg(dir)
        .args(["--image", "0", "--size", "1M", "--name", "byhand", "--no-result-cache", "--wait"])
        .output()
        .map_err(|e| format!("cannot run construir: {e}"))?;
    if !out.status.success() {
        return Err(format!("construir submit --wait failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(start.elapsed().as_secs_f64())
}
