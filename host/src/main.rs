//! `construir-host`: parse the command line, run, print the error chain once.

mod cli;

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use cli::args::{Cli, Command, QueueArgs};
use cli::cache::run_cache;
use cli::doctor::doctor;
use cli::job::run_job;
use cli::run_one::run_one;
use cli::settings::{show_config, with_config};
use cli::setup::run_queue;

fn run(cli: Cli, argv: &[OsString]) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let (args, matches, _) = with_config(&args, argv, "run")?;
            if args.show_config {
                print!("{}", show_config(&args, &matches));
                return Ok(ExitCode::SUCCESS);
            }
            run_queue(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Doctor(args) => {
            let (args, _, file) = with_config(&args, argv, "doctor")?;
            doctor(args, file)
        }
        Command::RunOne(args) => Ok(run_one(*args).unwrap_or_else(|e| {
            eprintln!("construir-host: error: {e:#}");
            ExitCode::from(2)
        })),
        Command::Status { at, recent, json } => status(at, recent, json).map(|()| ExitCode::SUCCESS),
        Command::Job(cmd) => run_job(cmd).map(|()| ExitCode::SUCCESS),
        Command::Debug { file, running } => debug(&file, running),
        Command::Cache(cmd) => run_cache(cmd).map(|()| ExitCode::SUCCESS),
        Command::Key { at, host_id, host_key } => key(at, host_id, host_key).map(|()| ExitCode::SUCCESS),
        Command::Completions { shell } => {
            use std::io::Write;
            std::io::stdout().write_all(&jobfile::manual::completions(Cli::command(), shell))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            for page in jobfile::manual::write_man_pages(Cli::command(), &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?
            {
                println!("{}", page.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `construir-host status`: the queue, its hosts and the latest jobs, and the package layers.
fn status(at: QueueArgs, recent: usize, json: bool) -> Result<()> {
    let (shared, _, file) = at.resolve()?;
    let mut status = construir_host::status::gather(&shared, recent)?;
    let cache = QueueArgs::package_cache(&shared, &file);
    status.layers = construir_host::status::layers(&cache.join("layers"));
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", construir_host::status::render(&status));
    }
    Ok(())
}

/// `construir-host debug`: this terminal on a local job's debug session.
fn debug(file: &std::path::Path, running: Option<std::path::PathBuf>) -> Result<ExitCode> {
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let job = jobfile::JobName::parse(name)
        .with_context(|| format!("{} is not a job file's name (<name>_i<image>.tar.xz)", file.display()))?;
    let running = running.unwrap_or_else(|| {
        let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        dir.join("..").join("running")
    });
    let input = std::ffi::OsString::from(job.input_file_name());
    let Some(session) = jobfile::debug::read_session(&running, &input) else {
        eprintln!(
            "construir-host: job {} has no debug session open in {} (it ended ok, was not packed with --debug, \
             or its session has ended)",
            job.input_file_name(),
            running.display()
        );
        return Ok(ExitCode::FAILURE);
    };
    let mut link = jobfile::debug::connect(&running, &input)
        .with_context(|| format!("cannot reach the debug session of {}", job.input_file_name()))?;
    eprintln!(
        "construir-host: attached to {} on host {} (the session ends by {}); type ~. to leave\r",
        job.input_file_name(),
        session.host,
        jobfile::units::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(session.ends_by))
    );
    let ended = jobfile::terminal::attach(&mut link)?;
    eprintln!(
        "\r\nconstruir-host: {}\r",
        match ended {
            jobfile::terminal::Ended::Left => "left the session; its VM is powered off",
            jobfile::terminal::Ended::Closed => "the session ended",
            jobfile::terminal::Ended::InputEnded => "input ended; the session ends",
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `construir-host key`: this host's public key (made when it has none), as a server pins it.
fn key(at: QueueArgs, host_id: Option<String>, host_key: Option<std::path::PathBuf>) -> Result<()> {
    let (shared, _, file) = at.resolve()?;
    let host_id = host_id
        .or_else(|| file.value("host-id").map(|v| v.to_string_lossy().into_owned()))
        .unwrap_or_else(construir_host::daemon::default_host_id);
    let path = host_key
        .or_else(|| file.value("host-key").map(std::path::PathBuf::from))
        .unwrap_or_else(|| construir_host::provenance::default_key_path(&shared.queue, &host_id));
    let (key, made) = construir_provenance::HostKey::load_or_create(&path)
        .with_context(|| format!("cannot have a host key at {}", path.display()))?;
    if made {
        eprintln!("construir-host: made a new host key at {}", path.display());
    }
    println!("{} {host_id}", key.public());
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match run(Cli::parse_from(&argv), &argv) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("construir-host: error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
