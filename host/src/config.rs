//! `/etc/construir/host.toml`: every option of `construir-host run`, as a
//! file. Each key is a `run` flag's long name (`timeout = "3h"`,
//! `workers = 2`, `enable-networking = false`) or `queue`. The file is
//! turned into the flags it stands for, checked by the same parsers as the
//! command line, and put before the command line's own flags, so a flag
//! given there wins.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command};
use thiserror::Error;

/// Where `run` looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/construir/host.toml";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not valid TOML")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{path}: unknown key `{key}` (the keys are `run`'s long options, as in `construir-host run --help`)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("{path}: key `{key}`: {message}")]
    Value { path: PathBuf, key: String, message: String },
}

/// A configuration file, as `run` flags.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileArgs {
    /// `--key value` and `--flag` arguments, by key.
    pub flags: Vec<OsString>,
    /// The `queue` key, if set.
    pub queue: Option<PathBuf>,
}

impl FileArgs {
    /// The value the file gives `key` (a long option's name), if any.
    pub fn value(&self, key: &str) -> Option<&OsStr> {
        let flag = format!("--{key}");
        self.flags.windows(2).rev().find(|w| w[0] == flag.as_str()).map(|w| w[1].as_os_str())
    }
}

/// Keys that are `run` options but make no sense in a file.
const NOT_IN_FILE: &[&str] = &["config", "show-config", "help", "version"];

/// Reads `path` and checks every key and value against `run` (the clap
/// command the flags are for).
pub fn load(path: &Path, run: &Command) -> Result<FileArgs, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text, path, run)
}

/// `load`, from text already read (`path` names it in errors).
pub fn parse(text: &str, path: &Path, run: &Command) -> Result<FileArgs, ConfigError> {
    let table: toml::Table =
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
    let mut out = FileArgs::default();
    for (key, value) in table {
        let bad = |message: String| ConfigError::Value { path: path.to_owned(), key: key.clone(), message };
        if key == "queue" {
            let toml::Value::String(q) = value else { return Err(bad("must be a string (a directory)".into())) };
            out.queue = Some(PathBuf::from(q));
            continue;
        }
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| ConfigError::UnknownKey { path: path.to_owned(), key: key.clone() })?;
        let flag = OsString::from(format!("--{key}"));
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                toml::Value::Boolean(true) => out.flags.push(flag),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("must be true or false".into())),
            }
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            _ => return Err(bad("must be a string or a whole number".into())),
        };
        // The same parser the command line uses, so the file accepts exactly what the flag does.
        let alone = [OsStr::new("run"), &flag, OsStr::new(&text)];
        if let Err(e) = run.clone().try_get_matches_from(alone) {
            return Err(bad(clap_message(&e)));
        }
        out.flags.push(flag);
        out.flags.push(text.into());
    }
    Ok(out)
}

/// A clap error's message alone: no "error:" prefix, usage or help hint.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// Which file `run` reads: `--config FILE` (which must exist), else the
/// default path when it exists, else none.
pub fn choose(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_owned()),
        None => Some(PathBuf::from(DEFAULT_PATH)).filter(|p| p.exists()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn run() -> Command {
        Command::new("run")
            .arg(Arg::new("timeout").long("timeout").value_parser(jobfile::units::duration_arg))
            .arg(Arg::new("workers").long("workers").value_parser(clap::value_parser!(u32).range(1..=256)))
            .arg(Arg::new("once").long("once").action(ArgAction::SetTrue))
            .arg(Arg::new("config").long("config"))
    }

    fn parsed(text: &str) -> Result<FileArgs, ConfigError> {
        parse(text, Path::new("host.toml"), &run())
    }

    #[test]
    fn keys_become_flags_checked_by_the_flags_own_parsers() {
        let got = parsed("queue = \"/srv/q\"\ntimeout = \"90m\"\nworkers = 4\nonce = true\n").expect("valid");
        assert_eq!(got.queue, Some(PathBuf::from("/srv/q")));
        let flags: Vec<_> = got.flags.iter().map(|f| f.to_string_lossy().into_owned()).collect();
        assert_eq!(flags, ["--once", "--timeout", "90m", "--workers", "4"]);
        assert!(parsed("once = false").expect("valid").flags.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let table: &[(&str, &str)] = &[
            ("timout = \"3h\"", "host.toml: unknown key `timout`"),
            ("config = \"/x\"", "host.toml: unknown key `config`"),
            ("timeout = \"3 fortnights\"", "host.toml: key `timeout`: invalid value '3 fortnights' for '--timeout"),
            ("workers = 0", "host.toml: key `workers`: invalid value '0' for '--workers"),
            ("workers = 1.5", "host.toml: key `workers`: must be a string or a whole number"),
            ("once = \"yes\"", "host.toml: key `once`: must be true or false"),
            ("queue = 3", "host.toml: key `queue`: must be a string"),
        ];
        for (text, want) in table {
            let e = parsed(text).expect_err(text).to_string();
            assert!(e.starts_with(want), "{text}: {e}");
        }
        assert!(matches!(parsed("timeout = "), Err(ConfigError::Parse { .. })));
    }
}
