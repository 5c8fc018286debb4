//! `construir-host`: parse the command line, run, print the error chain once.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use construir_host::job::{self, PackRequest};
use construir_host::units::{human_size, parse_size};

#[derive(Parser)]
#[command(
    name = "construir-host",
    version,
    about = "Build strangers' jobs in throwaway QEMU VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make and read job files (for people who submit jobs).
    #[command(subcommand)]
    Job(JobCommand),
}

#[derive(Subcommand)]
enum JobCommand {
    /// Pack DIR (which must hold bin/construir) into <name>_i<image>.tar.xz and print its path.
    Pack {
        /// The job directory.
        dir: PathBuf,
        /// Base image number to run on (images/i<N>).
        #[arg(long, value_name = "N")]
        image: String,
        /// File size, which is also how much output the job may return: 10M, 500K, 1G
        /// (powers of 1024; rounded up to 512 bytes; at least 64K).
        #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
        size: u64,
        /// Job name [default: DIR's name].
        #[arg(long)]
        name: Option<String>,
        /// Directory to write the job file into.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// xz preset, 0 (fastest) to 9 (smallest).
        #[arg(long, default_value_t = jobfile::xz::DEFAULT_PRESET, value_parser = clap::value_parser!(u32).range(0..=9))]
        xz_preset: u32,
        /// Replace an existing job file of the same name.
        #[arg(long)]
        force: bool,
    },
    /// Print the job's output (job_output.txt) from a result file.
    Log { file: PathBuf },
    /// Print the job's status (job_status.json) from a result file.
    Status { file: PathBuf },
    /// List the entries of a job or result file.
    List { file: PathBuf },
    /// Extract a result file safely into DIR (new or empty).
    Unpack { file: PathBuf, dir: PathBuf },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Job(cmd) => run_job(cmd),
    }
}

fn run_job(cmd: JobCommand) -> Result<()> {
    match cmd {
        JobCommand::Pack {
            dir,
            image,
            size,
            name,
            out,
            xz_preset,
            force,
        } => {
            let packed = job::pack(&PackRequest {
                dir,
                image,
                size,
                name,
                out,
                preset: xz_preset,
                force,
            })?;
            for w in &packed.warnings {
                eprintln!("construir-host: warning: {w}");
            }
            eprintln!(
                "construir-host: packed {} into a {} job file",
                human_size(packed.compressed),
                human_size(packed.size)
            );
            println!("{}", packed.path.display());
        }
        JobCommand::Log { file } => job::log(&file)?,
        JobCommand::Status { file } => {
            let status = job::status(&file)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        JobCommand::List { file } => {
            job::list(&file, &mut std::io::stdout().lock())?;
        }
        JobCommand::Unpack { file, dir } => {
            let report = job::unpack(&file, &dir)?;
            for s in &report.skipped {
                eprintln!("construir-host: skipped {}: {}", s.path, s.reason);
            }
            if report.skipped_total > report.skipped.len() as u64 {
                eprintln!(
                    "construir-host: ... and {} more skipped",
                    report.skipped_total - report.skipped.len() as u64
                );
            }
            eprintln!(
                "construir-host: unpacked {} files, {} directories, {} symlinks, {} hardlinks ({}) into {}",
                report.files,
                report.dirs,
                report.symlinks,
                report.hardlinks,
                human_size(report.bytes),
                dir.display()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("construir-host: error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
