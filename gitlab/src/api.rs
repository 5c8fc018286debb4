//! The calls to GitLab's runner API that the gitlab-runner crate does not
//! make: whether GitLab knows the runner's token, and finishing a job with
//! its token after a restart (the crate kept that job's state in memory).

use anyhow::{bail, Context, Result};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into()
}

/// Asks GitLab whether it knows the runner's token (`POST /api/v4/runners/verify`):
/// a refusal stops the start, with what to do.
pub fn verify_runner(gitlab: &url::Url, token: &str) -> Result<()> {
    let agent = agent();
    let url = format!("{}/api/v4/runners/verify", gitlab.as_str().trim_end_matches('/'));
    let body = serde_json::json!({ "token": token }).to_string();
    let answer = agent
        .post(&url)
        .header("Content-Type", "application/json")
        .send(body)
        .with_context(|| format!("cannot reach GitLab at {gitlab}"))?;
    match answer.status().as_u16() {
        200 => eprintln!("construir-gitlab: GitLab at {gitlab} knows this runner"),
        401 | 403 => bail!(
            "GitLab at {gitlab} does not know the runner token in the token file: create a runner in GitLab \
             (Settings > CI/CD > Runners > New project runner) and put its glrt-… token there"
        ),
        s => eprintln!("construir-gitlab: GitLab at {gitlab} answered {s} to verifying the runner; going on"),
    }
    Ok(())
}

/// How a job is finished: its state, GitLab's `failure_reason` for a failure, a last trace line.
pub struct Ending<'a> {
    pub success: bool,
    pub failure_reason: &'a str,
    pub line: &'a str,
}

/// Appends `end.line` to job `id`'s trace (at the offset GitLab says it
/// has, when it says) and sets its state, with the job's `token`.
pub fn finish_job(gitlab: &url::Url, id: u64, token: &str, end: &Ending) -> Result<(), String> {
    let agent = agent();
    let base = gitlab.as_str().trim_end_matches('/');
    let line = format!("\nconstruir-gitlab: {}\n", end.line);
    let trace_url = format!("{base}/api/v4/jobs/{}/trace", id);
    let patch = |from: u64| {
        agent
            .patch(&trace_url)
            .header("JOB-TOKEN", token)
            .header("Content-Type", "text/plain")
            .header("Content-Range", format!("{from}-{}", from + line.len() as u64 - 1))
            .send(line.as_bytes())
    };
    // GitLab answers a wrong offset with 416 and the length it has.
    if let Ok(r) = patch(0) {
        let has =
            r.headers().get("Range").and_then(|v| v.to_str().ok()).and_then(|v| v.rsplit('-').next()?.parse().ok());
        if let (416, Some(len)) = (r.status().as_u16(), has) {
            let _ = patch(len);
        }
    }
    let mut body = serde_json::json!({ "token": token, "state": if end.success { "success" } else { "failed" } });
    if !end.success {
        body["failure_reason"] = end.failure_reason.into();
    }
    let r = agent
        .put(format!("{base}/api/v4/jobs/{}", id))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(|e| e.to_string())?;
    match r.status().as_u16() {
        200 => Ok(()),
        s => Err(format!("{s} from GitLab")),
    }
}
