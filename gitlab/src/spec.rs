//! What a CI job asks of construir, read from the variables GitLab sent
//! with it: the image, the size, a verified rebuild, a debug session, its
//! packages and caches (added to the repository's own `construir.toml` by
//! `compose`), its timeout, where its source is; and which of its variables
//! go into the VM.

use std::collections::BTreeMap;
use std::time::Duration;

use gitlab_runner::job::Job;

/// The runner's own defaults, for a job that names none.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub image: Option<String>,
    pub size: u64,
}

/// The repository at the job's commit.
#[derive(Debug, Clone)]
pub struct Source {
    /// `CI_REPOSITORY_URL`, credentials included (never given to the VM).
    pub url: String,
    pub sha: String,
    /// `CI_COMMIT_REF_NAME`: fetched when the commit alone cannot be.
    pub ref_name: Option<String>,
    /// `GIT_DEPTH`; 0 fetches all history.
    pub depth: u32,
}

/// Everything construir-gitlab needs to make and submit the job.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The construir job's name: `gl<GitLab job id>`.
    pub name: String,
    pub image: String,
    pub size: u64,
    /// `CONSTRUIR_VERIFY_ON` (1 or 2), else the repository's `verify-on`
    /// (set by `compose`); 2 is a verified rebuild.
    pub verify_on: Option<u32>,
    pub debug: bool,
    pub packages: Vec<String>,
    pub caches: Vec<String>,
    /// The job's GitLab timeout (`CI_JOB_TIMEOUT`).
    pub timeout: Option<Duration>,
    pub source: Source,
    /// What the VM's shell is given, in order.
    pub env: Vec<(String, String)>,
    /// Variables kept out of the VM, by name, for the trace to say so.
    pub withheld: Vec<String>,
}

/// A job's variables: value and whether GitLab masks it.
pub struct Vars(BTreeMap<String, (String, bool)>);

impl Vars {
    pub fn of(job: &Job) -> Vars {
        Vars(job.variables().map(|v| (v.key().to_owned(), (v.value().to_owned(), v.masked()))).collect())
    }

    #[cfg(test)]
    pub fn from_pairs(pairs: &[(&str, &str, bool)]) -> Vars {
        Vars(pairs.iter().map(|(k, v, m)| ((*k).to_owned(), ((*v).to_owned(), *m))).collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|(v, _)| v.as_str()).filter(|v| !v.is_empty())
    }
}

/// Variables never given to the VM, masked or not: each carries the job's
/// token or a password made from it.
const NEVER_IN_VM: &[&str] =
    &["CI_JOB_TOKEN", "CI_BUILD_TOKEN", "CI_REGISTRY_PASSWORD", "CI_DEPENDENCY_PROXY_PASSWORD", "CI_REPOSITORY_URL"];

/// The project's list of masked variables it wants in the VM.
pub const VM_VARIABLES: &str = "CONSTRUIR_VM_VARIABLES";

/// Where the checkout is in the VM (`/job/src`).
pub const PROJECT_DIR: &str = "/job/src";

impl Spec {
    /// What `vars` ask for; `Err` says, for the job's trace, what is wrong.
    pub fn read(job_id: u64, vars: &Vars, defaults: &Defaults) -> Result<Spec, String> {
        let image = image(vars, defaults)?;
        jobfile::name::check_image(&image).map_err(|e| format!("image {image:?}: {e}"))?;
        let size = match vars.get("CONSTRUIR_JOB_SIZE") {
            Some(s) => jobfile::units::parse_size(s).map_err(|e| format!("CONSTRUIR_JOB_SIZE {s:?}: {e}"))?,
            None => defaults.size,
        };
        let verify_on = match vars.get("CONSTRUIR_VERIFY_ON") {
            None => None,
            Some("1") => Some(1),
            Some("2") => Some(2),
            Some(other) => return Err(format!("CONSTRUIR_VERIFY_ON is {other:?}: 1 or 2")),
        };
        let debug = match vars.get("CONSTRUIR_DEBUG") {
            None => false,
            Some(v) => flag(v).ok_or_else(|| format!("CONSTRUIR_DEBUG is {v:?}: true or false"))?,
        };
        let timeout = match vars.get("CI_JOB_TIMEOUT") {
            None => None,
            Some(s) => {
                Some(Duration::from_secs(s.parse().map_err(|_| format!("CI_JOB_TIMEOUT is {s:?}, not seconds"))?))
            }
        };
        let (env, withheld) = vm_env(vars);
        Ok(Spec {
            name: format!("gl{job_id}"),
            image,
            size,
            verify_on,
            debug,
            packages: list(vars.get("CONSTRUIR_PACKAGES"), &[',']),
            caches: list(vars.get("CONSTRUIR_CACHES"), &[',', ' ']),
            timeout,
            source: source(vars)?,
            env,
            withheld,
        })
    }
}

/// `image: construir:<N>` (GitLab's `CI_JOB_IMAGE`), else `CONSTRUIR_IMAGE`, else the runner's default.
fn image(vars: &Vars, defaults: &Defaults) -> Result<String, String> {
    if let Some(image) = vars.get("CI_JOB_IMAGE") {
        return image.strip_prefix("construir:").map(|n| n.trim_start_matches('i').to_owned()).ok_or_else(|| {
            format!("image: {image} is not a construir image; this runner runs `image: construir:<N>` (N an image number on its hosts)")
        });
    }
    if let Some(n) = vars.get("CONSTRUIR_IMAGE") {
        return Ok(n.trim_start_matches('i').to_owned());
    }
    defaults.image.clone().ok_or_else(|| {
        "no image: give the job `image: construir:<N>`, or set CONSTRUIR_IMAGE (this runner has no --default-image)"
            .to_owned()
    })
}

fn source(vars: &Vars) -> Result<Source, String> {
    let url = vars.get("CI_REPOSITORY_URL").ok_or("GitLab sent no CI_REPOSITORY_URL")?.to_owned();
    let sha = vars.get("CI_COMMIT_SHA").ok_or("GitLab sent no CI_COMMIT_SHA")?.to_owned();
    if sha.len() < 7 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("CI_COMMIT_SHA {sha:?} is not a commit id"));
    }
    let depth = match vars.get("GIT_DEPTH") {
        None => 50,
        Some(d) => d.parse().map_err(|_| format!("GIT_DEPTH is {d:?}, not a number"))?,
    };
    Ok(Source { url, sha, ref_name: vars.get("CI_COMMIT_REF_NAME").map(str::to_owned), depth })
}

fn flag(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" => Some(false),
        _ => None,
    }
}

fn list(v: Option<&str>, seps: &[char]) -> Vec<String> {
    v.unwrap_or_default().split(seps).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// The variables for the VM, and the names of those kept out: masked ones
/// unless the project names them in `CONSTRUIR_VM_VARIABLES`, and, always,
/// those that carry the job's token (any variable whose value holds it).
fn vm_env(vars: &Vars) -> (Vec<(String, String)>, Vec<String>) {
    let allowed = list(vars.get(VM_VARIABLES), &[',', ' ']);
    let token = vars.get("CI_JOB_TOKEN").filter(|t| t.len() >= 4);
    let (mut env, mut withheld) = (Vec::new(), Vec::new());
    for (key, (value, masked)) in &vars.0 {
        let carries_token = NEVER_IN_VM.contains(&key.as_str()) || token.is_some_and(|t| value.contains(t));
        if carries_token || (*masked && !allowed.contains(key)) || !shell_name(key) {
            withheld.push(key.clone());
        } else {
            env.push((key.clone(), value.clone()));
        }
    }
    env.push(("CI_PROJECT_DIR".to_owned(), PROJECT_DIR.to_owned()));
    env.push(("CI_BUILDS_DIR".to_owned(), "/job".to_owned()));
    env.push(("CONSTRUIR_GITLAB".to_owned(), "true".to_owned()));
    (env, withheld)
}

/// A name a shell can export.
fn shell_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<(&'static str, &'static str, bool)> {
        vec![
            ("CI_REPOSITORY_URL", "https://gitlab-ci-token:s3cr3t-token@forge.test/p.git", false),
            ("CI_COMMIT_SHA", "265c14cf140a66cfc61e40e4ab45c95ba8df5ed1", false),
            ("CI_JOB_TOKEN", "s3cr3t-token", false),
            ("CI_JOB_NAME", "build", false),
        ]
    }

    fn read(extra: &[(&'static str, &'static str, bool)], defaults: &Defaults) -> Result<Spec, String> {
        let mut v = base();
        v.extend_from_slice(extra);
        Spec::read(7, &Vars::from_pairs(&v), defaults)
    }

    const NO_DEFAULT: Defaults = Defaults { image: None, size: 1 << 20 };

    #[test]
    fn the_image_comes_from_image_then_the_variable_then_the_default() {
        assert_eq!(read(&[("CI_JOB_IMAGE", "construir:3", false)], &NO_DEFAULT).map(|s| s.image), Ok("3".to_owned()));
        assert_eq!(read(&[("CONSTRUIR_IMAGE", "i4", false)], &NO_DEFAULT).map(|s| s.image), Ok("4".to_owned()));
        let with_default = Defaults { image: Some("9".to_owned()), size: 1 };
        assert_eq!(read(&[], &with_default).map(|s| s.image), Ok("9".to_owned()));
        let e = read(&[("CI_JOB_IMAGE", "debian:bookworm", false)], &with_default).expect_err("a docker image");
        assert!(e.contains("debian:bookworm is not a construir image"), "{e}");
        assert!(read(&[], &NO_DEFAULT).expect_err("no image").contains("no image"));
        let e = read(&[("CI_JOB_IMAGE", "construir:1;reboot", false)], &NO_DEFAULT).expect_err("bad");
        assert!(e.starts_with("image \"1;reboot\""), "{e}");
    }

    #[test]
    fn the_construir_variables_are_read_and_bad_values_refused() {
        let s = read(
            &[
                ("CONSTRUIR_IMAGE", "1", false),
                ("CONSTRUIR_JOB_SIZE", "8M", false),
                ("CONSTRUIR_PACKAGES", "pkg-config, libssl-dev (>= 3)", false),
                ("CONSTRUIR_CACHES", "ccache cargo", false),
                ("CONSTRUIR_DEBUG", "true", false),
                ("CONSTRUIR_VERIFY_ON", "2", false),
                ("CI_JOB_TIMEOUT", "600", false),
            ],
            &NO_DEFAULT,
        )
        .expect("a spec");
        assert_eq!((s.size, s.verify_on, s.debug), (8 << 20, Some(2), true));
        assert_eq!(s.packages, ["pkg-config", "libssl-dev (>= 3)"]);
        assert_eq!(s.caches, ["ccache", "cargo"]);
        assert_eq!(s.timeout, Some(Duration::from_secs(600)));
        assert_eq!(s.name, "gl7");
        for (k, v, says) in [
            ("CONSTRUIR_VERIFY_ON", "3", "1 or 2"),
            ("CONSTRUIR_DEBUG", "maybe", "true or false"),
            ("CONSTRUIR_JOB_SIZE", "lots", "CONSTRUIR_JOB_SIZE"),
        ] {
            let e = read(&[("CONSTRUIR_IMAGE", "1", false), (k, v, false)], &NO_DEFAULT).expect_err(k);
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn masked_variables_and_the_job_token_stay_out_of_the_vm() {
        let s = read(
            &[
                ("CONSTRUIR_IMAGE", "1", false),
                ("DEPLOY_KEY", "k1", true),
                ("SIGNING_KEY", "k2", true),
                (VM_VARIABLES, "SIGNING_KEY,CI_JOB_TOKEN", false),
                ("PLAIN", "p", false),
                ("LEAKY", "x s3cr3t-token y", false),
                ("not-a-name", "v", false),
            ],
            &NO_DEFAULT,
        )
        .expect("a spec");
        let names: Vec<&str> = s.env.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&"PLAIN") && names.contains(&"SIGNING_KEY") && names.contains(&"CI_JOB_NAME"));
        for kept_out in ["DEPLOY_KEY", "CI_JOB_TOKEN", "CI_REPOSITORY_URL", "LEAKY", "not-a-name"] {
            assert!(!names.contains(&kept_out), "{kept_out} reached the VM");
            assert!(s.withheld.iter().any(|w| w == kept_out), "{kept_out} not listed as withheld");
        }
        assert!(s.env.iter().all(|(_, v)| !v.contains("s3cr3t-token")), "the token reached the VM");
        assert!(s.env.contains(&("CI_PROJECT_DIR".to_owned(), PROJECT_DIR.to_owned())));
    }
}
