//! `image-builder`: parse the command line, build, print the error chain once.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::time::Duration;

use construir_image_builder::debootstrap::{self, DebootstrapOptions};
use construir_image_builder::list;
use construir_image_builder::mini::{self, MiniOptions};
use construir_image_builder::verify::{self, VerifyOptions};
use jobfile::arch::Arch;

#[derive(Parser)]
#[command(name = "image-builder", version, about = "Make base images for construir (images/i<N>/)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A tiny image: a kernel and an initramfs with construir-init and static busybox
    /// (this machine's, or for another --arch the Debian archive's).
    Mini {
        /// The image directory to create (e.g. images/i0).
        #[arg(long)]
        out: PathBuf,
        /// The guest's architecture: amd64 (x86_64) or arm64 (aarch64) [default: this machine's].
        #[arg(long, value_name = "ARCH", default_value_t = Arch::host())]
        arch: Arch,
        /// Kernel to use [default: the newest /boot/vmlinuz-*]; its modules must be in /lib/modules/<version>.
        /// This machine's architecture only.
        #[arg(long, value_name = "VMLINUZ")]
        kernel: Option<PathBuf>,
        /// construir-init to use [default: the one for ARCH beside this program].
        #[arg(long, value_name = "PATH")]
        init: Option<PathBuf>,
        /// Static busybox giving jobs /bin/sh and the usual tools [default: /bin/busybox].
        /// This machine's architecture only.
        #[arg(long, value_name = "PATH")]
        busybox: Option<PathBuf>,
        /// Another architecture: the Debian suite its kernel and busybox come from.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Another architecture: the Debian mirror [default: the one this machine's apt sources use for SUITE].
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
        /// Another architecture: where the archive's lists and packages are kept between builds
        /// [default: ~/.cache/construir/image-builder].
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Replace an existing image at --out.
        #[arg(long)]
        force: bool,
    },
    /// A Debian image (needs root): debootstrap minbase with the architecture's kernel
    /// (linux-image-amd64, linux-image-arm64), build-essential, bzip2 and xz-utils,
    /// construir-init, a root disk in qcow2.
    Debootstrap {
        /// The image directory to create (e.g. images/i100).
        #[arg(long)]
        out: PathBuf,
        /// The guest's architecture: amd64 (x86_64) or arm64 (aarch64) [default: this machine's].
        /// Another than this machine's needs qemu-user-static registered with binfmt_misc.
        #[arg(long, value_name = "ARCH", default_value_t = Arch::host())]
        arch: Arch,
        /// Debian suite.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// More packages, comma separated.
        #[arg(long, value_name = "PKG,...", value_delimiter = ',')]
        include: Vec<String>,
        /// Debian mirror [default: the one this machine's apt sources use for SUITE].
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
        /// Size of the root filesystem (room for jobs to build in; sparse).
        #[arg(long, default_value = "20G", value_parser = jobfile::units::size_arg)]
        size: u64,
        /// construir-init to install [default: the one beside this program].
        #[arg(long, value_name = "PATH")]
        init: Option<PathBuf>,
        /// Keep downloaded packages here between builds (debootstrap --cache-dir).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Replace an existing image at --out.
        #[arg(long)]
        force: bool,
    },
    /// List the images in DIR: kind, suite, kernel, size, creation date, and whether each verifies;
    /// then the layers hosts built on them (jobs' packages installed once).
    List {
        /// The images directory (holding i<N>/).
        dir: PathBuf,
        /// The hosts' layers [default: DIR/../cache/layers].
        #[arg(long, value_name = "DIR")]
        layers: Option<PathBuf>,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Check an image's files against its image.toml, then boot it with a
    /// smoke job and report whether the job ran and came back.
    Verify {
        /// The image directory (e.g. images/i100).
        image: PathBuf,
        /// construir-host to run the job with [default: the one beside this program].
        #[arg(long, value_name = "PATH")]
        host: Option<PathBuf>,
        /// How long the smoke job may take.
        #[arg(long, default_value = "300")]
        timeout_secs: u64,
        /// Accelerator: auto, kvm or tcg.
        #[arg(long, default_value = "auto")]
        accel: String,
    },
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell
    /// (scripts/install puts them where each shell looks).
    Completions { shell: jobfile::manual::CompletionShell },
    /// Write this program's man pages (one per subcommand) into DIR.
    Man { dir: PathBuf },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mini { out, arch, kernel, init, busybox, suite, mirror, cache, force } => {
            let path = mini::build(&MiniOptions { out, arch, kernel, init, busybox, suite, mirror, cache, force })?;
            println!("{}", path.display());
        }
        Command::Debootstrap { out, arch, suite, include, mirror, size, init, cache, force } => {
            let opts = DebootstrapOptions { out, arch, suite, include, mirror, size, init, cache, force };
            let path = debootstrap::build(&opts)?;
            println!("{}", path.display());
        }
        Command::Verify { image, host, timeout_secs, accel } => {
            let opts = VerifyOptions { image: image.clone(), host, timeout: Duration::from_secs(timeout_secs), accel };
            let report = verify::verify(&opts)?;
            println!(
                "{}: the smoke job ran ({}) and came back in {:.1} s",
                image.display(),
                report.status.result.as_str(),
                report.seconds
            );
            print!("{}", report.output);
        }
        Command::Completions { shell } => {
            use std::io::Write;
            std::io::stdout().write_all(&jobfile::manual::completions(Cli::command(), shell))?;
        }
        Command::Man { dir } => {
            for page in jobfile::manual::write_man_pages(Cli::command(), &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?
            {
                println!("{}", page.display());
            }
        }
        Command::List { dir, layers, json } => {
            let listed = list::list(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
            let layers = layers.unwrap_or_else(|| jobfile::layout::sibling(&dir, "cache").join("layers"));
            // From the records; construir-host checks a layer's sha256 when it uses it.
            let layers = jobfile::deps::layer_summaries(&layers);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "images": listed, "layers": layers }))?
                );
            } else {
                print!("{}{}", list::render(&dir, &listed), list::render_layers(&layers));
            }
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
