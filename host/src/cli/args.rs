//! The command line: every subcommand and its flags (clap types).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use construir_host::config;
use construir_host::daemon;
use construir_host::jail::{IdPool, IdRange};
use construir_host::logger::LogFormat;
use jobfile::layout::Beside;
use jobfile::tools::{self, PackRequest};
use jobfile::units::{duration_arg, size_arg};

#[derive(Parser)]
#[command(name = "construir-host", version, about = "Build strangers' jobs in throwaway QEMU VMs")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// Attach this terminal to the debug session of a job on this machine's queue: a root
    /// shell in /job inside its VM, after it failed (`job pack --debug`, `debug = true`).
    ///
    /// FILE is the job as it was dropped (QUEUE/<name>_i<image>.tar.xz) or its result
    /// (done/<name>_d<image>.tar.xz). Type `~.` at the start of a line to leave; leaving ends
    /// the session and powers the VM off. Exits 0 when the session ended, 1 when there is none.
    Debug {
        file: PathBuf,
        /// The queue's running directory [default: `running` beside FILE's directory].
        #[arg(long, value_name = "DIR")]
        running: Option<PathBuf>,
    },
    /// Print this host's public key (ed25519:<base64>), which checks the provenance of its
    /// results; the key is made when there is none yet.
    Key {
        #[command(flatten)]
        at: QueueArgs,
        /// The host's id [default: the config file's, or this machine's hostname].
        #[arg(long)]
        host_id: Option<String>,
        /// The key file [default: QUEUE/../keys/<host-id>.key, or the config file's host-key].
        #[arg(long, value_name = "FILE")]
        host_key: Option<PathBuf>,
    },
    /// The build caches this host keeps for the jobs that name them (`run --caches`).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell
    /// (scripts/install puts them where each shell looks).
    Completions { shell: jobfile::manual::CompletionShell },
    /// Write this program's man pages (one per subcommand) into DIR.
    Man { dir: PathBuf },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AccelChoice {
    /// KVM where it really runs guests, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The queue directory: drop <name>_i<image>.tar.xz files here [default: `queue` in the config file].
    pub(crate) queue: Option<PathBuf>,
    /// Read options from FILE [default: /etc/construir/host.toml, when it exists].
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print the options in effect (the config file and the command line together), as host.toml, and exit.
    #[arg(long)]
    pub(crate) show_config: bool,
    /// Handle every job now in the queue, then exit.
    #[arg(long)]
    pub(crate) once: bool,
    /// Jobs run at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub(crate) workers: u32,
    #[command(flatten)]
    pub(crate) dirs: DirArgs,
    /// How long a job script may run: 3h, 90m, 20s.
    #[arg(long, default_value = "3h", value_parser = duration_arg)]
    pub(crate) timeout: Duration,
    /// Time allowed beyond --timeout for booting and packing before the VM is killed.
    #[arg(long, default_value = "2m", value_parser = duration_arg)]
    pub(crate) grace: Duration,
    /// Memory of each VM.
    #[arg(long, default_value = "2G", value_parser = size_arg)]
    pub(crate) memory: u64,
    /// CPUs of each VM.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) cpus: u32,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub(crate) accel: AccelChoice,
    /// Give VMs a user-mode network (off by default: jobs get no network).
    #[arg(long)]
    pub(crate) enable_networking: bool,
    /// This host's name in RUNNING/ and work files [default: the hostname].
    #[arg(long)]
    pub(crate) host_id: Option<String>,
    /// Most console output kept in each job's .log.
    #[arg(long, default_value = "2M", value_parser = size_arg)]
    pub(crate) log_limit: u64,
    /// Largest job file accepted.
    #[arg(long, default_value = "64G", value_parser = size_arg)]
    pub(crate) max_size: u64,
    /// A job file must be unchanged this long before it is claimed (it may still be being written).
    #[arg(long, default_value = "2s", value_parser = duration_arg)]
    pub(crate) settle: Duration,
    /// Give up on a job (to failed/) after the host died this many times while running it.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) max_attempts: u32,
    /// After SIGTERM or SIGINT, how long running jobs may go on before they are stopped and requeued.
    #[arg(long, default_value = "60s", value_parser = duration_arg)]
    pub(crate) stop_timeout: Duration,
    /// How often to rescan the queue besides watching it.
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    pub(crate) rescan: Duration,
    /// QEMU for amd64 (x86_64) guests (7.2 or newer).
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub(crate) qemu: PathBuf,
    /// QEMU for arm64 (aarch64) guests (7.2 or newer; Debian's qemu-system-arm). Where it
    /// cannot run, jobs for arm64 images are refused and a host of a server takes none.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-aarch64")]
    pub(crate) qemu_arm64: PathBuf,
    /// When the host runs as root, each VM runs as its own uid and gid from
    /// FIRST:COUNT (no two live VMs share one; the range must hold no
    /// account or group). The default lies above systemd's container ranges.
    #[arg(long, value_name = "FIRST:COUNT", default_value_t = IdRange::DEFAULT)]
    pub(crate) vm_ids: IdRange,
    /// Where the locks that hold each VM's uid live (shared by every host on this machine).
    #[arg(long, value_name = "DIR", default_value = IdPool::LOCK_DIR)]
    pub(crate) vm_id_locks: PathBuf,
    /// End a VM whose init has not said it started within this; its job goes back once.
    #[arg(long, default_value = "2m", value_parser = duration_arg)]
    pub(crate) boot_timeout: Duration,
    /// End a job whose VM prints nothing on its console for this long [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub(crate) silence_timeout: Option<Duration>,
    /// Write Prometheus metrics to FILE (text format, replaced atomically every
    /// few seconds), for node_exporter's textfile collector [default: none].
    #[arg(long, value_name = "FILE")]
    pub(crate) metrics_file: Option<PathBuf>,
    /// Log lines as text, in the journal's form (priority, no time of ours), or as JSON;
    /// auto picks journal when stderr is systemd's journal, text otherwise.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
    pub(crate) log_format: LogFormat,
    /// Log debug lines too.
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// Take jobs from this construir-server (http(s)://HOST:PORT) instead of a
    /// shared queue. QUEUE is then this host's private spool, filled by the
    /// host alone; images the server offers and the host lacks are fetched
    /// into --images, each verified against the server's checksums.
    #[arg(long, value_name = "URL")]
    pub(crate) server: Option<String>,
    /// The host account's token, in FILE [default: $CONSTRUIR_HOST_TOKEN].
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// Trust this CA certificate (PEM) for the server's TLS certificate.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// With --server: how often to ask for work while there is room.
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    pub(crate) poll: Duration,
    /// Where jobs' packages are kept: the archive's lists and the .deb files
    /// (DIR/packages), and the layers installed from them (DIR/layers) [default: QUEUE/../cache].
    #[arg(long, value_name = "DIR")]
    pub(crate) package_cache: Option<PathBuf>,
    /// Most bytes of .deb files kept; the least recently used go first.
    #[arg(long, default_value = "4G", value_parser = size_arg)]
    pub(crate) package_cache_size: u64,
    /// Most bytes of .deb files one job's packages may come to (checked before any download,
    /// for the server's pin too); a job over it fails with the sizes.
    #[arg(long, default_value = "4G", value_parser = size_arg)]
    pub(crate) max_package_bytes: u64,
    /// Most bytes of layers kept; the least recently used go first.
    #[arg(long, default_value = "20G", value_parser = size_arg)]
    pub(crate) layer_cache_size: u64,
    /// The keyring the archive's signed Release is checked against.
    #[arg(long, value_name = "FILE", default_value = deps::DEFAULT_KEYRING)]
    pub(crate) archive_keyring: PathBuf,
    /// Keep build caches for the jobs that name them (`caches` in construir.toml), in
    /// PACKAGE-CACHE/build-caches, apart for each of a server's accounts [default: off: a job
    /// put into a local queue has no account, so every such job shares each cache name, and one
    /// job can leave in a cache what the next one runs].
    #[arg(long)]
    pub(crate) caches: bool,
    /// The size of each build cache's disk: the most one cache holds.
    #[arg(long, default_value = "4G", value_parser = size_arg)]
    pub(crate) cache_disk_size: u64,
    /// The most bytes of build caches kept for one owner; the least recently used go first.
    #[arg(long, default_value = "16G", value_parser = size_arg)]
    pub(crate) cache_owner_size: u64,
    /// The most bytes of build caches kept for all owners together; the least recently used
    /// go first, whoever owns them.
    #[arg(long, default_value = "64G", value_parser = size_arg)]
    pub(crate) cache_total_size: u64,
    /// The ed25519 key this host signs each result's provenance with; made at first start,
    /// 0600 [default: QUEUE/../keys/<host-id>.key; for run-one, IMAGES/../keys/<host-id>.key].
    #[arg(long, value_name = "FILE")]
    pub(crate) host_key: Option<PathBuf>,
    /// Open no debug sessions: a job that asks for one (`debug = true`, `--debug`) runs and
    /// ends as any other, and its log says the host refused.
    #[arg(long)]
    pub(crate) no_debug: bool,
    /// How long a failed debug job's VM waits for its owner to attach before it is powered off.
    #[arg(long, default_value = "10m", value_parser = duration_arg)]
    pub(crate) debug_wait: Duration,
    /// How long a debug session may last in all, from the job's result to the VM's power-off.
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    pub(crate) debug_max: Duration,
}

/// `run-one`: one job file through the same machinery, without a queue.
#[derive(clap::Args)]
pub(crate) struct RunOneArgs {
    /// The job file, <name>_i<image>.tar.xz (left as it is; the VM gets a copy).
    pub(crate) file: PathBuf,
    /// Where to write the result (<name>_d<image>.tar.xz) and its .log [default: beside FILE].
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// The terms a server left for the job, as a queue's `running/` holds them (DIR/.pins/<file>.json,
    /// .owner, .rebuild): the packages it pinned, its caches' owner, a verified rebuild's name and epoch.
    #[arg(long, value_name = "DIR")]
    pub(crate) terms: Option<PathBuf>,
    /// The sha256 of the image's image.toml as the server has it: image.toml and every file it
    /// names are copied onto this machine (WORK/construir-images/<SHA256>/, kept for the next job)
    /// and checked against it, and the VM boots the copy; a mismatch is refused (exit 2).
    #[arg(long, value_name = "SHA256")]
    pub(crate) image_checksum: Option<String>,
    /// The job file's sha256 as the server received it: FILE is copied (never through a link)
    /// and checked against it before the VM gets the copy; a mismatch is refused (exit 2).
    #[arg(long, value_name = "SHA256")]
    pub(crate) job_sha256: Option<String>,
    /// The digest of the terms as the server left them (over each file's name and bytes): the
    /// terms are read once and checked against it; a mismatch is refused (exit 2).
    #[arg(long, value_name = "SHA256")]
    pub(crate) terms_sha256: Option<String>,
    /// Mirror the live console into FILE while the job runs (for a server that follows the
    /// job through a shared directory).
    #[arg(long, value_name = "FILE")]
    pub(crate) console: Option<PathBuf>,
    /// Run in a Slurm attempt's directory as the server prepared it: DIR/out, DIR/terms and
    /// DIR/console stand for --out, --terms and --console.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "terms", "console"])]
    pub(crate) attempt: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// The directories beside the queue.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct DirArgs {
    /// Base images (i<N>/image.toml) [default: QUEUE/../images].
    #[arg(long, value_name = "DIR")]
    pub(crate) images: Option<PathBuf>,
    /// Results [default: QUEUE/../done].
    #[arg(long, value_name = "DIR")]
    pub(crate) done: Option<PathBuf>,
    /// Refused and broken jobs, each with a .reason [default: QUEUE/../failed].
    #[arg(long, value_name = "DIR")]
    pub(crate) failed: Option<PathBuf>,
    /// Claimed jobs; this host uses RUNNING/<host-id> [default: QUEUE/../running].
    #[arg(long, value_name = "DIR")]
    pub(crate) running: Option<PathBuf>,
    /// Working copies and QEMU's temporary files, on local disk [default: QUEUE/../work].
    #[arg(long, value_name = "DIR")]
    pub(crate) work: Option<PathBuf>,
}

impl DirArgs {
    /// Fills what is unset from the config file's values.
    pub(crate) fn or_file(mut self, file: &config::FileArgs) -> DirArgs {
        let pick = |flag: &str| file.value(flag).map(PathBuf::from);
        self.images = self.images.or_else(|| pick("images"));
        self.done = self.done.or_else(|| pick("done"));
        self.failed = self.failed.or_else(|| pick("failed"));
        self.running = self.running.or_else(|| pick("running"));
        self.work = self.work.or_else(|| pick("work"));
        self
    }

    /// The shared directories, defaults beside `queue` (`running` is the
    /// parent of every host's), and the working directory.
    pub(crate) fn resolve(self, queue: PathBuf) -> (Beside, PathBuf) {
        let beside = Beside::queue(&queue);
        let work = self.work.unwrap_or_else(|| daemon::sibling(&queue, "work"));
        let shared = Beside {
            running: self.running.unwrap_or(beside.running),
            done: self.done.unwrap_or(beside.done),
            failed: self.failed.unwrap_or(beside.failed),
            images: self.images.unwrap_or(beside.images),
            queue,
        };
        (shared, work)
    }
}

/// Where `status` and `doctor` find the queue: QUEUE, or the config file.
#[derive(clap::Args)]
pub(crate) struct QueueArgs {
    /// The queue directory [default: `queue` in the config file].
    pub(crate) queue: Option<PathBuf>,
    /// Read the directories from FILE [default: /etc/construir/host.toml, when it exists].
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) dirs: DirArgs,
}

/// `run`'s clap command, as the config file is checked against.
pub(crate) fn run_command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().find_subcommand("run").expect("run is a subcommand").clone()
}

impl QueueArgs {
    /// The directories as `run` with the same config file would use them, and the file's flags.
    pub(crate) fn resolve(self) -> Result<(Beside, PathBuf, config::FileArgs)> {
        let file = match config::choose(self.config.as_deref()) {
            Some(path) => config::load(&path, &run_command())?,
            None => config::FileArgs::default(),
        };
        let Some(queue) = self.queue.or_else(|| file.queue.clone()) else {
            bail!("no queue: give QUEUE, or set `queue` in {}", config::DEFAULT_PATH);
        };
        let (shared, work) = self.dirs.or_file(&file).resolve(queue);
        Ok((shared, work, file))
    }
}

/// `construir-host cache ...`
#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// Each build cache: its owner, image, name, kept version, size on disk, and when a job
    /// last started from it; most recently used first.
    List {
        #[command(flatten)]
        at: QueueArgs,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove an owner's build caches named NAME (--cache NAME, on every image), or all of
    /// them (--all); their next job starts from an empty cache.
    Clear {
        /// The cache's name, as jobs name it.
        #[arg(long = "cache", value_name = "NAME", required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every cache of the owner.
        #[arg(long)]
        all: bool,
        /// Whose caches (a local queue's are `local`'s).
        #[arg(long, default_value = construir_host::caches::LOCAL_OWNER)]
        owner: String,
        #[command(flatten)]
        at: QueueArgs,
    },
}

impl QueueArgs {
    /// Where `run` with the same config file keeps packages, layers and build caches.
    pub(crate) fn package_cache(shared: &Beside, file: &config::FileArgs) -> PathBuf {
        file.value("package-cache")
            .map(PathBuf::from)
            .unwrap_or_else(|| jobfile::layout::sibling(&shared.queue, "cache"))
    }
}

#[derive(Subcommand)]
pub(crate) enum JobCommand {
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
    /// Check a result against its signed provenance: the signature by one of the keys given,
    /// the result's sha256, every file in it, and its log when it is beside it. Exits 1
    /// saying which check failed.
    Verify {
        /// The result, <name>_d<image>.tar.xz.
        file: PathBuf,
        /// Its provenance [default: <name>_d<image>.intoto.jsonl beside it].
        #[arg(long, value_name = "FILE")]
        provenance: Option<PathBuf>,
        /// A host's public key (ed25519:<base64>), or a file of them, one per line; repeat for
        /// more. `construir-host key` prints a host's.
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<String>,
    },
}

/// How much reading a result (a stranger's archive) may cost.
#[derive(clap::Args)]
pub(crate) struct ReadBounds {
    /// Stop after the archive produces this many bytes, sparse holes included
    /// [default: 1G for log, 64G for list and unpack].
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub(crate) max_bytes: Option<u64>,
    /// Stop after this long [default: 10m for log and list, 1h for unpack].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub(crate) max_time: Option<Duration>,
}

impl ReadBounds {
    pub(crate) fn limits(&self, command: &str) -> jobfile::ReadLimits {
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
