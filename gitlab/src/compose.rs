//! The construir job a CI job becomes. The repository is fetched here, at
//! the job's commit (the VM never sees the job's token or the network);
//! the job directory holds our `bin/construir`, the script lines, the
//! variables meant for the VM, a `construir.toml`, and the checkout in
//! `src/`; it is packed into a job file as `construir pack` packs one.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use jobfile::deps::{Declaration, DECLARATION};
use jobfile::tools::{self, PackRequest};

use crate::spec::{Source, Spec};

/// Our files in the job, beside the checkout.
pub const OURS: &str = ".gitlab-ci";
/// The checkout, in the job directory (`/job/src` in the VM).
pub const SRC: &str = "src";

/// Which of a CI job's lines a construir job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `before_script` and `script`.
    Script,
    /// `after_script`, on what the script left.
    After,
}

impl Part {
    fn job_name(self, spec: &Spec) -> String {
        match self {
            Part::Script => spec.name.clone(),
            Part::After => format!("{}-after", spec.name),
        }
    }
}

/// Fetches `source` into `into` (a new directory) and checks out its commit.
/// The URL's user and password go to git through a credential helper that
/// reads them from git's environment: they are never in git's arguments,
/// and git never records them (it writes the URL it fetched, plain, into
/// `FETCH_HEAD`, which is removed anyway). Says what went wrong in git's words.
pub fn checkout(source: &Source, into: &Path) -> Result<(), String> {
    let (plain, credentials) = split_credentials(&source.url);
    let git = |args: &[&str]| -> Result<(), String> {
        let mut cmd = git_command(credentials.as_ref());
        cmd.arg("-C").arg(into).args(args);
        let out = cmd.output().map_err(|e| format!("cannot run git: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let mut said = String::from_utf8_lossy(&out.stderr).into_owned();
        if let Some((_, password)) = &credentials {
            said = said.replace(password.as_str(), "[token]");
        }
        Err(format!("git {}: {}", args.first().copied().unwrap_or_default(), jobfile::sanitize(said.trim().as_bytes())))
    };
    fs::create_dir_all(into).map_err(|e| format!("cannot make {}: {e}", into.display()))?;
    git(&["init", "-q"])?;
    let depth = format!("--depth={}", source.depth);
    let mut fetch = vec!["fetch", "-q", "--no-tags"];
    if source.depth > 0 {
        fetch.push(&depth);
    }
    fetch.push(&plain);
    let by_commit = [fetch.clone(), vec![source.sha.as_str()]].concat();
    if let Err(e) = git(&by_commit) {
        // A server that gives no commit by its id alone: its branch or tag, which holds it.
        let Some(r) = &source.ref_name else { return Err(e) };
        git(&[fetch, vec![r.as_str()]].concat()).map_err(|e2| format!("{e}; by its ref {r}: {e2}"))?;
    }
    git(&["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", &source.sha])?;
    let _ = fs::remove_file(into.join(".git/FETCH_HEAD"));
    Ok(())
}

/// `git`, asked nothing on a terminal, with `credentials` (user, password)
/// from a helper reading them from its environment.
fn git_command(credentials: Option<&(String, String)>) -> Command {
    let mut cmd = Command::new("git");
    cmd.env("GIT_TERMINAL_PROMPT", "0").env("GIT_ASKPASS", "/bin/false");
    if let Some((user, password)) = credentials {
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "credential.helper")
            .env(
                "GIT_CONFIG_VALUE_0",
                r#"!f() { test "$1" = get && printf 'username=%s\npassword=%s\n' "$CONSTRUIR_GIT_USER" "$CONSTRUIR_GIT_PASSWORD"; }; f"#,
            )
            .env("CONSTRUIR_GIT_USER", user)
            .env("CONSTRUIR_GIT_PASSWORD", password);
    }
    cmd
}

/// The URL without its user and password, and those (percent-decoded) when it had them.
fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            let credentials = (decode(u.username()), decode(u.password().unwrap_or_default()));
            let _ = u.set_username("");
            let _ = u.set_password(None);
            (u.to_string(), Some(credentials))
        }
        _ => (url.to_owned(), None),
    }
}

/// Makes the job directory `dir` around the checkout already in `dir/src`,
/// for `lines` of the CI job, with the checkout's own `construir.toml`
/// (to which the job's variables add); its `verify-on`, if it says one.
pub fn job_dir(dir: &Path, spec: &Spec, part: Part, lines: &[String]) -> Result<Option<u32>, String> {
    let io = |what: &Path, e: std::io::Error| format!("cannot write {}: {e}", what.display());
    fs::create_dir_all(dir.join("bin")).map_err(|e| io(dir, e))?;
    fs::create_dir_all(dir.join(OURS)).map_err(|e| io(dir, e))?;
    let script = dir.join(jobfile::JOB_SCRIPT);
    fs::write(&script, LAUNCHER).map_err(|e| io(&script, e))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).map_err(|e| io(&script, e))?;
    let lines_file = dir.join(OURS).join("script");
    fs::write(&lines_file, script_text(part, lines)).map_err(|e| io(&lines_file, e))?;
    let env_file = dir.join(OURS).join("env");
    fs::write(&env_file, env_text(&spec.env)).map_err(|e| io(&env_file, e))?;
    let (declaration, verify_on) = declaration(dir, spec, part)?;
    let path = dir.join(DECLARATION);
    if let Some(d) = declaration {
        fs::write(&path, d.to_toml()).map_err(|e| io(&path, e))?;
    }
    Ok(verify_on)
}

/// Packs `dir` into `<out>/<name>_i<image>.tar.xz`.
pub fn pack(dir: &Path, spec: &Spec, part: Part, out: &Path) -> Result<PathBuf, String> {
    let packed = tools::pack(&PackRequest {
        dir: dir.to_owned(),
        image: spec.image.clone(),
        size: spec.size,
        name: Some(part.job_name(spec)),
        out: out.to_owned(),
        preset: jobfile::xz::DEFAULT_PRESET,
        force: true,
        packages: Vec::new(),
        debian_control: None,
        caches: Vec::new(),
        debug: false,
    })
    .map_err(|e| jobfile::error_chain(&e))?;
    Ok(packed.path)
}

/// The repository's `construir.toml` (its `debian-control` made a path in
/// the job), with the job's `CONSTRUIR_*` packages, caches and debug added;
/// none when nothing is declared; and its `verify-on`. The after-script
/// part keeps what the script's job declared (it is in `dir` already) but
/// never a debug session.
fn declaration(dir: &Path, spec: &Spec, part: Part) -> Result<(Option<Declaration>, Option<u32>), String> {
    let (file, prefix) = match part {
        Part::Script => (dir.join(SRC).join(DECLARATION), format!("{SRC}/")),
        Part::After => (dir.join(DECLARATION), String::new()),
    };
    let (mut d, verify_on) = match fs::read_to_string(&file) {
        Ok(text) => repository_declaration(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Declaration::default(), None),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    if part == Part::After {
        d.debug = false;
    } else {
        d.debian_control = d.debian_control.map(|c| format!("{prefix}{c}"));
        d.packages.extend(spec.packages.iter().cloned());
        for c in &spec.caches {
            if !d.caches.contains(c) {
                d.caches.push(c.clone());
            }
        }
        d.debug |= spec.debug;
    }
    Ok(((d != Declaration::default()).then_some(d), verify_on))
}

/// A repository's `construir.toml`: a job's declaration, plus `verify-on`
/// (1 or 2), which is no part of a job file's but of how it is submitted.
fn repository_declaration(text: &str) -> Result<(Declaration, Option<u32>), String> {
    let mut table: toml::Table =
        text.parse().map_err(|e| format!("the repository's {DECLARATION} is not valid: {e}"))?;
    let verify_on = match table.remove("verify-on") {
        None => None,
        Some(toml::Value::Integer(n @ 1..=2)) => Some(n as u32),
        Some(other) => return Err(format!("the repository's {DECLARATION}: verify-on is {other}: 1 or 2")),
    };
    let rest = toml::to_string(&table).map_err(|e| e.to_string())?;
    let d = Declaration::parse(&rest).map_err(|e| format!("the repository's {e}"))?;
    Ok((d, verify_on))
}

/// The job's `bin/construir`: the variables, once read, are removed (they
/// never come back in the result), then the lines run in the checkout.
const LAUNCHER: &str = r#"#!/bin/sh
# Made by construir-gitlab: one GitLab CI job's lines, run in its checkout.
cd /job || exit 1
if [ -f .gitlab-ci/env ]; then
    . ./.gitlab-ci/env
    rm -f .gitlab-ci/env
fi
cd "$CI_PROJECT_DIR" || exit 1
if command -v bash >/dev/null 2>&1; then
    exec bash -e /job/.gitlab-ci/script
fi
exec sh -e /job/.gitlab-ci/script
"#;

/// Each line shown as GitLab's runner shows it (`$ make`), then run, under `set -e`.
fn script_text(part: Part, lines: &[String]) -> String {
    let what = match part {
        Part::Script => "before_script and script",
        Part::After => "after_script",
    };
    let mut text = format!("# construir-gitlab: the job's {what}\nset -e\n");
    for line in lines {
        let first = line.lines().next().unwrap_or_default();
        let more = if line.lines().nth(1).is_some() { " # collapsed multi-line command" } else { "" };
        text.push_str(&format!("printf '%s\\n' {}\n{line}\n", quoted(&format!("$ {first}{more}"))));
    }
    text
}

fn env_text(env: &[(String, String)]) -> String {
    env.iter().map(|(k, v)| format!("export {k}={}\n", quoted(v))).collect()
}

/// `s` in single quotes for a POSIX shell.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url_and_reach_git_only_through_its_helper() {
        let (plain, credentials) = split_credentials("https://gitlab-ci-token:t%2Bk@forge.test/g/p.git");
        assert_eq!(plain, "https://forge.test/g/p.git");
        let credentials = credentials.expect("credentials");
        assert_eq!(credentials, ("gitlab-ci-token".to_owned(), "t+k".to_owned()));
        assert_eq!(split_credentials("/srv/repo.git"), ("/srv/repo.git".to_owned(), None));
        // What git's credential machinery gets for that host: the user and the password.
        let mut cmd = git_command(Some(&credentials));
        cmd.args(["credential", "fill"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("git");
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(b"protocol=https\nhost=forge.test\n\n").expect("write");
        let out = child.wait_with_output().expect("git credential fill");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("username=gitlab-ci-token\n") && text.contains("password=t+k\n"), "{text}");
        let args: Vec<_> =
            git_command(Some(&credentials)).get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.iter().all(|a| !a.contains("t+k")), "{args:?}");
    }

    #[test]
    fn the_repository_may_say_verify_on_besides_what_a_job_declares() {
        let (d, v) = repository_declaration("verify-on = 2\npackages = [\"pkg-config\"]\n").expect("valid");
        assert_eq!((d.packages.as_slice(), v), (["pkg-config".to_owned()].as_slice(), Some(2)));
        assert_eq!(repository_declaration("").expect("empty"), (Declaration::default(), None));
        let e = repository_declaration("verify-on = 3\n").expect_err("3");
        assert!(e.contains("verify-on is 3: 1 or 2"), "{e}");
        let e = repository_declaration("pakages = []\n").expect_err("unknown key");
        assert!(e.starts_with("the repository's construir.toml is not valid"), "{e}");
    }

    #[test]
    fn lines_are_shown_and_run_and_values_quoted_for_the_shell() {
        let text = script_text(Part::Script, &["echo 'hi'".to_owned(), "for i in 1 2; do\n  echo $i\ndone".to_owned()]);
        assert!(text.starts_with("# construir-gitlab: the job's before_script and script\nset -e\n"), "{text}");
        assert!(text.contains("printf '%s\\n' '$ echo '\\''hi'\\'''\necho 'hi'\n"), "{text}");
        assert!(text.contains("'$ for i in 1 2; do # collapsed multi-line command'"), "{text}");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{}\necho \"$A|$B\"",
                env_text(&[("A".into(), "it's $HOME".into()), ("B".into(), "x\ny".into())])
            ))
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $HOME|x\ny\n");
    }
}
