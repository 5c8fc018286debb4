//! `construir-host`: parse the command line, run, print the error chain once.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use construir_host::daemon::{self, RunOptions};
use construir_host::jail::{IdPool, IdRange, JailRoot};
use construir_host::logger::LogFormat;
use construir_host::qemu::Confiner;
use construir_host::queue::{Dirs, Rules};
use construir_host::status::StatusDirs;
use construir_host::worker::Limits;
use construir_host::{cgroup, config, jail, kvm, logger};
use jobfile::tools::{self, PackRequest};
use jobfile::units::{duration_arg, human_size, size_arg};

#[derive(Parser)]
#[command(name = "construir-host", version, about = "Build strangers' jobs in throwaway QEMU VMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the jobs dropped into QUEUE, each in a throwaway VM.
    ///
    /// Every option can also be set in /etc/construir/host.toml (or --config
    /// FILE), keyed by its long name: `timeout = "3h"`, `workers = 2`,
    /// `enable-networking = false`, `queue = "/srv/construir/queue"`.
    /// Options given here override the file.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// Run one job file in a throwaway VM and write its result beside it, for
    /// schedulers (Slurm, HTCondor, Nomad, CI runners) that bring their own queue.
    ///
    /// Exits 0 when the job's script exited 0; 1 when the job ran and failed,
    /// timed out or was refused (the reason is printed, and left in
    /// <file>.reason beside the result); 2 when it could not be run at all.
    /// Takes `run`'s VM options (--images, --timeout, --memory, --cpus, ...), on the
    /// command line only: it reads no config file.
    #[command(name = "run-one", args_override_self = true)]
    RunOne(Box<RunOneArgs>),
    /// Check every requirement of `run` as configured, one line each with the fix; exits 1 when one blocks.
    ///
    /// Takes the same options (and config file) as `run`.
    #[command(args_override_self = true)]
    Doctor(Box<RunArgs>),
    /// What is happening now: jobs waiting, running, stuck, and recent results.
    ///
    /// Read from the directories alone: it works beside running hosts, for a
    /// queue that several hosts share, and after a host has died.
    Status {
        #[command(flatten)]
        at: QueueArgs,
        /// How many recent results to show.
        #[arg(long, default_value_t = 10)]
        recent: usize,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Make and read job files (for people who submit jobs).
    #[command(subcommand)]
    Job(JobCommand),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell
    /// (scripts/install puts them where each shell looks).
    Completions { shell: jobfile::manual::CompletionShell },
    /// Write this program's man pages (one per subcommand) into DIR.
    Man { dir: PathBuf },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AccelChoice {
    /// KVM where it really runs guests, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The queue directory: drop <name>_i<image>.tar.xz files here [default: `queue` in the config file].
    queue: Option<PathBuf>,
    /// Read options from FILE [default: /etc/construir/host.toml, when it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the options in effect (the config file and the command line together), as host.toml, and exit.
    #[arg(long)]
    show_config: bool,
    /// Handle every job now in the queue, then exit.
    #[arg(long)]
    once: bool,
    /// Jobs run at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    workers: u32,
    #[command(flatten)]
    dirs: DirArgs,
    /// How long a job script may run: 3h, 90m, 20s.
    #[arg(long, default_value = "3h", value_parser = duration_arg)]
    timeout: Duration,
    /// Time allowed beyond --timeout for booting and packing before the VM is killed.
    #[arg(long, default_value = "2m", value_parser = duration_arg)]
    grace: Duration,
    /// Memory of each VM.
    #[arg(long, default_value = "2G", value_parser = size_arg)]
    memory: u64,
    /// CPUs of each VM.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Give VMs a user-mode network (off by default: jobs get no network).
    #[arg(long)]
    enable_networking: bool,
    /// This host's name in RUNNING/ and work files [default: the hostname].
    #[arg(long)]
    host_id: Option<String>,
    /// Most console output kept in each job's .log.
    #[arg(long, default_value = "2M", value_parser = size_arg)]
    log_limit: u64,
    /// Largest job file accepted.
    #[arg(long, default_value = "64G", value_parser = size_arg)]
    max_size: u64,
    /// A job file must be unchanged this long before it is claimed (it may still be being written).
    #[arg(long, default_value = "2s", value_parser = duration_arg)]
    settle: Duration,
    /// Give up on a job (to failed/) after the host died this many times while running it.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: u32,
    /// After SIGTERM or SIGINT, how long running jobs may go on before they are stopped and requeued.
    #[arg(long, default_value = "60s", value_parser = duration_arg)]
    stop_timeout: Duration,
    /// How often to rescan the queue besides watching it.
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    rescan: Duration,
    /// QEMU binary (7.2 or newer).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// When the host runs as root, each VM runs as its own uid and gid from
    /// FIRST:COUNT (no two live VMs share one; the range must hold no
    /// account or group). The default lies above systemd's container ranges.
    #[arg(long, value_name = "FIRST:COUNT", default_value_t = IdRange::DEFAULT)]
    vm_ids: IdRange,
    /// Where the locks that hold each VM's uid live (shared by every host on this machine).
    #[arg(long, value_name = "DIR", default_value = IdPool::LOCK_DIR)]
    vm_id_locks: PathBuf,
    /// End a VM whose init has not said it started within this; its job goes back once.
    #[arg(long, default_value = "2m", value_parser = duration_arg)]
    boot_timeout: Duration,
    /// End a job whose VM prints nothing on its console for this long [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    silence_timeout: Option<Duration>,
    /// Write Prometheus metrics to FILE (text format, replaced atomically every
    /// few seconds), for node_exporter's textfile collector [default: none].
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<PathBuf>,
    /// Log lines as text, in the journal's form (priority, no time of ours), or as JSON;
    /// auto picks journal when stderr is systemd's journal, text otherwise.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    /// Log debug lines too.
    #[arg(short, long)]
    verbose: bool,
    /// Take jobs from this construir-server (http(s)://HOST:PORT) instead of a
    /// shared queue. QUEUE is then this host's private spool, filled by the
    /// host alone; images the server offers and the host lacks are fetched
    /// into --images, each verified against the server's checksums.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// The host account's token, in FILE [default: $CONSTRUIR_HOST_TOKEN].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Trust this CA certificate (PEM) for the server's TLS certificate.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// With --server: how often to ask for work while there is room.
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    poll: Duration,
}

/// `run-one`: one job file through the same machinery, without a queue.
#[derive(clap::Args)]
struct RunOneArgs {
    /// The job file, <name>_i<image>.tar.xz (left as it is; the VM gets a copy).
    file: PathBuf,
    /// Where to write the result (<name>_d<image>.tar.xz) and its .log [default: beside FILE].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

/// The directories beside the queue.
#[derive(clap::Args, Clone, Default)]
struct DirArgs {
    /// Base images (i<N>/image.toml) [default: QUEUE/../images].
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Results [default: QUEUE/../done].
    #[arg(long, value_name = "DIR")]
    done: Option<PathBuf>,
    /// Refused and broken jobs, each with a .reason [default: QUEUE/../failed].
    #[arg(long, value_name = "DIR")]
    failed: Option<PathBuf>,
    /// Claimed jobs; this host uses RUNNING/<host-id> [default: QUEUE/../running].
    #[arg(long, value_name = "DIR")]
    running: Option<PathBuf>,
    /// Working copies and QEMU's temporary files, on local disk [default: QUEUE/../work].
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
}

impl DirArgs {
    /// Fills what is unset from the config file's values.
    fn or_file(mut self, file: &config::FileArgs) -> DirArgs {
        let pick = |flag: &str| file.value(flag).map(PathBuf::from);
        self.images = self.images.or_else(|| pick("images"));
        self.done = self.done.or_else(|| pick("done"));
        self.failed = self.failed.or_else(|| pick("failed"));
        self.running = self.running.or_else(|| pick("running"));
        self.work = self.work.or_else(|| pick("work"));
        self
    }

    /// The directories, defaults beside `queue`; `running` is the parent of every host's.
    fn resolve(self, queue: PathBuf) -> (Dirs, PathBuf) {
        let running = self.running.unwrap_or_else(|| daemon::sibling(&queue, "running"));
        let dirs = Dirs {
            running: running.clone(),
            done: self.done.unwrap_or_else(|| daemon::sibling(&queue, "done")),
            failed: self.failed.unwrap_or_else(|| daemon::sibling(&queue, "failed")),
            images: self.images.unwrap_or_else(|| daemon::sibling(&queue, "images")),
            work: self.work.unwrap_or_else(|| daemon::sibling(&queue, "work")),
            queue,
        };
        (dirs, running)
    }
}

/// Where `status` and `doctor` find the queue: QUEUE, or the config file.
#[derive(clap::Args)]
struct QueueArgs {
    /// The queue directory [default: `queue` in the config file].
    queue: Option<PathBuf>,
    /// Read the directories from FILE [default: /etc/construir/host.toml, when it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    dirs: DirArgs,
}

impl QueueArgs {
    /// The directories as `run` with the same config file would use them, and the file's flags.
    fn resolve(self) -> Result<(Dirs, PathBuf, config::FileArgs)> {
        let file = match config::choose(self.config.as_deref()) {
            Some(path) => config::load(&path, &run_command())?,
            None => config::FileArgs::default(),
        };
        let Some(queue) = self.queue.or_else(|| file.queue.clone()) else {
            bail!("no queue: give QUEUE, or set `queue` in {}", config::DEFAULT_PATH);
        };
        let (dirs, running) = self.dirs.or_file(&file).resolve(queue);
        Ok((dirs, running, file))
    }
}

#[derive(Subcommand)]
enum JobCommand {
    /// Pack DIR (which must hold bin/construir) into <name>_i<image>.tar.xz and print its path.
    Pack(PackRequest),
    /// Print the job's output (job_output.txt) from a result file (escaped on a terminal).
    Log {
        file: PathBuf,
        #[command(flatten)]
        bounds: ReadBounds,
    },
    /// Print the job's status (job_status.json) from a result file (reads at most 16 MiB, 10 s).
    Status { file: PathBuf },
    /// List the entries of a job or result file.
    List {
        file: PathBuf,
        #[command(flatten)]
        bounds: ReadBounds,
    },
    /// Extract a result file safely into DIR (new or empty).
    Unpack {
        file: PathBuf,
        dir: PathBuf,
        #[command(flatten)]
        bounds: ReadBounds,
    },
}

/// How much reading a result (a stranger's archive) may cost.
#[derive(clap::Args)]
struct ReadBounds {
    /// Stop after the archive produces this many bytes, sparse holes included
    /// [default: 1G for log, 64G for list and unpack].
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    max_bytes: Option<u64>,
    /// Stop after this long [default: 10m for log and list, 1h for unpack].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    max_time: Option<Duration>,
}

impl ReadBounds {
    fn limits(&self, command: &str) -> jobfile::ReadLimits {
        let mut limits = tools::default_limits(command);
        if let Some(b) = self.max_bytes {
            limits.max_bytes = b;
        }
        if self.max_time.is_some() {
            limits.max_time = self.max_time;
        }
        limits
    }
}

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
        Command::Status { at, recent, json } => {
            let (dirs, running, _) = at.resolve()?;
            let status = construir_host::status::gather(
                &StatusDirs { queue: dirs.queue, running, done: dirs.done, failed: dirs.failed },
                recent,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", construir_host::status::render(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Job(cmd) => run_job(cmd).map(|()| ExitCode::SUCCESS),
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

/// `run`'s clap command, as the config file is checked against.
fn run_command() -> clap::Command {
    Cli::command().find_subcommand("run").expect("run is a subcommand").clone()
}

/// The `run` options (for `run` or `doctor`, named `sub`) with the config
/// file's in front of the command line's (the last of each wins), the
/// matches they came from, and the file read.
fn with_config(args: &RunArgs, argv: &[OsString], sub: &str) -> Result<(RunArgs, ArgMatches, Option<PathBuf>)> {
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
fn show_config(args: &RunArgs, matches: &ArgMatches) -> String {
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
fn toml_string(s: &str) -> String {
    match s.parse::<i64>() {
        Ok(n) => n.to_string(),
        Err(_) => toml::Value::String(s.to_owned()).to_string(),
    }
}

fn run_queue(a: RunArgs) -> Result<()> {
    logger::init(a.verbose, a.log_format);
    let Some(queue) = a.queue.clone() else {
        bail!("no queue: give QUEUE, or set `queue` in {}", config::DEFAULT_PATH);
    };
    let host_id = a.host_id.clone().unwrap_or_else(daemon::default_host_id);
    if jobfile::name::check_name(&host_id).is_err() {
        bail!("--host-id {host_id:?}: use letters, digits, '.', '_' and '-'");
    }
    let (mut dirs, _) = a.dirs.clone().resolve(queue);
    dirs.running = dirs.running.join(&host_id);
    let remote = match &a.server {
        Some(server) => {
            if a.once {
                bail!("--once runs a local queue until it is empty; a host of a server runs until stopped");
            }
            let token = match &a.token_file {
                Some(f) => std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
                None => std::env::var("CONSTRUIR_HOST_TOKEN")
                    .context("no token: give --token-file FILE, or set CONSTRUIR_HOST_TOKEN")?,
            };
            let remote = construir_host::remote::Remote {
                server: server.clone(),
                token: token.trim().to_owned(),
                ca_cert: a.ca_cert.clone(),
                poll: a.poll,
            };
            // Before anything needs an image (the KVM test boots one's kernel).
            let api = construir_host::remote::Api::new(&remote)?;
            match construir_host::remote::fetch_images(&api, &dirs.images) {
                Ok(_) => {}
                Err(e) => log::warn!("cannot fetch the server's images now: {e:#}; trying again later"),
            }
            Some(remote)
        }
        None if a.token_file.is_some() || a.ca_cert.is_some() => {
            bail!("--token-file and --ca-cert are for a host of a server: give --server URL too")
        }
        None => None,
    };
    let (opts, stop) = prepare(&a, dirs, host_id)?;
    match remote {
        Some(remote) => {
            let opts = RunOptions { rules: Rules { settle: Duration::ZERO, ..opts.rules }, ..opts };
            construir_host::remote::run(&opts, &remote, stop)?;
        }
        None => {
            daemon::run(&opts, stop)?;
        }
    }
    Ok(())
}

/// `run-one`: a private spool with the one job in it, run by the daemon
/// until it is empty; then the result and log go beside the job file.
fn run_one(args: RunOneArgs) -> Result<ExitCode> {
    use construir_host::remote::move_file;
    let a = args.run;
    logger::init(a.verbose, a.log_format);
    if a.queue.is_some() || a.server.is_some() || a.once {
        bail!("run-one takes the job FILE alone: no QUEUE, --server or --once");
    }
    if a.config.is_some() || a.show_config {
        bail!("run-one reads no config file: give its options on the command line");
    }
    let name = args.file.file_name().and_then(|n| n.to_str()).context("FILE has no file name")?;
    let job = jobfile::JobName::parse(name).with_context(|| format!("{name}: not a job file name"))?;
    let meta = std::fs::metadata(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", args.file.display());
    }
    let out = match args.out.clone() {
        Some(dir) => dir,
        None => args.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned(),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let result_path = out.join(job.done_file_name());
    if result_path.exists() {
        bail!("{} exists already: move it away first", result_path.display());
    }
    let images = a.dirs.images.clone().context("give --images DIR: where the base images (i<N>/image.toml) are")?;
    let base = a.dirs.work.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let spool = nix::unistd::mkdtemp(&base.join("construir-run-one.XXXXXX"))
        .with_context(|| format!("cannot make a spool in {}", base.display()))?;
    let host_id = a.host_id.clone().unwrap_or_else(daemon::default_host_id);
    let dirs = Dirs {
        queue: spool.join("queue"),
        running: spool.join("running").join(&host_id),
        done: spool.join("done"),
        failed: spool.join("failed"),
        images,
        work: spool.join("work"),
    };
    let outcome = (|| -> Result<ExitCode> {
        dirs.create_all()?;
        // A copy: the VM writes its result over its disk, and FILE stays as it was.
        let staged = dirs.work.join(".incoming");
        std::fs::copy(&args.file, &staged).with_context(|| format!("cannot copy {}", args.file.display()))?;
        std::fs::rename(&staged, dirs.queue.join(name))?;
        let (opts, stop) = prepare(&a, dirs.clone(), host_id.clone())?;
        let opts = RunOptions { once: true, workers: 1, rules: Rules { settle: Duration::ZERO, ..opts.rules }, ..opts };
        daemon::run(&opts, stop)?;
        let result = dirs.done.join(job.done_file_name());
        if result.exists() {
            let log = dirs.done.join(job.done_with_extension("log"));
            let verdict = tools::log_verdict(&log).unwrap_or_else(|| "(no verdict)".to_owned());
            move_file(&log, &out.join(job.done_with_extension("log")))?;
            move_file(&result, &result_path)?;
            println!("{}", result_path.display());
            eprintln!("construir-host: {name}: {verdict}");
            return Ok(if verdict.starts_with("ok") { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        // Failed or refused: the reason (and log, if any) beside where the result would be.
        // The one job of this private queue failed: its entry is whatever has a .reason beside it.
        let reason = std::fs::read_dir(&dirs.failed)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "reason"))
            .and_then(|p| jobfile::layout::read_reason(&p.with_extension("")))
            .map_or_else(|| "ended without a result or a reason".to_owned(), |r| r.why);
        std::fs::write(out.join(format!("{name}.reason")), format!("{reason}\n"))?;
        if let Some(log) = std::fs::read_dir(&dirs.failed)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "log"))
        {
            move_file(&log, &out.join(format!("{name}.log")))?;
        }
        eprintln!("construir-host: {name}: failed: {reason}");
        Ok(ExitCode::from(1))
    })();
    if let Err(e) = std::fs::remove_dir_all(&spool) {
        log::warn!("cannot remove the spool {}: {e}", spool.display());
    }
    match outcome {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("construir-host: error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

/// Everything `run` needs besides the directories: QEMU checked, the VMs'
/// confinement, cgroups, the accelerator, limits, and the stop flag.
fn prepare(a: &RunArgs, dirs: Dirs, host_id: String) -> Result<(RunOptions, Arc<AtomicBool>)> {
    let (major, minor) =
        construir_host::qemu::version(&a.qemu).with_context(|| format!("cannot run {}", a.qemu.display()))?;
    if (major, minor) < (7, 2) {
        bail!("{} is QEMU {major}.{minor}; construir needs 7.2 or newer", a.qemu.display());
    }
    let root = jail::running_as_root();
    let confiner = confiner(a, root)?;
    let cgroups = if root {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| cgroup::own_cgroup(&t));
        match cgroup::detect(Path::new("/sys/fs/cgroup"), own.as_deref().unwrap_or("/")) {
            Ok(parent) => Some(parent),
            Err(why) => {
                log::info!("no writable cgroup v2 here ({why}): VMs run without cgroup limits");
                None
            }
        }
    } else {
        None
    };
    log::info!("{}", layers(major, minor, a.vm_ids, &confiner, cgroups.is_some(), a.enable_networking));
    let decision = kvm::decide(a.accel.into(), &a.qemu, &dirs.images, &dirs.work, || Ok(confiner.clone()));
    match &decision {
        kvm::Decision::NotProbed(why) => {
            log::warn!("KVM not tested ({why}): using TCG (restart after adding images)")
        }
        kvm::Decision::NoDevice(_) | kvm::Decision::ProbeFailed => log::info!(
            "KVM does not run guests here (no usable /dev/kvm, or a test boot hung): using TCG, which is slower and not a security boundary"
        ),
        _ => {}
    }
    let accel = decision.accel();
    let limits = Limits {
        cgroups,
        confiner,
        silence: a.silence_timeout,
        boot: a.boot_timeout,
        timeout: a.timeout,
        grace: a.grace,
        memory_mib: (a.memory >> 20).max(128),
        cpus: a.cpus,
        networking: a.enable_networking,
        console_limit: usize::try_from(a.log_limit).unwrap_or(usize::MAX).max(4096),
        accel,
        qemu: a.qemu.clone(),
        host_id,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    let opts = RunOptions {
        dirs,
        once: a.once,
        workers: a.workers as usize,
        limits,
        rescan: a.rescan,
        rules: Rules { min_size: jobfile::MIN_JOB_SIZE, max_size: a.max_size, settle: a.settle },
        max_attempts: a.max_attempts,
        stop_timeout: a.stop_timeout,
        metrics_file: a.metrics_file.clone(),
    };
    Ok((opts, stop))
}

/// What each VM is confined by: its own uid, namespaces and root when the host is root.
fn confiner(a: &RunArgs, root: bool) -> Result<Confiner> {
    if !root {
        return Ok(Confiner { ids: None, root: None, landlock_abi: 0 });
    }
    if a.workers > a.vm_ids.count {
        bail!("--workers {} needs at least as many VM uids; --vm-ids {} has {}", a.workers, a.vm_ids, a.vm_ids.count);
    }
    jail::check_range(a.vm_ids, Path::new("/etc/passwd"), Path::new("/etc/group"))?;
    Ok(Confiner {
        ids: Some(IdPool::new(a.vm_ids, &a.vm_id_locks)?),
        root: Some(JailRoot::discover(&a.qemu)?),
        landlock_abi: jail::landlock_abi(),
    })
}

/// `construir-host doctor`: prints one line per requirement; fails when one blocks `run`.
fn doctor(a: RunArgs, config_file: Option<PathBuf>) -> Result<ExitCode> {
    use construir_host::doctor::{self, Check, Level, Setup};
    let mut checks: Vec<Check> = Vec::new();
    checks.push(match &config_file {
        Some(path) => Check {
            level: Level::Ok,
            what: "config",
            detail: format!("{} read, every key valid", path.display()),
            fix: None,
        },
        None => Check {
            level: Level::Ok,
            what: "config",
            detail: format!("no {} (defaults and flags only)", config::DEFAULT_PATH),
            fix: None,
        },
    });
    let Some(queue) = a.queue.clone() else {
        bail!("no queue: give QUEUE, or set `queue` in {}", config::DEFAULT_PATH);
    };
    let host_id = a.host_id.clone().unwrap_or_else(daemon::default_host_id);
    let (mut dirs, _) = a.dirs.clone().resolve(queue);
    dirs.running = dirs.running.join(&host_id);
    let root = jail::running_as_root();
    let setup = Setup {
        qemu: a.qemu.clone(),
        dirs: dirs.clone(),
        workers: a.workers,
        vm_ids: a.vm_ids,
        vm_id_locks: a.vm_id_locks.clone(),
        passwd: PathBuf::from("/etc/passwd"),
        group: PathBuf::from("/etc/group"),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        cgroup_own: std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| cgroup::own_cgroup(&t))
            .unwrap_or_else(|| "/".into()),
        min_free: 1 << 30,
    };
    let qemu_check = doctor::qemu(&setup);
    let qemu_ok = qemu_check.level == Level::Ok;
    checks.push(qemu_check);
    checks.push(doctor::vm_ids(&setup, root));
    checks.push(doctor::directories(&setup));
    checks.extend(doctor::images(&setup));
    checks.push(kvm_check(&a, &dirs, root, qemu_ok));
    checks.push(doctor::cgroups(&setup, root));
    checks.push(doctor::landlock());
    checks.extend(doctor::free_space(&setup));
    for c in &checks {
        println!("{c}");
    }
    let worst = checks.iter().map(|c| c.level).max().unwrap_or(Level::Ok);
    let (fails, warns) = (
        checks.iter().filter(|c| c.level == Level::Fail).count(),
        checks.iter().filter(|c| c.level == Level::Warn).count(),
    );
    Ok(if worst == Level::Fail {
        println!("{fails} problem(s) stop `construir-host run` as configured; {warns} warning(s)");
        ExitCode::FAILURE
    } else {
        println!("ready to run; {warns} warning(s)");
        ExitCode::SUCCESS
    })
}

/// Whether VMs get KVM, as `run` decides it (`kvm::decide`).
fn kvm_check(a: &RunArgs, dirs: &Dirs, root: bool, qemu_ok: bool) -> construir_host::doctor::Check {
    use construir_host::doctor::{Check, Level};
    use kvm::Decision;
    let check =
        |level, detail: String, fix: Option<&str>| Check { level, what: "kvm", detail, fix: fix.map(str::to_owned) };
    let confiner = || {
        if !qemu_ok {
            return Err("QEMU is missing".to_owned());
        }
        confiner(a, root).map_err(|e| format!("{e:#}"))
    };
    match kvm::decide(a.accel.into(), &a.qemu, &dirs.images, &dirs.work, confiner) {
        Decision::TcgChosen => check(
            Level::Warn,
            "not used (accel = tcg): VMs are slower, and TCG is no security boundary".into(),
            Some("accel = \"auto\" uses KVM where it works"),
        ),
        Decision::KvmChosen(Err(e)) => check(
            Level::Fail,
            format!("accel = kvm, but /dev/kvm cannot be opened: {e}"),
            Some("load kvm_intel or kvm_amd (and enable virtualization in firmware), or use accel = \"auto\""),
        ),
        Decision::KvmChosen(Ok(())) => check(Level::Ok, "accel = kvm; /dev/kvm opens".into(), None),
        Decision::NoDevice(e) => check(
            Level::Warn,
            format!("/dev/kvm cannot be opened ({e}): jobs run under TCG, slower and no security boundary"),
            Some("load kvm_intel or kvm_amd; in a VM, enable nested virtualization"),
        ),
        Decision::NotProbed(why) => check(Level::Warn, format!("not probed: {why}"), Some("build an image, and fix what doctor says above")),
        Decision::ProbeBooted => check(Level::Ok, "a test VM booted with KVM".into(), None),
        Decision::ProbeFailed => check(Level::Warn, "/dev/kvm opens but a test VM did not boot with it (nested virtualization off?): jobs run under TCG, slower and no security boundary".into(), Some("enable nested virtualization for this machine, or run on bare metal")),
    }
}

impl From<AccelChoice> for kvm::Choice {
    fn from(c: AccelChoice) -> kvm::Choice {
        match c {
            AccelChoice::Auto => kvm::Choice::Auto,
            AccelChoice::Kvm => kvm::Choice::Kvm,
            AccelChoice::Tcg => kvm::Choice::Tcg,
        }
    }
}

/// One line naming each confinement layer and whether it is on.
fn layers(major: u32, minor: u32, ids: IdRange, c: &Confiner, cgroups: bool, networking: bool) -> String {
    let on_off = |on: bool| if on { "on" } else { "off" };
    let jailed = c.root.is_some();
    format!(
        "QEMU {major}.{minor} jail: uid {}; namespaces {}; minimal root {}; seccomp on (QEMU -sandbox); no_new_privs on; cgroup v2 {}; Landlock {}",
        if c.ids.is_some() { format!("one per VM from {}-{}", ids.first, ids.last()) } else { "this (unprivileged) user's".into() },
        if jailed { format!("mnt,pid,ipc,uts{}", if networking { " (network: user-mode NIC)" } else { ",net (empty)" }) } else { "off (needs root)".into() },
        if jailed { "on" } else { "off (needs root)" },
        on_off(cgroups),
        match c.landlock_abi {
            0 if jailed => "off (this kernel has none)".to_owned(),
            0 => "off (needs root)".to_owned(),
            abi => format!("on (ABI {abi})"),
        }
    )
}

fn run_job(cmd: JobCommand) -> Result<()> {
    match cmd {
        JobCommand::Pack(request) => {
            let packed = tools::pack(&request)?;
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
        JobCommand::Log { file, bounds } => tools::log(&file, bounds.limits("log"))?,
        JobCommand::Status { file } => {
            let status = tools::status(&file)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        JobCommand::List { file, bounds } => {
            tools::list(&file, &mut std::io::stdout().lock(), bounds.limits("list"))?;
        }
        JobCommand::Unpack { file, dir, bounds } => {
            let report = tools::unpack(&file, &dir, bounds.limits("unpack"))?;
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
