//! `construir`: the submitter's one program. It packs a job, submits it to a
//! construir-server, follows it, fetches the result and reads it safely
//! (the same bounded readers as `construir-host job`).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use jobfile::tools::{self, PackRequest};
use jobfile::units::{human_size, size_arg};
use serde::de::DeserializeOwned;
use serde::Deserialize;

#[derive(Parser)]
#[command(name = "construir", version, about = "Submit jobs to a construir server, follow them, fetch their results")]
struct Cli {
    /// The server [default: $CONSTRUIR_SERVER, then `server` in ~/.config/construir/client.toml, then http://127.0.0.1:8765].
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// A file holding your account's token [default: $CONSTRUIR_TOKEN_FILE, then
    /// $CONSTRUIR_TOKEN, then `token` in ~/.config/construir/client.toml]. Keep it 0600.
    /// (`--token TOKEN` works too, but every user of the machine can read a command line.)
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Your account's token. Avoid it: a command line is visible to every user
    /// of the machine (ps) and stays in shell history; prefer --token-file,
    /// $CONSTRUIR_TOKEN or the config file.
    #[arg(long, global = true, value_name = "TOKEN", hide = true)]
    token: Option<String>,
    /// Trust this certificate (PEM) for an https server, instead of the usual roots
    /// [default: $CONSTRUIR_CA_CERT, then `ca_cert` in ~/.config/construir/client.toml].
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Cancel a job: a waiting one leaves the queue, a running one's VM is stopped within seconds.
    Cancel { id: String },
    /// Print a link to your page on the server (it works once, within five minutes).
    Page,
    /// Extract a result file safely into DIR (new or empty): never outside it.
    Unpack { file: PathBuf, dir: PathBuf },
}

#[derive(Subcommand)]
enum CacheCommand {
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
}

/// `~/.config/construir/client.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    server: Option<String>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
}

fn config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("construir/client.toml"))
}

/// Talks to one server as one account.
struct Client {
    server: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn new(
        cli_server: Option<String>,
        cli_token: Option<String>,
        cli_token_file: Option<PathBuf>,
        cli_ca: Option<PathBuf>,
    ) -> Result<Client> {
        let file: ClientConfig = match config_file() {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
                let config: ClientConfig = toml::from_str(&text)
                    .with_context(|| format!("{} is not a valid client config", path.display()))?;
                if config.token.is_some() {
                    warn_if_readable(&path);
                }
                config
            }
            _ => ClientConfig::default(),
        };
        let server = cli_server
            .or_else(|| std::env::var("CONSTRUIR_SERVER").ok())
            .or(file.server)
            .unwrap_or_else(|| "http://127.0.0.1:8765".to_owned());
        let token = match cli_token {
            Some(t) => Some(t),
            None => {
                read_token_file(cli_token_file.or_else(|| std::env::var_os("CONSTRUIR_TOKEN_FILE").map(PathBuf::from)))?
                    .or_else(|| std::env::var("CONSTRUIR_TOKEN").ok())
                    .or(file.token)
            }
        };
        let ca = cli_ca.or_else(|| std::env::var_os("CONSTRUIR_CA_CERT").map(PathBuf::from)).or(file.ca_cert);
        let mut config =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_connect(Some(Duration::from_secs(10)));
        if let Some(ca) = ca {
            config = config.tls_config(jobfile::http::trusting(&ca)?);
        }
        let agent: ureq::Agent = config.build().into();
        Ok(Client { server: server.trim_end_matches('/').to_owned(), token, agent })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.server)
    }

    fn auth(&self) -> Result<String> {
        let token = self.token.as_deref().context(
            "no token: give --token-file FILE, set CONSTRUIR_TOKEN_FILE or CONSTRUIR_TOKEN, or put `token = \"...\"` in ~/.config/construir/client.toml",
        )?;
        Ok(format!("Bearer {token}"))
    }

    /// The answer as the API's type `T`, or the server's error as ours.
    fn json<T: DeserializeOwned>(&self, mut resp: ureq::http::Response<ureq::Body>) -> Result<T> {
        let status = resp.status();
        let text = resp.body_mut().read_to_string().context("cannot read the server's answer")?;
        if !status.is_success() {
            let message = serde_json::from_str::<wire::ErrorBody>(&text).map_or(text, |e| e.error);
            bail!("the server answered {status}: {}", jobfile::sanitize(message.as_bytes()));
        }
        serde_json::from_str(&text).with_context(|| {
            format!(
                "the server's answer is not what this client understands: {}",
                jobfile::text::sanitize_capped(text.as_bytes(), 200)
            )
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self
            .agent
            .get(self.url(path))
            .header("Authorization", self.auth()?)
            .call()
            .with_context(|| format!("cannot reach {}", self.server))?;
        self.json(resp)
    }

    fn job(&self, id: &str) -> Result<wire::Job> {
        self.get(&format!("jobs/{}", checked_id(id)?))
    }

    fn submit(&self, file: &Path, verify_on: Option<u32>) -> Result<wire::Job> {
        let file_name = file.file_name().and_then(|n| n.to_str()).context("the job file has no name")?;
        let job = jobfile::JobName::parse_input(file_name)
            .with_context(|| format!("{file_name} is not a job file name (<name>_i<image>.tar.xz)"))?;
        let mut f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let len = f.metadata()?.len();
        let mut url = format!("{}?name={}&image={}", self.url("jobs"), job.name(), job.image());
        if let Some(n) = verify_on {
            url.push_str(&format!("&verify_on={n}"));
        }
        let resp = self
            .agent
            .post(url)
            .header("Authorization", self.auth()?)
            .header("Content-Type", "application/x-xz")
            .header("Content-Length", len.to_string())
            // The server may refuse on the headers alone (a limit, a bad name): then no byte of the body is sent.
            .header("Expect", "100-continue")
            .send(ureq::SendBody::from_reader(&mut f))
            .with_context(|| format!("cannot reach {}", self.server))?;
        self.json(resp)
    }

    /// Streams a download into `out`.
    fn download(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        self.download_from(path, 0, out)
    }

    /// Streams a download from byte `from` on into `out` (nothing when there is nothing past it).
    fn download_from(&self, path: &str, from: u64, out: &mut dyn Write) -> Result<u64> {
        let mut req = self.agent.get(self.url(path)).header("Authorization", self.auth()?);
        if from > 0 {
            req = req.header("Range", format!("bytes={from}-"));
        }
        let mut resp = req.call().with_context(|| format!("cannot reach {}", self.server))?;
        if resp.status() == 416 {
            return Ok(0);
        }
        if !resp.status().is_success() {
            return self.json::<serde::de::IgnoredAny>(resp).map(|_| 0);
        }
        Ok(io::copy(&mut resp.body_mut().as_reader(), out)?)
    }
}

/// The keys the server publishes for its hosts (`GET /v1/hosts/keys`).
/// Fetches the provenance of run `run` of job `id` beside its result `out`
/// and checks the result against it, as made by the host the server
/// recorded for that run (`wire::Job::built_by`), with that host's key alone.
fn fetch_verified(
    client: &Client,
    job: &wire::Job,
    id: &str,
    run: u32,
    out: &Path,
) -> Result<construir_provenance::Verified> {
    let provenance = jobfile::layout::provenance_beside(out);
    let mut p = File::create(&provenance).with_context(|| format!("cannot create {}", provenance.display()))?;
    client.download(&format!("jobs/{}/provenance?run={run}", checked_id(id)?), &mut p)?;
    p.sync_all()?;
    let built_by = match run {
        1 => job.built_by.clone(),
        _ => job.rebuild.as_ref().and_then(|r| r.second_built_by.clone()),
    };
    let signers = server_signers(client, Some(built_by.as_deref()))?;
    let (_, verified) = construir_provenance::verify_signed_as(out, &provenance, &signers, None)
        .map_err(|e| anyhow::anyhow!("{}", jobfile::error_chain(&e)))?;
    Ok(verified)
}

/// The keys the server publishes, each with the host it belongs to (its
/// bare name: a local host's without ` (local)`, a node's without ` (slurm)`).
/// `built_by`: only the key of the host the server recorded for the run
/// (`wire::Job::built_by`), or, for a run with none, only local hosts' keys.
/// `None`: every published key, each still bound to its own host's name.
fn server_signers(
    client: &Client,
    built_by: Option<Option<&str>>,
) -> Result<Vec<(String, construir_provenance::PublicKey)>> {
    let wire::HostKeys { keys } = client.get("hosts/keys")?;
    let signers: Vec<_> = keys
        .iter()
        .filter(|k| match built_by {
            None => true,
            Some(Some(host)) => k.host == host,
            Some(None) => k.host.ends_with(" (local)"),
        })
        .filter_map(|k| {
            let key = construir_provenance::PublicKey::parse(&k.key).ok()?;
            let bare = k.host.trim_end_matches(" (local)").trim_end_matches(" (slurm)");
            Some((bare.to_owned(), key))
        })
        .collect();
    if signers.is_empty() {
        match built_by {
            Some(Some(host)) => {
                bail!("the server publishes no key for {}, which ran it", jobfile::sanitize(host.as_bytes()))
            }
            _ => bail!("the server publishes no host keys: no host has signed a result for it yet"),
        }
    }
    Ok(signers)
}

/// Says so when a file holding a token can be read by others than its owner.
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "construir: warning: {} holds a token and is mode {mode:03o}: others on this machine can read it (chmod 600 {})",
                path.display(),
                path.display()
            );
        }
    }
}

/// The token in `path` (its first line, trimmed), when a path is given.
fn read_token_file(path: Option<PathBuf>) -> Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    warn_if_readable(&path);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(Some(token))
}

/// Text from the server as a person sees it: through the one sanitizer.
fn shown(text: &str) -> String {
    jobfile::sanitize(text.as_bytes())
}

fn checked_id(id: &str) -> Result<&str> {
    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        bail!("{:?} is not a job id (16 hex digits, as `construir submit` printed)", jobfile::sanitize(id.as_bytes()))
    }
}

/// One line saying where a job is, sanitized.
fn describe(job: &wire::Job) -> String {
    shown(&job.place.describe())
}

/// A verified rebuild's state in a few words, after `describe`'s line.
fn rebuild_note(job: &wire::Job) -> String {
    let Some(rebuild) = &job.rebuild else { return String::new() };
    match &rebuild.verdict {
        Some(v) if v.outcome == wire::RebuildVerdict::DIFFERS => {
            format!("; NOT reproducible ({} of {} files differ)", v.differing_total, v.files)
        }
        Some(v) => format!("; {}", shown(&v.outcome.replace('_', " "))),
        None => format!("; second run {}", rebuild.second.name()),
    }
}

/// Follows a job to its end; true when its result is ok.
fn wait(client: &Client, id: &str) -> Result<bool> {
    let mut last = String::new();
    let started = Instant::now();
    loop {
        let job = client.job(id)?;
        // Elapsed time changes every poll: print a running line once a minute at most.
        let line = describe(&job);
        let key = if matches!(job.place, wire::Place::Running { .. }) {
            format!("running {}", started.elapsed().as_secs() / 60)
        } else {
            line.clone()
        };
        if key != last {
            eprintln!("construir: {id}: {line}");
            last = key;
        }
        let ok = match job.place {
            wire::Place::Done { .. } => job.status.is_some_and(|s| s.result == jobfile::Outcome::Ok),
            wire::Place::Failed { .. } | wire::Place::Missing => false,
            _ => {
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        // A verified rebuild: until its second run has ended too and the two have been compared.
        let Some(rebuild) = &job.rebuild else { return Ok(ok) };
        match &rebuild.verdict {
            Some(verdict) => {
                eprintln!("construir: {id}: verified rebuild: {}", shown(&verdict.summary()));
                return Ok(ok && verdict.outcome == wire::RebuildVerdict::REPRODUCIBLE);
            }
            None => {
                let line = format!("its second run: {}", shown(&rebuild.second.describe()));
                let key = if matches!(rebuild.second, wire::Place::Running { .. }) {
                    format!("second running {}", started.elapsed().as_secs() / 60)
                } else {
                    line.clone()
                };
                if key != last {
                    eprintln!("construir: {id}: {line}");
                    last = key;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let client = || Client::new(cli.server.clone(), cli.token.clone(), cli.token_file.clone(), cli.ca_cert.clone());
    match cli.command {
        Command::Pack(request) => {
            let packed = tools::pack(&request)?;
            for w in &packed.warnings {
                eprintln!("construir: warning: {w}");
            }
            println!("{}", packed.path.display());
        }
        Command::Submit { path, image, size, name, packages, debian_control, caches, verify_on, wait: then_wait } => {
            let client = client()?;
            let scratch = tempfile::tempdir()?;
            if !path.is_dir() && (!packages.is_empty() || debian_control.is_some() || !caches.is_empty()) {
                bail!("--packages, --debian-control and --cache pack a directory; {} is a job file, which carries its own construir.toml", path.display());
            }
            let file = if path.is_dir() {
                let (Some(image), Some(size)) = (image, size) else {
                    bail!("{} is a directory: give --image N and --size SIZE to pack it", path.display());
                };
                let packed = tools::pack(&PackRequest {
                    dir: path,
                    image,
                    size,
                    name,
                    out: scratch.path().to_owned(),
                    preset: jobfile::xz::DEFAULT_PRESET,
                    force: false,
                    packages,
                    debian_control,
                    caches,
                })?;
                eprintln!(
                    "construir: packed {} into a {} job file",
                    human_size(packed.compressed),
                    human_size(packed.size)
                );
                packed.path
            } else {
                path
            };
            let job = client.submit(&file, verify_on)?;
            let id = checked_id(&job.id)?.to_owned();
            println!("{id}");
            eprintln!("construir: submitted {} as {id}: {}", file.display(), describe(&job));
            if then_wait {
                return Ok(if wait(&client, &id)? { ExitCode::SUCCESS } else { ExitCode::from(1) });
            }
        }
        Command::Wait { id } => {
            return Ok(if wait(&client()?, checked_id(&id)?)? { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Command::Status { id } => {
            // Every key and string through the one sanitizer: job_status.json is the guest's writing.
            println!(
                "{}",
                serde_json::to_string_pretty(&tools::sanitize_json(serde_json::to_value(client()?.job(&id)?)?))?
            );
        }
        Command::Log { id, follow, run } => {
            let client = client()?;
            let id = checked_id(&id)?;
            let mut shown: u64 = 0;
            loop {
                let state = match (follow, run) {
                    (false, _) => "",
                    (true, 1) => client.job(id)?.place.name(),
                    (true, _) => {
                        client.job(id)?.rebuild.context("the job is no verified rebuild: it has one run")?.second.name()
                    }
                };
                if !follow || state == "running" || state == "done" || state == "failed" {
                    // What has not been shown yet: the live console while it runs, the whole log at the end.
                    let mut raw = Vec::new();
                    match client.download_from(&format!("jobs/{id}/log?run={run}"), shown, &mut raw) {
                        Ok(n) => {
                            shown += n;
                            // Sanitized by the host; again here: nothing from a VM reaches a terminal raw.
                            io::stdout().write_all(jobfile::text::sanitize_lines(&raw).as_bytes())?;
                            io::stdout().flush()?;
                        }
                        Err(e) if !follow => return Err(e),
                        Err(_) => {}
                    }
                }
                if !follow || state == "done" || state == "failed" || state == "missing" {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Command::Fetch { id, out, unpack, no_verify, run } => {
            let client = client()?;
            let job = client.job(&id)?;
            let name = jobfile::JobName::new(&job.name, &job.image)
                .map(|j| j.done_file_name())
                .unwrap_or_else(|_| format!("{id}.tar.xz"));
            let name = match run {
                1 => name,
                n => format!(
                    "{}.run{n}{}",
                    name.strip_suffix(jobfile::name::SUFFIX).unwrap_or(&name),
                    jobfile::name::SUFFIX
                ),
            };
            let out = out.unwrap_or_else(|| PathBuf::from(name));
            let tmp = out.with_extension("part");
            let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let n = client.download(&format!("jobs/{}/result?run={run}", checked_id(&id)?), &mut f);
            if let Err(e) = n {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &out)?;
            eprintln!("construir: {} ({}) -> {}", id, human_size(n.unwrap_or(0)), out.display());
            if !no_verify {
                let checked = fetch_verified(&client, &job, &id, run, &out);
                match checked {
                    Ok(v) => eprintln!("construir: verified: {}", v.summary()),
                    Err(e) => {
                        let aside = out.with_extension("xz.unverified");
                        std::fs::rename(&out, &aside)?;
                        eprintln!(
                            "construir: {}: not verified: {e:#}; kept as {} (--no-verify takes a result without checking)",
                            out.display(),
                            aside.display()
                        );
                        return Ok(ExitCode::from(1));
                    }
                }
            }
            if let Some(dir) = unpack {
                unpack_into(&out, &dir)?;
            }
            println!("{}", out.display());
        }
        Command::List => {
            let list: wire::JobList = client()?.get("jobs")?;
            for job in &list.jobs {
                println!(
                    "{}  {:<20}  i{:<4} {}  {}",
                    shown(&job.id),
                    shown(&job.submitted),
                    shown(&job.image),
                    shown(&job.name),
                    describe(job) + &rebuild_note(job)
                );
            }
        }
        Command::Hosts => {
            let wire::HostList { hosts } = client()?.get("hosts")?;
            if hosts.is_empty() {
                eprintln!("construir: no build host has taken work from this server yet");
            }
            println!(
                "{:<20} {:>10} {:>8} {:>7}  {:<12} YOUR WARM CACHES",
                "HOST", "SEEN", "CAPACITY", "RUNNING", "IMAGES"
            );
            for h in &hosts {
                println!(
                    "{:<20} {:>8} s {:>8} {:>7}  {:<12} {}",
                    shown(&h.name),
                    h.seen_secs_ago,
                    h.capacity,
                    h.running,
                    shown(&h.image_names()),
                    if h.your_caches.is_empty() { "-".to_owned() } else { shown(&h.your_caches.join(", ")) }
                );
            }
            // The keys their results are signed with, as the server pinned them.
            if hosts.iter().any(|h| h.key.is_some()) {
                println!();
                println!("{:<20} SIGNS WITH", "HOST");
                for h in hosts.iter().filter(|h| h.key.is_some()) {
                    println!("{:<20} {}", shown(&h.name), shown(h.key.as_deref().unwrap_or_default()));
                }
            }
        }
        Command::Cache(CacheCommand::List { json }) => {
            let list: wire::CacheList = client()?.get("caches")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.caches.is_empty() {
                eprintln!("construir: you have no build caches on this server's hosts");
            } else {
                println!("{:<24} {:<6} {:>7} {:>10}  {:<20}  HOST", "NAME", "IMAGE", "VERSION", "SIZE", "LAST USED");
                for c in &list.caches {
                    println!(
                        "{:<24} i{:<5} {:>7} {:>10}  {:<20}  {}",
                        shown(&c.name),
                        shown(&c.image),
                        c.version,
                        human_size(c.bytes),
                        shown(&c.used),
                        shown(&c.host)
                    );
                }
            }
        }
        Command::Cache(CacheCommand::Clear { name, all: _ }) => {
            if let Some(name) = &name {
                jobfile::caches::check_name(name).map_err(|e| anyhow::anyhow!(e))?;
            }
            let client = client()?;
            let resp = client
                .agent
                .post(client.url("caches/clear"))
                .header("Authorization", client.auth()?)
                .header("Content-Type", "application/json")
                .send(serde_json::to_vec(&wire::ClearCaches { name })?)?;
            let cleared: wire::ClearedCaches = client.json(resp)?;
            if cleared.cleared.is_empty() {
                eprintln!("construir: you have no build caches to clear");
            } else {
                eprintln!(
                    "construir: cleared {} ({} cop{} on hosts): no job starts from what {} held",
                    shown(&cleared.cleared.join(", ")),
                    cleared.copies,
                    if cleared.copies == 1 { "y" } else { "ies" },
                    if cleared.cleared.len() == 1 { "it" } else { "they" }
                );
            }
        }
        Command::Cancel { id } => {
            let client = client()?;
            let resp = client
                .agent
                .post(client.url(&format!("jobs/{}/cancel", checked_id(&id)?)))
                .header("Authorization", client.auth()?)
                .send_empty()?;
            let job: wire::Job = client.json(resp)?;
            match &job.cancel {
                Some(note) => eprintln!("construir: {id}: cancel {}", shown(note)),
                None => eprintln!("construir: {id}: {}", describe(&job)),
            }
        }
        Command::Page => {
            let client = client()?;
            let resp =
                client.agent.post(client.url("page-link")).header("Authorization", client.auth()?).send_empty()?;
            let link: wire::PageLink = client.json(resp)?;
            println!("{}{}", client.server, shown(&link.path));
        }
        Command::Unpack { file, dir } => unpack_into(&file, &dir)?,
        Command::Verify { file, provenance, keys } => {
            let provenance = provenance.unwrap_or_else(|| jobfile::layout::provenance_beside(&file));
            let log = jobfile::layout::log_beside(&file);
            // Keys given by hand are the reader's own choice; the server's are each bound to their host.
            let checked = if keys.is_empty() {
                let signers = server_signers(&client()?, None)?;
                construir_provenance::verify_signed_as(&file, &provenance, &signers, log.as_deref()).map(|(_, v)| v)
            } else {
                construir_provenance::verify(
                    &file,
                    &provenance,
                    &construir_provenance::keys_from_args(&keys)?,
                    log.as_deref(),
                )
            };
            match checked {
                Ok(v) => println!("{}: verified: {}", file.display(), v.summary()),
                Err(e) => {
                    // Checked, and it failed: 1, as `wait` says a job was not ok (2 is for what could not be checked).
                    eprintln!("construir: {}: not verified: {}", file.display(), jobfile::error_chain(&e));
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn unpack_into(file: &Path, dir: &Path) -> Result<()> {
    let report = tools::unpack(file, dir, tools::default_limits("unpack"))?;
    for s in &report.skipped {
        eprintln!("construir: skipped {}: {}", s.path, s.reason);
    }
    eprintln!(
        "construir: unpacked {} files, {} directories, {} symlinks ({}) into {}",
        report.files,
        report.dirs,
        report.symlinks,
        human_size(report.bytes),
        dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("construir: error: {}", chain.join(": "));
            ExitCode::from(2)
        }
    }
}
