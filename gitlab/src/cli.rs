//! construir-gitlab's command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "construir-gitlab",
    version,
    about = "construir as a GitLab runner: each CI job runs in a construir VM",
    long_about = "construir as a GitLab runner. It takes CI jobs from a GitLab instance and runs each in a \
construir VM, through a construir server (as one account) or a local queue. The repository is fetched here at \
the job's commit; the VM gets the checkout and the job's variables, never the job's token or the network. \
Each job's console streams into its trace; its artifacts are uploaded from the result, with the result's \
signed provenance (construir-provenance.intoto.jsonl, when artifacts:paths lists it)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take jobs from GitLab until stopped (SIGTERM or SIGINT: take no more, let those in hand
    /// end; a second signal: stop now, and finish them on the next start).
    Run(Box<RunArgs>),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell
    /// (scripts/install puts them where each shell looks).
    Completions { shell: jobfile::manual::CompletionShell },
    /// Write this program's man pages (one per subcommand) into DIR.
    Man { dir: PathBuf },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The GitLab instance: https://gitlab.example.org/
    #[arg(long, env = "CONSTRUIR_GITLAB_URL", value_name = "URL")]
    pub gitlab_url: url::Url,
    /// The file holding the runner's authentication token (glrt-…, from "New project/group/instance
    /// runner" in GitLab), mode 0600.
    #[arg(long, env = "CONSTRUIR_GITLAB_RUNNER_TOKEN_FILE", value_name = "FILE")]
    pub runner_token_file: PathBuf,
    /// The construir server the jobs go to: http(s)://host:port
    #[arg(long, env = "CONSTRUIR_SERVER", value_name = "URL", conflicts_with = "queue")]
    pub server: Option<String>,
    /// The file holding the construir account's token (with --server), mode 0600.
    #[arg(long, env = "CONSTRUIR_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A CA to trust (PEM) for an https construir server.
    #[arg(long, env = "CONSTRUIR_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// A local queue that construir-host runs, instead of a server (no verified rebuilds).
    #[arg(long, value_name = "DIR")]
    pub queue: Option<PathBuf>,
    /// Jobs in hand at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrent: u32,
    /// Checkouts, job files and results while jobs run, and the journal of jobs in hand.
    #[arg(long, default_value = "/var/lib/construir-gitlab", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The image for jobs that name none (no `image: construir:<N>`, no CONSTRUIR_IMAGE).
    #[arg(long, value_name = "N")]
    pub default_image: Option<String>,
    /// The job size for jobs that set no CONSTRUIR_JOB_SIZE: what the checkout and everything the
    /// job leaves in it may come to.
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = jobfile::units::size_arg)]
    pub default_size: u64,
    /// How long to wait between two asks for a job when GitLab had none.
    #[arg(long, default_value = "3s", value_name = "DURATION", value_parser = jobfile::units::duration_arg)]
    pub poll: Duration,
}
