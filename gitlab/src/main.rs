//! `construir-gitlab`: construir as a GitLab runner. It takes CI jobs from
//! a GitLab instance (as a runner registered there, with the
//! `gitlab-runner` crate) and runs each in a construir VM, through a
//! construir server as one account or through a local queue: the
//! repository fetched on this side, the job's lines run in the checkout,
//! the console streamed into the job's trace, the artifacts uploaded from
//! the result with its signed provenance.

mod api;
mod artifacts;
mod backend;
mod cli;
mod compose;
mod dependencies;
mod follow;
mod handler;
mod journal;
mod spec;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser};
use gitlab_runner::{GitlabLayer, RunnerBuilder};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::prelude::*;

use crate::backend::Backend;
use crate::cli::{Cli, Command, RunArgs};
use crate::handler::{CiJob, Ctx};
use crate::journal::Journal;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Runtime::new().map_err(Into::into).and_then(|rt| rt.block_on(run(*args))),
        Command::Completions { shell } => {
            use std::io::Write;
            std::io::stdout().write_all(&jobfile::manual::completions(Cli::command(), shell)).map_err(Into::into)
        }
        Command::Man { dir } => jobfile::manual::write_man_pages(Cli::command(), &dir)
            .with_context(|| format!("cannot write man pages into {}", dir.display()))
            .map(|pages| pages.iter().for_each(|p| println!("{}", p.display()))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("construir-gitlab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token from a file: its first line, which must not be empty; the file must not be readable by others.
fn read_token(path: &Path, what: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} holds the {what} and others can read it (mode {:03o}): chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        bail!("{} is empty: it must hold the {what}", path.display());
    }
    Ok(token)
}

fn backend(args: &RunArgs) -> Result<Arc<dyn Backend>> {
    if let Some(queue) = &args.queue {
        if !queue.is_dir() {
            bail!("--queue {}: no such directory", queue.display());
        }
        return Ok(Arc::new(backend::queue::Queue { dirs: jobfile::layout::Beside::queue(queue) }));
    }
    let Some(server) = &args.server else {
        bail!("give --server URL (with --token-file) or --queue DIR: where the jobs go")
    };
    let Some(token_file) = &args.token_file else {
        bail!("--server needs --token-file FILE: the construir account's token")
    };
    let token = read_token(token_file, "construir account token")?;
    let settings = wire::client::Settings {
        server: server.clone(),
        token: Ok(token),
        ca_cert: args.ca_cert.clone(),
        timeout: None,
    };
    let api = wire::client::Api::new(&settings)?;
    // Fails now, not at the first job, when the server or the token is wrong.
    let me: wire::Whoami = api
        .get("whoami")
        .with_context(|| format!("cannot ask the construir server at {server} who the account token is"))?;
    eprintln!("construir-gitlab: construir server {server}, account {}", jobfile::sanitize(me.account.as_bytes()));
    Ok(Arc::new(backend::server::Server { api }))
}

async fn run(args: RunArgs) -> Result<()> {
    let runner_token = read_token(&args.runner_token_file, "GitLab runner token")?;
    let backend = backend(&args)?;
    let (url, token) = (args.gitlab_url.clone(), runner_token.clone());
    tokio::task::spawn_blocking(move || api::verify_runner(&url, &token)).await??;
    let builds = args.state_dir.join("builds");
    // What a stopped runner left of its builds is of no use (the journal says what is owed).
    let _ = std::fs::remove_dir_all(&builds);
    std::fs::create_dir_all(&builds).with_context(|| format!("cannot make {}", builds.display()))?;
    let journal = Arc::new(Journal::open(args.state_dir.join("journal"))?);
    let (layer, jobs) = GitlabLayer::new();
    start_tracing(layer);
    finish_owed(&journal, &backend, &args.gitlab_url);
    let mut runner = RunnerBuilder::new(args.gitlab_url.clone(), runner_token, &builds, jobs)
        .version(env!("CARGO_PKG_VERSION"))
        .platform("linux")
        .architecture(std::env::consts::ARCH)
        .build()
        .await;
    let ctx = Arc::new(Ctx {
        backend: backend.clone(),
        defaults: spec::Defaults { image: args.default_image.clone(), size: args.default_size },
        journal,
    });
    let stop = CancellationToken::new();
    watch_signals(stop.clone())?;
    eprintln!(
        "construir-gitlab: taking jobs from {} for {}, {} at once",
        args.gitlab_url,
        backend.describe(),
        args.concurrent
    );
    take_jobs(&mut runner, &ctx, &args, &stop).await;
    if runner.running() > 0 {
        eprintln!(
            "construir-gitlab: stopping: taking no more jobs; waiting for the {} in hand to end",
            runner.running()
        );
        runner.drain().await;
    }
    eprintln!("construir-gitlab: stopped");
    Ok(())
}

/// The crate's layer, which carries each job's `outputln!` lines to its
/// trace, and our log on standard error (`CONSTRUIR_GITLAB_LOG`, default `warn`).
fn start_tracing<L>(layer: L)
where
    L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync,
{
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONSTRUIR_GITLAB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter))
        .init();
}

/// Finishes, in the background, each job the journal says was in hand when the runner stopped.
fn finish_owed(journal: &Arc<Journal>, backend: &Arc<dyn Backend>, gitlab: &url::Url) {
    let (owed, unreadable) = journal.entries();
    for name in unreadable {
        eprintln!("construir-gitlab: the journal's {name} cannot be read; left as it is");
    }
    for entry in owed {
        eprintln!(
            "construir-gitlab: GitLab job {} was in hand when the runner stopped: finishing it",
            entry.gitlab_job
        );
        tokio::spawn(journal::recover(entry, backend.clone(), gitlab.clone(), journal.clone()));
    }
}

/// Asks GitLab for jobs while there is room, until `stop`.
async fn take_jobs(runner: &mut gitlab_runner::Runner, ctx: &Arc<Ctx>, args: &RunArgs, stop: &CancellationToken) {
    while !stop.is_cancelled() {
        tokio::select! {
            _ = runner.wait_for_space(args.concurrent as usize) => {}
            _ = stop.cancelled() => break,
        }
        let c = ctx.clone();
        // Not cancel-safe (GitLab may have handed a job over): never raced against the stop.
        match runner.request_job(move |job| async move { Ok(CiJob::new(job, c)) }).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => eprintln!("construir-gitlab: cannot ask {} for a job: {e}", args.gitlab_url),
        }
        tokio::select! {
            _ = tokio::time::sleep(args.poll) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// SIGTERM or SIGINT: stop taking jobs and let those in hand end. A second
/// one: stop now (the journal says on the next start what was left).
fn watch_signals(stop: CancellationToken) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if n > 0 {
                eprintln!("construir-gitlab: stopping now; the jobs in hand are finished on the next start");
                std::process::exit(1);
            }
            stop.cancel();
        }
    });
    Ok(())
}
