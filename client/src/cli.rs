//! The `construir` command line: every command and its options.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use jobfile::tools::PackRequest;
use jobfile::units::size_arg;

#[derive(Parser)]
#[command(name = "construir", version, about = "Submit jobs to a construir server, follow them, fetch their results")]
pub struct Cli {
    /// The server [default: $CONSTRUIR_SERVER, then `server` in ~/.config/construir/client.toml, then http://127.0.0.1:8765].
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// A file holding your account's token [default: $CONSTRUIR_TOKEN_FILE, then
    /// $CONSTRUIR_TOKEN, then `token` in ~/.config/construir/client.toml]. Keep it 0600.
    /// (`--token TOKEN` works too, but every user of the machine can read a command line.)
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Your account's token. Avoid it: a command line is visible to every user
    /// of the machine (ps) and stays in shell history; prefer --token-file,
    /// $CONSTRUIR_TOKEN or the config file.
    #[arg(long, global = true, value_name = "TOKEN", hide = true)]
    pub token: Option<String>,
    /// Trust this certificate (PEM) for an https server, instead of the usual roots
    /// [default: $CONSTRUIR_CA_CERT, then `ca_cert` in ~/.config/construir/client.toml].
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Pack DIR (which must hold bin/construir) into <name>_i<image>.tar.xz and print its path.
    Pack(PackRequest),
    /// Submit a job file, or a directory (packed first: give --image and --size); prints the job's id.
    Submit {
        /// A job file (<name>_i<image>.tar.xz) or a job directory.
        path: PathBuf,
        /// For a directory: the base image number.
        #[arg(long, value_name = "N")]
        image: Option<String>,
        /// For a directory: the job file's size.
        #[arg(long, value_name = "SIZE", value_parser = size_arg)]
        size: Option<u64>,
        /// For a directory: the job name [default: its name].
        #[arg(long)]
        name: Option<String>,
        /// For a directory: Debian packages the job needs, as relations (comma-separated or
        /// repeated), written to its construir.toml.
        #[arg(long = "packages", value_name = "RELATIONS", value_delimiter = ',')]
        packages: Vec<String>,
        /// For a directory: also the build dependencies of this debian/control inside it.
        #[arg(long, value_name = "PATH")]
        debian_control: Option<String>,
        /// For a directory: build caches the job uses, each mounted at /cache/NAME and kept for
        /// your account's next jobs on the same image when it ends ok (comma-separated or repeated).
        #[arg(long = "cache", value_name = "NAME", value_delimiter = ',')]
        caches: Vec<String>,
        /// 2: a verified rebuild. The job runs twice, on two different hosts where the farm has
        /// two, with SOURCE_DATE_EPOCH and the rest of the environment fixed, and the server
        /// compares the two results file by file; `wait` and `status` give the verdict. It counts
        /// as two jobs against your limits.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=2))]
        verify_on: Option<u32>,
        /// When the job does not end ok, keep its VM up after its result is delivered, with a root
        /// shell in /job for you alone: `construir debug ID` attaches (`debug = true` in its
        /// construir.toml asks the same). Not with --verify-on 2.
        #[arg(long, conflicts_with = "verify_on")]
        debug: bool,
        /// Run it even if the server's result cache holds the result of the same job, and keep
        /// its result out of the cache. (Without it, a job whose inputs are all those of an
        /// earlier job of yours that ended ok is not run: you get that job's result and signed
        /// provenance, with the server's signed record of the hit.)
        #[arg(long)]
        no_result_cache: bool,
        /// Then wait for it, as `construir wait` does.
        #[arg(long)]
        wait: bool,
    },
    /// Follow a job until it ends: its place in the queue, then its time running, then its verdict
    /// (a verified rebuild: until both runs have ended and been compared). Exits 0 when the job's
    /// result is ok (and, verified, reproducible), 1 when it is anything else.
    Wait { id: String },
    /// The job's state (and its job_status.json once it has finished), as JSON.
    Status { id: String },
    /// The job's console log: as far as it has got while it runs, whole once it has finished.
    Log {
        id: String,
        /// Keep printing the console as it arrives until the job ends.
        #[arg(long)]
        follow: bool,
        /// 2: a verified rebuild's second run.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
        run: u32,
    },
    /// Download the job's result (without its zero padding).
    /// Its signed provenance comes too (<name>_d<image>.intoto.jsonl beside it) and is checked
    /// against the keys the server publishes for its hosts; a result that does not check out is
    /// kept as FILE.unverified and the command exits 1.
    Fetch {
        id: String,
        /// Where to write it [default: <name>_d<image>.tar.xz here].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Then extract it safely into DIR (new or empty).
        #[arg(long, value_name = "DIR")]
        unpack: Option<PathBuf>,
        /// Take the result without checking its provenance.
        #[arg(long)]
        no_verify: bool,
        /// 2: a verified rebuild's second run [default name: <name>_d<image>.run2.tar.xz].
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
        run: u32,
    },
    /// Check a result against its signed provenance, offline: the signature by one of the
    /// keys, the result's sha256, every file in it, and its log when it is beside it. Exits 1
    /// saying which check failed.
    Verify {
        /// The result, <name>_d<image>.tar.xz.
        file: PathBuf,
        /// Its provenance [default: <name>_d<image>.intoto.jsonl beside it].
        #[arg(long, value_name = "FILE")]
        provenance: Option<PathBuf>,
        /// A host's public key (ed25519:<base64>), or a file of them, one per line; repeat for
        /// more [default: the keys the server publishes for its hosts].
        #[arg(long = "key", value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Your jobs, newest first.
    List,
    /// The build hosts that take work from the server: last seen, images, capacity, jobs running
    /// now, and which of your build caches each holds warm.
    Hosts,
    /// Your build caches on the server's hosts.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Cancel a job: a waiting one leaves the queue, a running one's VM is stopped within seconds,
    /// a debug session is ended and its VM powered off.
    Cancel { id: String },
    /// Run a job's file again as a new job (the server keeps it as long as the job's result);
    /// prints the new job's id. It counts against your limits as a submission does.
    Rerun {
        id: String,
        /// Run it as a debug job: when it does not end ok, its VM stays up for `construir debug`.
        #[arg(long)]
        debug: bool,
        /// Then wait for it, as `construir wait` does.
        #[arg(long)]
        wait: bool,
    },
    /// Attach this terminal to the debug session of your failed job (submitted with --debug): a
    /// root shell in /job inside its VM, which has no network. The result you fetch is the job's
    /// own, whatever you do here. Type `~.` at the start of a line to leave; leaving, or `exit`,
    /// ends the session and powers the VM off.
    Debug { id: String },
    /// Print a link to your page on the server (it works once, within five minutes).
    Page,
    /// Extract a result file safely into DIR (new or empty): never outside it.
    Unpack { file: PathBuf, dir: PathBuf },
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Your build caches on every host: name, image, version, size, last use, host.
    List {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Clear your build cache NAME (on every image and host), or all of yours with --all: no job
    /// of yours starts from what it held again, and each host frees its copy.
    Clear {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Your entries in the server's result cache (results of your jobs that ended ok, served
    /// again to the same job): key, job, image, size, last use, host, and whether it is shared.
    Results {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop your result cache entry KEY, or all of yours with --all: the next such job runs.
    Forget {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        key: Option<String>,
        #[arg(long)]
        all: bool,
    },
}
