//! Debian's own resolver, apt, under a private configuration: its sources,
//! lists, cache and state live in a directory of ours, the dpkg state it
//! resolves against is an image's (never the host's), it trusts only the
//! archive keyring it is given, and it needs no root. The host's own apt
//! configuration and state are neither read nor touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jobfile::command::{self, CommandError};
use jobfile::image::Archive;
use thiserror::Error;

/// How long `apt-get update` may take.
const UPDATE_LIMIT: Duration = Duration::from_secs(300);
/// How long resolving or looking up may take.
const RESOLVE_LIMIT: Duration = Duration::from_secs(120);
/// How long downloading a job's packages may take.
const DOWNLOAD_LIMIT: Duration = Duration::from_secs(30 * 60);
/// apt's own downloader, run by scripts "with the same proxy configuration
/// or acquire system as APT would" (its words): part of the `apt` package.
const APT_HELPER: &str = "/usr/lib/apt/apt-helper";

#[derive(Debug, Error)]
pub enum AptError {
    #[error("cannot prepare apt's directory {path}")]
    Prepare { path: PathBuf, source: std::io::Error },
    #[error("cannot read the archive {uri} {suite} (is it reachable, and signed by a key in {keyring}?)")]
    Update { uri: String, suite: String, keyring: PathBuf, source: Box<CommandError> },
    #[error("apt cannot satisfy the job's dependencies: {why}")]
    Unsatisfiable { why: String },
    #[error("apt-cache cannot show {what}")]
    Show { what: String, source: Box<CommandError> },
    #[error("apt's record of {name} {version} has no {field}")]
    Incomplete { name: String, version: String, field: &'static str },
    #[error("cannot download packages from the archive {uri}")]
    Download { uri: String, source: Box<CommandError> },
    #[error("stopped: {what} was cut short (the host is stopping, or the job was cancelled)")]
    Halted { what: String },
}

impl AptError {
    /// `e` from running `what`, or [`AptError::Halted`] when it was halted.
    fn from_command(e: CommandError, or: impl FnOnce(Box<CommandError>) -> AptError) -> AptError {
        match e {
            CommandError::Halted { what } => AptError::Halted { what },
            e => or(Box::new(e)),
        }
    }
}

/// One archive, as apt sees it from our directory `dir`.
#[derive(Debug, Clone)]
pub struct Apt {
    dir: PathBuf,
    archive: Archive,
    keyring: PathBuf,
}

impl Apt {
    /// apt for `archive` in `dir` (made when missing), trusting `keyring` alone.
    pub fn new(dir: &Path, archive: &Archive, keyring: &Path) -> Result<Apt, AptError> {
        let apt = Apt { dir: dir.to_owned(), archive: archive.clone(), keyring: keyring.to_owned() };
        let prep = |path: PathBuf| move |source| AptError::Prepare { path, source };
        for sub in ["etc", "lists/partial", "cache/archives/partial", "log"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(prep(path.clone()))?;
        }
        let sources = dir.join("etc/sources.list");
        let line = format!(
            "deb [arch={} signed-by={}] {} {} {}\n",
            archive.architecture,
            keyring.display(),
            archive.uri,
            archive.suite,
            archive.components.join(" ")
        );
        // Written whole under a new name and renamed: a link planted in their place is replaced, never followed.
        jobfile::layout::write_whole(&sources, line.as_bytes()).map_err(prep(sources.clone()))?;
        let conf = dir.join("apt.conf");
        jobfile::layout::write_whole(&conf, apt.config().as_bytes()).map_err(prep(conf.clone()))?;
        Ok(apt)
    }

    /// The whole configuration: every directory apt would read or write is
    /// ours, and no parts directory is read at all (`/nonexistent`, which
    /// only root could make): a file planted in a parts directory would
    /// be apt configuration, and apt's configuration can run commands.
    fn config(&self) -> String {
        let d = self.dir.display();
        let arch = &self.archive.architecture;
        format!(
            "Dir \"{d}/\";\n\
             Dir::Etc \"{d}/etc/\";\n\
             Dir::Etc::SourceList \"{d}/etc/sources.list\";\n\
             Dir::Etc::Main \"/nonexistent/apt.conf\";\n\
             Dir::Etc::Netrc \"/nonexistent/auth.conf\";\n\
             Dir::Etc::NetrcParts \"/nonexistent/auth.conf.d/\";\n\
             Dir::Etc::SourceParts \"/nonexistent/sources.list.d/\";\n\
             Dir::Etc::Parts \"/nonexistent/apt.conf.d/\";\n\
             Dir::Etc::Preferences \"/nonexistent/preferences\";\n\
             Dir::Etc::PreferencesParts \"/nonexistent/preferences.d/\";\n\
             Dir::Etc::Trusted \"/nonexistent/trusted.gpg\";\n\
             Dir::Etc::TrustedParts \"/nonexistent/trusted.gpg.d/\";\n\
             Dir::State \"{d}/\";\n\
             Dir::State::Lists \"{d}/lists/\";\n\
             Dir::Cache \"{d}/cache/\";\n\
             Dir::Log \"{d}/log/\";\n\
             APT::Architecture \"{arch}\";\n\
             APT::Architectures {{ \"{arch}\"; }};\n\
             APT::Install-Recommends \"false\";\n\
             APT::Install-Suggests \"false\";\n\
             APT::Get::Show-Versions \"true\";\n\
             Acquire::Languages \"none\";\n\
             Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled \"false\";\n\
             Debug::NoLocking \"true\";\n"
        )
    }

    fn command(&self, program: &str, status: Option<&Path>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C.UTF-8")
            .env("APT_CONFIG", self.dir.join("apt.conf"))
            .current_dir(&self.dir);
        let status = status.map_or_else(|| self.dir.join("status"), Path::to_owned);
        cmd.arg("-o").arg(format!("Dir::State::status={}", status.display()));
        cmd
    }

    /// Whether the lists are there and younger than `fresh`.
    /// Its directory: `lists/`, `cache/`, its configuration.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_fresh(&self, fresh: Duration) -> bool {
        let stamp = self.dir.join("lists/.updated");
        fs::metadata(stamp).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age < fresh))
    }

    /// `apt-get update`: fetches the signed `InRelease` and the indices it
    /// lists, each checked against it (apt refuses anything unsigned or changed).
    pub fn update(&self, halt: &dyn Fn() -> bool) -> Result<(), AptError> {
        let empty = self.dir.join("status");
        if !empty.exists() {
            fs::write(&empty, "").map_err(|source| AptError::Prepare { path: empty.clone(), source })?;
        }
        let mut cmd = self.command("apt-get", None);
        cmd.args(["-q", "-o", "APT::Update::Error-Mode=any", "update"]);
        command::run_until(&mut cmd, "apt-get update", UPDATE_LIMIT, |_| {}, halt).map_err(|e| {
            AptError::from_command(e, |source| AptError::Update {
                uri: self.archive.uri.clone(),
                suite: self.archive.suite.clone(),
                keyring: self.keyring.clone(),
                source,
            })
        })?;
        let stamp = self.dir.join("lists/.updated");
        fs::write(&stamp, "").map_err(|source| AptError::Prepare { path: stamp, source })
    }

    /// What `apt-get satisfy` would do to the dpkg state `status` to
    /// satisfy `relations`: the packages it installs (name, version) and
    /// those it removes.
    pub fn satisfy(&self, status: &Path, relations: &[String], halt: &dyn Fn() -> bool) -> Result<Simulated, AptError> {
        let mut cmd = self.command("apt-get", Some(status));
        cmd.args(["-s", "-q", "satisfy"]).arg(relations.join(", "));
        let out =
            command::run_until(&mut cmd, "apt-get satisfy", RESOLVE_LIMIT, |_| {}, halt).map_err(|e| match e {
                CommandError::Halted { what } => AptError::Halted { what },
                e => AptError::Unsatisfiable { why: explain(&e) },
            })?;
        Ok(parse_simulation(&out))
    }

    /// The archive's record of each (name, version): its sha256, size and path.
    pub fn show(&self, packages: &[(String, String)]) -> Result<Vec<jobfile::deps::Pinned>, AptError> {
        if packages.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = self.command("apt-cache", None);
        cmd.arg("show").args(packages.iter().map(|(n, v)| format!("{n}={v}")));
        let out = command::run(&mut cmd, "apt-cache show", RESOLVE_LIMIT, |_| {}).map_err(|source| AptError::Show {
            what: format!("{} packages", packages.len()),
            source: Box::new(source),
        })?;
        let records = parse_records(&out);
        packages
            .iter()
            .map(|(name, version)| {
                let rec = records
                    .iter()
                    .find(|r| r.get("Package") == Some(name) && r.get("Version") == Some(version))
                    .ok_or(AptError::Incomplete { name: name.clone(), version: version.clone(), field: "record" })?;
                let field = |f: &'static str| {
                    rec.get(f).cloned().ok_or(AptError::Incomplete {
                        name: name.clone(),
                        version: version.clone(),
                        field: f,
                    })
                };
                let sha256 = field("SHA256")?;
                let size = field("Size")?;
                if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(AptError::Incomplete { name: name.clone(), version: version.clone(), field: "SHA256" });
                }
                Ok(jobfile::deps::Pinned {
                    name: name.clone(),
                    version: version.clone(),
                    architecture: field("Architecture")?,
                    sha256: sha256.to_ascii_lowercase(),
                    size: size.parse().map_err(|_| AptError::Incomplete {
                        name: name.clone(),
                        version: version.clone(),
                        field: "Size",
                    })?,
                    filename: field("Filename")?,
                })
            })
            .collect()
    }

    /// Downloads each file of the archive (its path there, e.g.
    /// `pool/main/...`) into `into` as `<sha256>.deb`, with apt's own
    /// downloader: apt refuses a file whose sha256 is not the one given
    /// (the caller checks again). No lists are needed, so a version the
    /// archive still holds is found even when its newest lists no longer name it.
    pub fn fetch_files(&self, files: &[(&str, &str)], into: &Path, halt: &dyn Fn() -> bool) -> Result<(), AptError> {
        if files.is_empty() {
            return Ok(());
        }
        let mut cmd = self.command(APT_HELPER, None);
        cmd.current_dir(into).args(["-q", "download-file"]);
        for (path, sha256) in files {
            cmd.arg(self.file_uri(path)).arg(format!("{sha256}.deb")).arg(format!("SHA256:{sha256}"));
        }
        command::run_until(&mut cmd, "apt-helper download-file", DOWNLOAD_LIMIT, |_| {}, halt).map(drop).map_err(|e| {
            AptError::from_command(e, |source| AptError::Download { uri: self.archive.uri.clone(), source })
        })
    }

    /// Where the archive serves the file at `path` (already checked to be a
    /// plain relative path under `pool/`).
    fn file_uri(&self, path: &str) -> String {
        format!("{}/{path}", self.archive.uri.trim_end_matches('/'))
    }
}

/// apt's explanation of why it cannot satisfy, on one line: the lines that
/// name what is wrong (`... Depends: x but it is not installable`, `E: ...`).
fn explain(e: &CommandError) -> String {
    let CommandError::Failed { tail, .. } = e else { return jobfile::error_chain(e) };
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("Depends:") || l.contains("Conflicts:") || l.starts_with("E: "))
        .collect();
    if lines.is_empty() {
        tail.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
    } else {
        lines.join("; ")
    }
}

/// What `apt-get -s` says it would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Simulated {
    /// (name, version) installed, or upgraded to.
    pub install: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// The `Inst` and `Remv` lines of `apt-get -s`.
pub fn parse_simulation(out: &str) -> Simulated {
    let (mut install, mut remove) = (Vec::new(), Vec::new());
    for line in out.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Inst"), Some(name)) => {
                // `Inst name [old] (new release [arch])`: the version is the first word in parentheses.
                let Some(open) = line.find(" (") else { continue };
                let Some(version) = line[open + 2..].split_whitespace().next() else { continue };
                install.push((name.to_owned(), version.to_owned()));
            }
            (Some("Remv"), Some(name)) => remove.push(name.to_owned()),
            _ => {}
        }
    }
    install.sort();
    remove.sort();
    Simulated { install, remove }
}

/// deb822 records (`Field: value`, folded lines joined) as maps.
fn parse_records(text: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut out = Vec::new();
    let mut cur: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            last = None;
        } else if line.starts_with([' ', '\t']) {
            if let Some(v) = last.as_ref().and_then(|k| cur.get_mut(k)) {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            cur.insert(k.to_owned(), v.trim().to_owned());
            last = Some(k.to_owned());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_reads_no_parts_directory_and_its_files_replace_planted_links() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("apt");
        fs::create_dir_all(dir.join("etc/apt.conf.d")).expect("mkdir");
        // What another user could have planted: a config part, and links where apt's files go.
        fs::write(dir.join("etc/apt.conf.d/99evil"), "APT::Update::Pre-Invoke { \"touch /tmp/owned\"; };\n")
            .expect("part");
        let victim = tmp.path().join("victim");
        fs::write(&victim, "kept").expect("victim");
        std::os::unix::fs::symlink(&victim, dir.join("apt.conf")).expect("link");
        std::os::unix::fs::symlink(&victim, dir.join("etc/sources.list")).expect("link");
        let archive = Archive {
            uri: "http://archive.invalid/debian".into(),
            suite: "bookworm".into(),
            components: vec!["main".into()],
            architecture: "amd64".into(),
            dpkg_status: "var/lib/dpkg/status".into(),
        };
        let apt = Apt::new(&dir, &archive, Path::new("/usr/share/keyrings/debian-archive-keyring.gpg")).expect("apt");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "kept", "a planted link was followed");
        assert!(!fs::symlink_metadata(dir.join("apt.conf")).expect("conf").file_type().is_symlink());
        let conf = apt.config();
        let d = dir.display().to_string();
        for part in ["Dir::Etc::Parts", "Dir::Etc::PreferencesParts", "Dir::Etc::SourceParts", "Dir::Etc::Main"] {
            let line = conf.lines().find(|l| l.starts_with(&format!("{part} "))).expect(part);
            assert!(line.contains("/nonexistent/") && !line.contains(&d), "{line}");
        }
        // apt itself, reading the configuration as it would for a job: nothing of the planted part.
        fs::write(dir.join("etc/apt.conf"), "APT::Update::Post-Invoke { \"touch /tmp/owned\"; };\n").expect("main");
        let out = apt.command("apt-config", None).arg("dump").output().expect("apt-config");
        let dump = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && dump.contains("Dir::Etc::parts \"/nonexistent/apt.conf.d/\""), "{dump}");
        assert!(!dump.contains("touch /tmp/owned"), "a planted file was read as configuration:\n{dump}");
    }

    #[test]
    fn a_simulation_says_what_is_installed_upgraded_and_removed() {
        let out = "\
NOTE: This is only a simulation!
Inst libssl3 [3.0.15-1~deb12u1] (3.0.17-1~deb12u2 Debian:12.12/stable [amd64])
Inst libssl-dev (3.0.17-1~deb12u2 Debian:12.12/stable [amd64])
Remv old-thing [1.0]
Conf libssl3 (3.0.17-1~deb12u2 Debian:12.12/stable [amd64])
";
        let Simulated { install, remove } = parse_simulation(out);
        assert_eq!(
            install,
            [
                ("libssl-dev".to_owned(), "3.0.17-1~deb12u2".to_owned()),
                ("libssl3".to_owned(), "3.0.17-1~deb12u2".to_owned())
            ]
        );
        assert_eq!(remove, ["old-thing"]);
    }

    #[test]
    fn records_are_read_field_by_field() {
        let r = parse_records("Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nSHA256: ff\n");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].get("Description").map(String::as_str), Some("x\nmore"));
        assert_eq!(r[1].get("SHA256").map(String::as_str), Some("ff"));
    }
}
