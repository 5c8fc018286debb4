//! `construir`: the submitter's one program. It packs a job, submits it to a
//! construir-server, follows it, fetches the result and reads it safely
//! (the same bounded readers as `construir-host job`). One file for each
//! command (`commands/`); `connect` reaches the server.

mod cli;
mod commands;
mod connect;
mod show;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use jobfile::tools;

use cli::{CacheCommand, Cli, Command};
use commands::fetch::Fetch;
use commands::submit::Submit;
use connect::connect;

fn run(cli: Cli) -> Result<ExitCode> {
    let api = || connect(&cli);
    match &cli.command {
        Command::Pack(request) => {
            let packed = tools::pack(request)?;
            for w in &packed.warnings {
                eprintln!("construir: warning: {w}");
            }
            println!("{}", packed.path.display());
        }
        Command::Submit {
            path,
            image,
            size,
            name,
            packages,
            debian_control,
            caches,
            verify_on,
            debug,
            no_result_cache,
            wait,
        } => {
            let submit = Submit {
                path: path.clone(),
                image: image.clone(),
                size: *size,
                name: name.clone(),
                packages: packages.clone(),
                debian_control: debian_control.clone(),
                caches: caches.clone(),
                verify_on: *verify_on,
                debug: *debug,
                no_result_cache: *no_result_cache,
                wait: *wait,
            };
            return commands::submit::run(&api()?, submit);
        }
        Command::Wait { id } => return commands::wait::run(&api()?, id),
        Command::Status { id } => commands::status::run(&api()?, id)?,
        Command::Log { id, follow, run } => commands::log::run(&api()?, id, *follow, *run)?,
        Command::Fetch { id, out, unpack, no_verify, run } => {
            let fetch =
                Fetch { id: id.clone(), out: out.clone(), unpack: unpack.clone(), no_verify: *no_verify, run: *run };
            return commands::fetch::run(&api()?, fetch);
        }
        Command::List => commands::list::run(&api()?)?,
        Command::Hosts => commands::hosts::run(&api()?)?,
        Command::Cache(CacheCommand::List { json }) => commands::cache::list(&api()?, *json)?,
        Command::Cache(CacheCommand::Clear { name, all: _ }) => commands::cache::clear(&api()?, name.clone())?,
        Command::Cache(CacheCommand::Results { json }) => commands::cache::results(&api()?, *json)?,
        Command::Cache(CacheCommand::Forget { key, all: _ }) => commands::cache::forget(&api()?, key.as_deref())?,
        Command::Cancel { id } => commands::cancel::run(&api()?, id)?,
        Command::Debug { id } => return commands::debug::run(&api()?, id),
        Command::Rerun { id, debug, wait } => return commands::rerun::run(&api()?, id, *debug, *wait),
        Command::Page => commands::page::run(&api()?)?,
        Command::Unpack { file, dir } => commands::unpack::run(file, dir)?,
        Command::Verify { file, provenance, keys } => {
            return commands::verify::run(api, file, provenance.clone(), keys);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("construir: error: {}", chain.join(": "));
            ExitCode::from(2)
        }
    }
}
