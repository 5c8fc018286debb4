//! `image-builder`: parse the command line, build, print the error chain once.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use construir_image_builder::mini::{self, MiniOptions};

#[derive(Parser)]
#[command(
    name = "image-builder",
    version,
    about = "Make base images for construir (images/i<N>/)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A tiny image: this machine's kernel and an initramfs with construir-init and static busybox.
    Mini {
        /// The image directory to create (e.g. images/i0).
        #[arg(long)]
        out: PathBuf,
        /// Kernel to use [default: the newest /boot/vmlinuz-*]; its modules must be in /lib/modules/<version>.
        #[arg(long, value_name = "VMLINUZ")]
        kernel: Option<PathBuf>,
        /// construir-init to use [default: the one beside this program].
        #[arg(long, value_name = "PATH")]
        init: Option<PathBuf>,
        /// Static busybox giving jobs /bin/sh and the usual tools.
        #[arg(long, value_name = "PATH", default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Replace an existing image at --out.
        #[arg(long)]
        force: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mini {
            out,
            kernel,
            init,
            busybox,
            force,
        } => {
            let path = mini::build(&MiniOptions {
                out,
                kernel,
                init,
                busybox,
                force,
            })?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("image-builder: error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
