//! `run`'s and `doctor`'s options from the command line and `host.toml`
//! merged (a flag given wins), and `--show-config`.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use construir_host::config;

use crate::cli::args::{run_command, Cli, Command, RunArgs};

/// The `run` options (for `run` or `doctor`, named `sub`) with the config
/// file's in front of the command line's (the last of each wins), the
/// matches they came from, and the file read.
pub(crate) fn with_config(
    args: &RunArgs,
    argv: &[OsString],
    sub: &str,
) -> Result<(RunArgs, ArgMatches, Option<PathBuf>)> {
    let mut file = config::FileArgs::default();
    let path = config::choose(args.config.as_deref());
    if let Some(path) = &path {
        file = config::load(path, &run_command())?;
    }
    let at = argv.iter().position(|a| a == sub).with_context(|| format!("no `{sub}` on the command line"))?;
    let mut merged = argv[..=at].to_vec();
    merged.extend(file.flags);
    merged.extend_from_slice(&argv[at + 1..]);
    let matches = Cli::command().try_get_matches_from(&merged).unwrap_or_else(|e| e.exit());
    let sub_matches = matches.subcommand_matches(sub).expect("parsed as the same subcommand").clone();
    let (Command::Run(mut args) | Command::Doctor(mut args)) = Cli::from_arg_matches(&matches)?.command else {
        unreachable!("parsed as run or doctor")
    };
    args.queue = args.queue.or(file.queue);
    Ok((*args, sub_matches, path))
}

/// The options in effect, as a host.toml would set them.
pub(crate) fn show_config(args: &RunArgs, matches: &ArgMatches) -> String {
    let mut out = String::new();
    match &args.queue {
        Some(q) => out.push_str(&format!("queue = {}\n", toml_string(&q.to_string_lossy()))),
        None => out.push_str("# queue = (not set)\n"),
    }
    for arg in run_command().get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else { continue };
        if matches!(long, "config" | "show-config" | "help" | "version") {
            continue;
        }
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            out.push_str(&format!("{long} = {}\n", matches.get_flag(id)));
        } else if let Some(raw) = matches.get_raw(id).and_then(|mut v| v.next()) {
            out.push_str(&format!("{long} = {}\n", toml_string(&raw.to_string_lossy())));
        } else {
            out.push_str(&format!("# {long} = (not set)\n"));
        }
    }
    out
}

/// A value as TOML: whole numbers bare, anything else a string.
pub(crate) fn toml_string(s: &str) -> String {
    match s.parse::<i64>() {
        Ok(n) => n.to_string(),
        Err(_) => toml::Value::String(s.to_owned()).to_string(),
    }
}
