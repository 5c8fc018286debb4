//! `construir-server`: parse the command line, run, print the error chain once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use construir_server::app::{self, App};
use construir_server::db::{self, Limits};
use construir_server::listen::{self, Bounds};
use construir_server::quota::UploadRules;
use construir_server::sql::Database;
use construir_server::store::Store;
use construir_server::{auth, follow, http, keep_sweeping, lease, rebuild, reconcile_leases, result_cache, unrecorded};
use jobfile::units::{duration_arg, human_size, size_arg};

#[derive(Parser)]
#[command(
    name = "construir-server",
    version,
    about = "Take construir jobs from accounts over HTTP and put them into a queue"
)]
struct Cli {
    /// The server's database: an SQLite file (made, and migrated, on first use), or
    /// PostgreSQL as postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME (the environment
    /// keeps a password off the command line).
    #[arg(
        long,
        global = true,
        value_name = "FILE|URL",
        env = "CONSTRUIR_SERVER_DB",
        default_value = "/var/lib/construir/server.db"
    )]
    db: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (v1) for the queue QUEUE.
    Serve(Box<ServeArgs>),
    /// Manage accounts: each has a token and limits.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Print the audit log, newest first.
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print the API's schema (OpenAPI 3.1, JSON), as `GET /v1/openapi.json` serves it.
    Openapi,
    /// The Slurm executor's nodes (`serve --executor slurm`).
    #[command(subcommand)]
    Slurm(SlurmCommand),
}

#[derive(Subcommand)]
enum SlurmCommand {
    /// The key pinned for each Slurm node.
    Keys,
    /// Pin KEY (`ed25519:<base64>`, as `construir-host key` prints it on the node) for NODE:
    /// results from NODE are taken only when signed with it, and only for jobs Slurm ran there.
    /// A key is never learned from the shared directory.
    PinKey { node: String, key: String },
    /// Forget the key pinned for NODE (its key was replaced on purpose): its results are refused until one is pinned again.
    UnpinKey { node: String },
}

/// Who runs the jobs of the queue.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Executor {
    /// Build hosts: local ones take jobs from the queue directory, remote ones lease them.
    Hosts,
    /// A site's Slurm: the server hands each waiting job to sbatch (the --slurm-* options);
    /// hosts may still take jobs beside it.
    Slurm,
}

/// The Slurm executor's options.
#[derive(clap::Args)]
struct SlurmArgs {
    /// The directory every Slurm node sees at the same path: the images are copied into
    /// DIR/images, each job gets DIR/runs/<id>.<attempt>/ (needed with --executor slurm).
    #[arg(long, value_name = "DIR")]
    slurm_dir: Option<PathBuf>,
    /// The partition jobs go to [default: Slurm's].
    #[arg(long, value_name = "NAME")]
    slurm_partition: Option<String>,
    /// The Slurm account jobs are charged to [default: Slurm's].
    #[arg(long, value_name = "NAME")]
    slurm_account: Option<String>,
    /// The node features jobs on one architecture's images need (repeat it per architecture):
    /// Slurm's --constraint. --slurm-constraint arm64=aarch64 sends arm64 jobs only to nodes
    /// with the feature aarch64 [default: none; any node may run any job].
    #[arg(long = "slurm-constraint", value_name = "ARCH=FEATURES", value_parser = construir_server::slurm::parse_constraint)]
    slurm_constraints: Vec<(jobfile::arch::Arch, String)>,
    /// Each job's VM CPUs (Slurm's --cpus-per-task).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    slurm_cpus: u32,
    /// Each job's VM memory; Slurm is asked for 512M more, for QEMU itself.
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    slurm_memory: u64,
    /// Each job's timeout; Slurm's time limit is 3 minutes more.
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    slurm_timeout: Duration,
    /// construir-host on the nodes.
    #[arg(long, value_name = "PATH", default_value = "construir-host")]
    slurm_construir_host: String,
    /// The key each node signs results with: a path on the node's own disk, never under
    /// --slurm-dir (every node can read that); pin each node's public key with
    /// `construir-server slurm pin-key`.
    #[arg(long, value_name = "PATH", default_value = "/var/lib/construir/host.key")]
    slurm_host_key: String,
    /// Where run-one works on each node: its private spool, the VM's working copy and its
    /// checked copies of images, on the node's own disk, never under --slurm-dir.
    #[arg(long, value_name = "PATH", default_value = "/var/tmp/construir")]
    slurm_node_dir: String,
    /// Another argument for run-one on the nodes (repeat it): --slurm-run-arg=--accel=tcg.
    #[arg(long = "slurm-run-arg", value_name = "ARG", allow_hyphen_values = true)]
    slurm_run_args: Vec<String>,
    /// Most jobs in Slurm at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    slurm_max_jobs: u64,
    /// Where sbatch, scontrol, squeue and scancel are [default: PATH].
    #[arg(long, value_name = "DIR")]
    slurm_bin: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The queue directory build hosts take jobs from; running/, done/, failed/
    /// and images/ are its siblings, as the hosts have them.
    queue: PathBuf,
    /// Where to listen. Loopback by default: to serve others, give --tls-cert and
    /// --tls-key, or put a TLS reverse proxy in front.
    #[arg(long, default_value = "127.0.0.1:8765")]
    listen: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The images directory [default: QUEUE/../images].
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
    /// How long an upload may send nothing before it is dropped.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    idle_timeout: Duration,
    /// How long a whole upload (a job, or a host's delivery) may take, however
    /// steadily it trickles.
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    upload_timeout: Duration,
    /// Uploads one account may have under way at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    max_uploads: u64,
    /// Where the archive's lists are kept for resolving jobs' packages at submit (DIR/packages):
    /// the server's own, never a host's (a host's apt runs as root; a directory another user owns
    /// or may write is refused) [default: QUEUE/../server-cache].
    #[arg(long, value_name = "DIR")]
    package_cache: Option<PathBuf>,
    /// The keyring the archive's signed Release is checked against.
    #[arg(long, value_name = "FILE", default_value = deps::DEFAULT_KEYRING)]
    archive_keyring: PathBuf,
    /// Most bytes of .deb files one job's packages may come to; a submission over it is
    /// refused (422) with the sizes, before any host downloads a byte.
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = size_arg)]
    max_package_bytes: u64,
    /// Free space the queue's filesystem keeps: an upload that would leave less
    /// (counting what uploads under way reserved) is refused with 507.
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = size_arg)]
    min_free: u64,
    /// Connections open at once, from everyone; more are closed at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Connections open at once from one client address (behind a reverse
    /// proxy every client has the proxy's: raise it, or let the proxy bound them).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections_per_address: u64,
    /// How long a client may take to send a request's header (and to finish a
    /// TLS handshake); a connection that has not by then is closed.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    header_timeout: Duration,
    /// How often the database is brought up to what the directories say, and retention applied.
    #[arg(long, default_value = "2s", value_parser = duration_arg)]
    follow_every: Duration,
    /// How long a remote build host's lease lasts without renewal; when it
    /// runs out the job goes back to the queue (hosts renew every third of it).
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    lease: Duration,
    /// A job whose remote hosts lost it this many times fails, with the reason.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    max_attempts: u64,
    /// How long a job that names build caches is kept for a free remote host
    /// that holds one of them warm, before any other host may take it.
    #[arg(long, default_value = "20s", value_parser = duration_arg)]
    warm_wait: Duration,
    /// How long a verified rebuild's second run waits for a host other than
    /// the one that took its first run, when the farm has another live host;
    /// after that any host may take it (the verdict then says both runs shared one).
    #[arg(long, default_value = "10m", value_parser = duration_arg)]
    apart_wait: Duration,
    /// Who runs the jobs.
    #[arg(long, value_enum, default_value = "hosts")]
    executor: Executor,
    /// Take no jobs that ask for a debug session (`--debug`, `debug = true`): they are refused
    /// at submit, saying so. (Under --executor slurm they always are: a node's VM has no way back.)
    #[arg(long)]
    no_debug: bool,
    #[command(flatten)]
    result_cache: ResultCacheArgs,
    #[command(flatten)]
    slurm: SlurmArgs,
}

/// The result cache: a job whose inputs are all an earlier ok job's is served that job's result.
#[derive(clap::Args, Clone)]
struct ResultCacheArgs {
    /// Keep no results: every job runs, and none is served from the cache.
    #[arg(long)]
    no_result_cache: bool,
    /// Mixed into every key: a new salt disowns every entry at once (they are removed at start).
    #[arg(long, value_name = "TEXT", default_value = "")]
    cache_salt: String,
    /// Serve every account the entries that a verified rebuild (--verify-on 2) found reproducible
    /// on two different hosts; `false`: each account is served its own entries only.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    share_reproducible: bool,
    /// Most bytes all entries may take on the server; the least recently used go first.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = size_arg)]
    result_cache_size: u64,
    /// The key the server signs each cache hit's record with (made at first start)
    /// [default: QUEUE/../server-keys/result-cache.key].
    #[arg(long, value_name = "FILE")]
    result_cache_key: Option<PathBuf>,
}

/// Limits: server-wide defaults for `serve`, or one account's for `account limits`.
#[derive(clap::Args, Clone, Default)]
struct LimitArgs {
    /// Largest job file [server default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    max_job_size: Option<u64>,
    /// Jobs not yet finished at once [server default: 100].
    #[arg(long, value_name = "N")]
    max_waiting: Option<u64>,
    /// Bytes of job files and results held at once [server default: 20G].
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    max_stored: Option<u64>,
    /// Submissions per hour [server default: 200].
    #[arg(long, value_name = "N")]
    max_per_hour: Option<u64>,
    /// Days after which results and logs are deleted [server default: 30].
    #[arg(long, value_name = "DAYS")]
    retention_days: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_job_bytes: self.max_job_size,
            max_waiting: self.max_waiting,
            max_stored_bytes: self.max_stored,
            max_per_hour: self.max_per_hour,
            retention_days: self.retention_days,
        }
    }
}

/// What `serve` uses where neither the account nor the command line sets a limit.
const DEFAULTS: Limits = Limits {
    max_job_bytes: Some(1 << 30),
    max_waiting: Some(100),
    max_stored_bytes: Some(20 << 30),
    max_per_hour: Some(200),
    retention_days: Some(30),
};

#[derive(Subcommand)]
enum AccountCommand {
    /// Add an account and print its token (shown this once; only its hash is kept).
    Add {
        name: String,
        /// A build host's account: it takes work from the server (construir-host run
        /// --server), and cannot submit or read jobs.
        #[arg(long)]
        host: bool,
    },
    /// List the accounts with their limits.
    List,
    /// Refuse the account's requests until it is enabled again.
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
    /// Replace the account's token and print the new one.
    Token {
        name: String,
    },
    /// Remove the account (its job records stay, for the audit).
    Remove {
        name: String,
    },
    /// Forget the key pinned for build host NAME (after its key was replaced on purpose):
    /// the next key it sends is pinned, and results signed by the old one are refused.
    UnpinKey {
        name: String,
    },
    /// Set the account's limits (a limit not given falls back to the server's).
    Limits {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// Worker threads at least: requests move, rename and sync files in place
/// (the queue's directories are the contract), and a worker waiting on the
/// disk must not hold up the requests behind it. On 2 cores under load
/// (`construir-loadbench`, PostgreSQL), 8 workers took jobs/s from 241 to
/// 296 and renew p99 from 51 to 35 ms.
const MIN_WORKERS: usize = 8;

/// malloc arenas at most: glibc gives each thread that allocates its own,
/// and with the workers, the blocking pool and the database's threads the
/// server's peak RSS under load grew by half (49 MiB against 36 with two).
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS: libc::c_int = 2;

fn run(cli: Cli) -> Result<()> {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc parameter; no thread has started yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    // One runtime for every command: the database is async (sqlx).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.max(MIN_WORKERS))
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(run_command(cli))
}

async fn run_command(cli: Cli) -> Result<()> {
    // What the server writes (job files, reasons, staged results) is for it and
    // its group; the database, which holds token hashes, for it alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    if let Command::Openapi = cli.command {
        // Needs no database.
        print!("{}", construir_server::openapi::document());
        return Ok(());
    }
    if !construir_server::sql::is_postgres(&cli.db) {
        create_sqlite_file(std::path::Path::new(&cli.db))?;
    }
    let conn = db::open(&cli.db).await?;
    match cli.command {
        Command::Serve(args) => serve(conn, *args).await,
        Command::Account(cmd) => account(&conn, cmd).await,
        Command::Audit { limit } => {
            for e in db::audit_log(&conn, limit).await? {
                println!("{}  {:<16} {:<18} {}", e.time, e.account.unwrap_or_default(), e.action, e.detail);
            }
            Ok(())
        }
        Command::Openapi => unreachable!("answered before the database is opened"),
        Command::Slurm(cmd) => slurm_keys(&conn, cmd).await,
    }
}

/// Makes the SQLite file at `path` (and its directory) for the server alone:
/// SQLite gives its -wal and -shm files the database file's mode.
fn create_sqlite_file(path: &std::path::Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// `construir-server slurm keys|pin-key|unpin-key`: the keys the operator pins for Slurm nodes.
async fn slurm_keys(conn: &Database, cmd: SlurmCommand) -> Result<()> {
    match cmd {
        SlurmCommand::Keys => {
            for (node, key) in db::node_keys(conn).await? {
                println!("{node:<20} {key}");
            }
            Ok(())
        }
        SlurmCommand::PinKey { node, key } => {
            jobfile::name::check_name(&node).map_err(|e| anyhow::anyhow!("node {node:?}: {e}"))?;
            let key = construir_provenance::PublicKey::parse(key.trim()).map_err(|e| {
                anyhow::anyhow!("{key:?} is not a public key ({e}): give what `construir-host key` prints on the node")
            })?;
            let pinned = db::pin_node_key(conn, &node, &key.to_string()).await?;
            if pinned != key.to_string() {
                anyhow::bail!("{pinned} is pinned for {node} already: construir-server slurm unpin-key {node} first");
            }
            eprintln!("construir-server: {key} is pinned for Slurm node {node}");
            Ok(())
        }
        SlurmCommand::UnpinKey { node } => {
            if !db::unpin_node_key(conn, &node).await? {
                anyhow::bail!("no key is pinned for a Slurm node named {node:?}");
            }
            eprintln!(
                "construir-server: the key pinned for {node} is forgotten; its results are refused until one is pinned"
            );
            Ok(())
        }
    }
}

async fn account(conn: &Database, cmd: AccountCommand) -> Result<()> {
    match cmd {
        AccountCommand::Add { name, host } => {
            let secret = auth::new_secret();
            // The id is known only once the row exists: add, then set the real token's hash.
            let kind = if host { db::Kind::Host } else { db::Kind::Submitter };
            let account = db::add_account(conn, &name, kind, &[]).await?;
            let token = auth::token(account.id, &secret);
            db::set_token(conn, &name, &auth::hash(&token)).await?;
            println!("{token}");
            eprintln!(
                "construir-server: {} account {name} added; its token is above and is not shown again",
                kind.name()
            );
        }
        AccountCommand::Token { name } => {
            let account =
                db::account_by_name(conn, &name).await?.with_context(|| format!("no account named {name:?}"))?;
            let token = auth::token(account.id, &auth::new_secret());
            db::set_token(conn, &name, &auth::hash(&token)).await?;
            println!("{token}");
        }
        AccountCommand::List => {
            let show = |v: Option<u64>, size: bool| match v {
                None => "default".to_owned(),
                Some(v) if size => human_size(v),
                Some(v) => v.to_string(),
            };
            println!(
                "{:<20} {:<9} {:<9} {:>10} {:>8} {:>10} {:>9} {:>10}  CREATED",
                "NAME", "KIND", "STATE", "JOB SIZE", "WAITING", "STORED", "PER HOUR", "RETENTION"
            );
            for a in db::accounts(conn).await?.iter().filter(|a| a.removed.is_none()) {
                let l = a.limits;
                println!(
                    "{:<20} {:<9} {:<9} {:>10} {:>8} {:>10} {:>9} {:>10}  {}",
                    a.name,
                    a.kind.name(),
                    if a.disabled { "disabled" } else { "enabled" },
                    show(l.max_job_bytes, true),
                    show(l.max_waiting, false),
                    show(l.max_stored_bytes, true),
                    show(l.max_per_hour, false),
                    l.retention_days.map_or("default".to_owned(), |d| format!("{d} days")),
                    a.created
                );
            }
        }
        AccountCommand::Disable { name } => db::set_disabled(conn, &name, true).await?,
        AccountCommand::Enable { name } => db::set_disabled(conn, &name, false).await?,
        AccountCommand::Remove { name } => db::remove_account(conn, &name).await?,
        AccountCommand::UnpinKey { name } => {
            db::unpin_key(conn, &name).await?;
            eprintln!("construir-server: the key pinned for {name} is forgotten; the next one it sends is pinned");
        }
        AccountCommand::Limits { name, limits } => db::set_limits(conn, &name, &limits.limits()).await?,
    }
    Ok(())
}

async fn serve(conn: Database, a: ServeArgs) -> Result<()> {
    let slurm = slurm_settings(&a)?;
    let tls = a.tls_cert.clone().zip(a.tls_key.clone());
    if !a.listen.ip().is_loopback() && tls.is_none() {
        log::warn!("listening on {} (not loopback) with plain HTTP: tokens cross the network in clear; give --tls-cert and --tls-key, or put a TLS reverse proxy in front", a.listen);
    }
    let app = open_app(conn, &a, tls.is_some()).await?;
    reconcile_leases(&app).await?;
    rebuild(&app).await?;
    let disowned = result_cache::disown_other_salts(&app).await?;
    if disowned > 0 {
        log::info!("result cache: removed {disowned} entries made under another --cache-salt");
    }
    // The local hosts read the cleared caches from the queue's directories: as the database says.
    http::caches::publish_generations(&app).await.context("cannot write the cleared caches' generations")?;
    let strangers = unrecorded(&app).await?;
    if strangers > 0 {
        log::warn!("{strangers} job file(s) in the directories have a server-style name but no record: they are no account's (the server takes ownership from its database only; restore it from a backup to recover them)");
    }
    let tls = match &tls {
        Some((cert, key)) => Some(listen::tls_config(cert, key)?),
        None => None,
    };
    let bounds = Bounds {
        max_connections: a.max_connections as usize,
        max_per_address: a.max_connections_per_address as usize,
        header_timeout: a.header_timeout,
    };
    let listener = std::net::TcpListener::bind(a.listen).with_context(|| format!("cannot listen on {}", a.listen))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    tokio::spawn(follow(app.clone(), a.follow_every));
    if let Some(slurm) = slurm {
        start_slurm(&app, slurm).await?;
    }
    tokio::spawn(keep_sweeping(app.clone(), (a.lease / 10).clamp(Duration::from_millis(200), Duration::from_secs(2))));
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("construir-server: listening on {scheme}://{bound}");
    let listener = tokio::net::TcpListener::from_std(listener)?;
    listen::serve(listener, tls, http::router(app), bounds, shutdown(), Duration::from_secs(10))
        .await
        .context("the server failed")?;
    log::info!("stopped");
    Ok(())
}

/// The server's state: its store (what a killed server left half-written
/// removed), its settings, the leases it extends after a restart, its
/// package resolver.
async fn open_app(conn: Database, a: &ServeArgs, tls: bool) -> Result<Arc<App>> {
    let beside = jobfile::layout::Beside::queue(&a.queue);
    let images = a.images.clone().unwrap_or(beside.images.clone());
    let store = Store::new(jobfile::layout::Beside { images, ..beside });
    store.create_all()?;
    // Uploads a killed server left half-written: no job was recorded for them.
    let stale = store.remove_stale_uploads(a.idle_timeout * 2)?;
    if stale > 0 {
        log::info!("removed {stale} unfinished upload(s) left by the last run");
    }
    let farm = lease::Settings {
        lease: a.lease,
        max_attempts: a.max_attempts,
        warm_wait: a.warm_wait,
        apart_wait: a.apart_wait,
    };
    // Hosts could not renew while the server was down: every lease gets a full term.
    let extended = db::extend_leases(&conn, farm.lease.as_millis() as i64).await?;
    if extended > 0 {
        log::info!("{extended} lease(s) of remote hosts given a full term again after the restart");
    }
    let settings = app::Settings {
        defaults: a.limits.limits().or(DEFAULTS),
        idle_timeout: a.idle_timeout,
        upload_timeout: a.upload_timeout,
        uploads: UploadRules { max_uploads: a.max_uploads, min_free: a.min_free },
        tls,
        debug: match (a.no_debug, &a.executor) {
            (true, _) => construir_server::app::DebugPolicy::Off,
            (false, Executor::Slurm) => construir_server::app::DebugPolicy::Slurm,
            (false, Executor::Hosts) => construir_server::app::DebugPolicy::Allowed,
        },
    };
    let cache = a.package_cache.clone().unwrap_or_else(|| jobfile::layout::sibling(&a.queue, "server-cache"));
    let packages = deps::Resolver::new(deps::Settings {
        keyring: a.archive_keyring.clone(),
        max_bytes: a.max_package_bytes,
        ..deps::Settings::new(&cache.join("packages"))
    });
    let result_cache = result_cache_settings(&a.result_cache, &a.queue)?;
    Ok(App::new(conn, store, settings, farm, Some(packages), result_cache))
}

/// The result cache's settings, its signing key made when missing; `None` with --no-result-cache.
fn result_cache_settings(a: &ResultCacheArgs, queue: &std::path::Path) -> Result<Option<result_cache::Settings>> {
    if a.no_result_cache {
        return Ok(None);
    }
    let path = a.result_cache_key.clone().unwrap_or_else(|| result_cache::default_key_path(queue));
    let (key, made) = construir_provenance::HostKey::load_or_create(&path)
        .with_context(|| format!("cannot read or make the result cache's key {}", path.display()))?;
    if made {
        log::info!("made the key that signs cache hits' records: {} ({})", path.display(), key.public());
    }
    Ok(Some(result_cache::Settings {
        salt: result_cache::key::salt_digest(&a.cache_salt),
        share_reproducible: a.share_reproducible,
        max_bytes: a.result_cache_size,
        entries: result_cache::entry::Entries { root: result_cache::default_root(queue) },
        key: std::sync::Arc::new(key),
    }))
}

/// The Slurm executor's settings, with `--executor slurm`.
fn slurm_settings(a: &ServeArgs) -> Result<Option<construir_server::slurm::Settings>> {
    if let Executor::Hosts = a.executor {
        return Ok(None);
    }
    let s = &a.slurm;
    let dir = s.slurm_dir.clone().context("--executor slurm needs --slurm-dir: the directory every node sees")?;
    let dir = std::path::absolute(&dir)?;
    std::fs::create_dir_all(dir.join("runs")).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(Some(construir_server::slurm::Settings {
        dir,
        partition: s.slurm_partition.clone(),
        account: s.slurm_account.clone(),
        constraints: construir_server::slurm::constraints(&s.slurm_constraints).map_err(anyhow::Error::msg)?,
        cpus: s.slurm_cpus,
        memory_mib: s.slurm_memory >> 20,
        timeout: s.slurm_timeout,
        host_bin: s.slurm_construir_host.clone(),
        host_key: s.slurm_host_key.clone(),
        node_dir: s.slurm_node_dir.clone(),
        run_args: s.slurm_run_args.clone(),
        max_jobs: s.slurm_max_jobs as usize,
        max_attempts: a.max_attempts,
        bin_dir: s.slurm_bin.clone(),
    }))
}

/// Checks that Slurm answers, then hands it jobs.
async fn start_slurm(app: &Arc<App>, slurm: construir_server::slurm::Settings) -> Result<()> {
    slurm.check().map_err(|e| anyhow::anyhow!("--executor slurm: {e}"))?;
    let version =
        construir_server::slurm::check(&slurm).await.map_err(|e| anyhow::anyhow!("--executor slurm, but {e}"))?;
    log::info!("Slurm: {version}");
    let placed: String = slurm.constraints.iter().map(|(arch, f)| format!(", {arch} jobs on nodes with {f}")).collect();
    log::info!(
        "handing jobs to Slurm (partition {}{placed}, {} CPU(s), {} MiB, timeout {} s each), through {}",
        slurm.partition.as_deref().unwrap_or("default"),
        slurm.cpus,
        slurm.memory_mib,
        slurm.timeout.as_secs(),
        slurm.dir.display()
    );
    tokio::spawn(construir_server::slurm::run(app.clone(), slurm, Duration::from_secs(1)));
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::Level::Info
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) && record.target().starts_with("construir") {
            let now = jobfile::units::rfc3339(std::time::SystemTime::now());
            eprintln!("{now} {:<5} {}", record.level(), jobfile::sanitize(record.args().to_string().as_bytes()));
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    static LOGGER: Logger = Logger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("construir-server: error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
