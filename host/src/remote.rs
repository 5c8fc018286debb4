//! A build host that takes its jobs from a construir-server (`run --server`).
//!
//! The host keeps a private spool: a queue of its own that the ordinary
//! daemon runs, unchanged (same jail, same VMs, same verdicts). Beside it
//! a pump talks to the server: it takes a job under a lease when the host
//! has room, puts the job file into the spool, renews the lease while the
//! job runs (sending the console as it grows), and delivers the result or
//! the failure when the daemon has put it in `done/` or `failed/`. A lease
//! the server no longer honours (it ran out while this host was cut off or
//! frozen, and another host has the job) stops the job's VM here; its
//! result is dropped, and would be refused.
//!
//! Renewals run on a thread of their own (`renew_loop`), beside the pump's
//! transfers: however long a download or a delivery takes over a slow link,
//! every other lease this host holds is renewed on time, and the lease of
//! the job being moved too (the server also renews a lease while its own
//! transfer moves).
//!
//! The host also fetches the images the server offers that it lacks, and
//! installs one only when every file matches the server's checksums.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jobfile::image::{sha256_file, ImageManifest, MANIFEST};
use jobfile::JobName;
use serde_json::Value;

use crate::daemon::{self, RunOptions, Summary};
use crate::queue::{self, Dirs};

/// Where and as whom the host takes work.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `http(s)://host:port`.
    pub server: String,
    /// A host account's token.
    pub token: String,
    /// Trust this CA for the server's TLS certificate (beside the system's).
    pub ca_cert: Option<PathBuf>,
    /// How often to ask for work while the host has room.
    pub poll: Duration,
}

/// The server's API, as a host uses it.
pub struct Api {
    base: String,
    auth: String,
    agent: ureq::Agent,
}

/// An answer: the status and the JSON body (or the text, as a JSON string).
type Answer = (u16, Value);

impl Api {
    pub fn new(remote: &Remote) -> Result<Api> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(3600)));
        if let Some(ca) = &remote.ca_cert {
            config = config.tls_config(jobfile::http::trusting(ca)?);
        }
        let agent: ureq::Agent = config.build().into();
        Ok(Api {
            base: remote.server.trim_end_matches('/').to_owned(),
            auth: format!("Bearer {}", remote.token),
            agent,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    fn answer(resp: ureq::http::Response<ureq::Body>) -> Result<Answer> {
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().context("cannot read the server's answer")?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub fn get_json(&self, path: &str) -> Result<Answer> {
        let resp = self.agent.get(self.url(path)).header("Authorization", &self.auth).call();
        Api::answer(resp.with_context(|| format!("cannot reach {}", self.base))?)
    }

    pub fn post_json(&self, path: &str, body: &impl serde::Serialize) -> Result<Answer> {
        let body = serde_json::to_vec(body).context("cannot write the request")?;
        let resp = self
            .agent
            .post(self.url(path))
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .send(&body[..]);
        Api::answer(resp.with_context(|| format!("cannot reach {}", self.base))?)
    }

    fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Answer> {
        let resp = self.agent.post(self.url(path)).header("Authorization", &self.auth).send(body);
        Api::answer(resp.with_context(|| format!("cannot reach {}", self.base))?)
    }

    fn post_reader(&self, path: &str, len: u64, body: impl Read) -> Result<Answer> {
        let mut body = body;
        let resp = self
            .agent
            .post(self.url(path))
            .header("Authorization", &self.auth)
            .header("Content-Length", len.to_string())
            .header("Content-Type", "application/octet-stream")
            .send(ureq::SendBody::from_reader(&mut body));
        Api::answer(resp.with_context(|| format!("cannot reach {}", self.base))?)
    }

    /// Writes what `path` answers into `to`, at most `max` bytes. The status,
    /// and the error body when it is not 200.
    fn download(&self, path: &str, to: &Path, max: u64) -> Result<Answer> {
        let resp = self.agent.get(self.url(path)).header("Authorization", &self.auth).call();
        let resp = resp.with_context(|| format!("cannot reach {}", self.base))?;
        if resp.status().as_u16() != 200 {
            return Api::answer(resp);
        }
        let mut out = File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
        let mut body = resp.into_body().into_with_config().limit(max.saturating_add(1)).reader();
        let n = io::copy(&mut body, &mut out).with_context(|| format!("cannot download {path}"))?;
        if n > max {
            bail!("{path}: the server sent more than the {max} bytes it announced");
        }
        out.sync_all()?;
        Ok((200, Value::Null))
    }
}

/// What went wrong in an answer, for a log line.
fn why(answer: &Answer) -> String {
    let text =
        serde_json::from_value::<wire::ErrorBody>(answer.1.clone()).map_or_else(|_| answer.1.to_string(), |e| e.error);
    format!("{}: {}", answer.0, jobfile::sanitize(text.as_bytes()))
}

/// A successful answer's body as the API's type `T`.
fn decode<T: serde::de::DeserializeOwned>(answer: &Answer) -> Result<T> {
    serde_json::from_value(answer.1.clone()).with_context(|| {
        format!(
            "the server's answer is not what this host understands: {}",
            jobfile::text::sanitize_capped(answer.1.to_string().as_bytes(), 200)
        )
    })
}

/// The images in `images`, each as the server names it, with the sha256 of its `image.toml`.
pub fn local_images(images: &Path) -> Vec<(String, String)> {
    let Ok(dirs) = jobfile::image::image_dirs(images) else { return Vec::new() };
    dirs.into_iter()
        .filter(|(_, dir)| ImageManifest::load(dir).is_ok())
        .filter_map(|(n, dir)| Some((n, sha256_file(&dir.join(MANIFEST)).ok()?)))
        .collect()
}

/// The images in `images` whose every file matches their `image.toml`: the
/// only ones a host tells the server it has. A mismatch is logged.
/// An image unchanged since its last check (the same files, sizes and times)
/// is not hashed again.
pub fn verified_images(images: &Path) -> Vec<(String, String)> {
    type Seen = HashMap<PathBuf, Vec<(OsString, u64, std::time::SystemTime)>>;
    static VERIFIED: Mutex<Option<Seen>> = Mutex::new(None);
    let fingerprint = |dir: &Path| -> Vec<(OsString, u64, std::time::SystemTime)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((e.file_name(), m.len(), m.modified().ok()?))
            })
            .collect();
        v.sort();
        v
    };
    let Ok(dirs) = jobfile::image::image_dirs(images) else { return Vec::new() };
    let mut out = Vec::new();
    for (n, dir) in dirs {
        let print = fingerprint(&dir);
        let known = VERIFIED.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|m| m.get(&dir).cloned());
        let checked = if known.as_ref() == Some(&print) {
            Ok(())
        } else {
            ImageManifest::load(&dir).and_then(|m| m.verify_files(&dir))
        };
        if checked.is_ok() {
            VERIFIED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(dir.clone(), print);
        }
        match (checked, sha256_file(&dir.join(MANIFEST))) {
            (Ok(()), Ok(checksum)) => out.push((n, checksum)),
            (Err(e), _) => log::error!("image i{n} is not offered to the server: {}", jobfile::error_chain(&e)),
            (_, Err(e)) => log::error!("image i{n} is not offered to the server: {e}"),
        }
    }
    out
}

/// Fetches every image the server offers that `images` lacks. An image is
/// installed only when `image.toml` has the server's checksum and every file
/// the one `image.toml` names; otherwise it is refused, and nothing of it
/// kept. Returns the images installed.
pub fn fetch_images(api: &Api, images: &Path) -> Result<Vec<String>> {
    let answer = api.get_json("host/images")?;
    if answer.0 != 200 {
        bail!("the server would not list its images ({})", why(&answer));
    }
    fs::create_dir_all(images).with_context(|| format!("cannot create {}", images.display()))?;
    let have = local_images(images);
    let mut installed = Vec::new();
    let list: wire::ImageList = decode(&answer)?;
    for offered in &list.images {
        let (name, checksum) = (offered.name.as_str(), offered.checksum.as_str());
        if name.is_empty() || name.len() > 9 || !name.bytes().all(|b| b.is_ascii_digit()) {
            log::warn!("the server offers an image named {:?}: ignored", jobfile::sanitize(name.as_bytes()));
            continue;
        }
        match have.iter().find(|(n, _)| n == name) {
            Some((_, c)) if c == checksum => continue,
            Some(_) => {
                log::warn!(
                    "image i{name} here differs from the server's (another image.toml): this host gets no i{name} jobs until they agree"
                );
                continue;
            }
            None => {}
        }
        if images.join(format!("i{name}")).exists() {
            log::warn!(
                "{} exists but holds no valid image: not fetching over it",
                images.join(format!("i{name}")).display()
            );
            continue;
        }
        match fetch_image(api, images, name, checksum, offered) {
            Ok(()) => {
                log::info!("image i{name}: fetched from the server, every checksum verified");
                installed.push(name.to_owned());
            }
            Err(e) => log::error!("image i{name} refused: {e:#}"),
        }
    }
    Ok(installed)
}

fn fetch_image(api: &Api, images: &Path, name: &str, checksum: &str, offered: &wire::OfferedImage) -> Result<()> {
    let tmp = images.join(format!(".fetch.i{name}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        if offered.files.is_empty() {
            bail!("the server listed no files");
        }
        for f in &offered.files {
            let file = f.name.as_str();
            if file.is_empty() || file.contains('/') || file.starts_with('.') {
                bail!(
                    "the server names a file {:?}, which is not a plain file name",
                    jobfile::sanitize(file.as_bytes())
                );
            }
            let size = f.size;
            let answer = api.download(&format!("host/images/{name}/{file}"), &tmp.join(file), size)?;
            if answer.0 != 200 {
                bail!("cannot download {file} ({})", why(&answer));
            }
        }
        let got = sha256_file(&tmp.join(MANIFEST)).context("no image.toml came")?;
        if !got.eq_ignore_ascii_case(checksum) {
            bail!("image.toml has sha256 {got}, the server said {checksum}: changed on the way");
        }
        let manifest = ImageManifest::load(&tmp)?;
        manifest.verify_files(&tmp)?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            fs::rename(&tmp, images.join(format!("i{name}")))
                .with_context(|| format!("cannot install {}", images.join(format!("i{name}")).display()))?;
            File::open(images)?.sync_all()?;
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// What the host does with the server's answer to a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// 200: renewed (with the term and whether the submitter cancelled).
    Renewed,
    /// 409 while the result is being delivered: the delivery ended the
    /// lease, and the delivery's answer decides.
    EndedByDelivery,
    /// 409 otherwise: the lease ran out or went to another host; stop the job here.
    Lost,
    /// Anything else: the server's passing trouble; renew again soon.
    Failed,
}

fn renewal(status: u16, delivering: bool) -> Renewal {
    match status {
        200 => Renewal::Renewed,
        409 if delivering => Renewal::EndedByDelivery,
        409 => Renewal::Lost,
        _ => Renewal::Failed,
    }
}

/// What is being delivered: a result, or the reason a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivering {
    Result,
    Failure,
}

/// What the host does with the server's answer to a delivery (no answer at all: it tries again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settlement {
    /// 200: delivered; the job is done with here.
    Accepted,
    /// 409: the lease is gone (ran out, or the job went elsewhere); drop the job.
    LeaseGone,
    /// Another 4xx for a result (not 408 or 429): refused for good; report
    /// the job failed instead, once.
    RefusedForGood,
    /// 5xx, 408, 429, anything unforeseen, or a refused failure report: try again later.
    TryAgain,
}

fn settlement(status: u16, what: Delivering) -> Settlement {
    match status {
        200 => Settlement::Accepted,
        409 => Settlement::LeaseGone,
        s if (400..500).contains(&s) && ![408, 429].contains(&s) && what == Delivering::Result => {
            Settlement::RefusedForGood
        }
        _ => Settlement::TryAgain,
    }
}

/// A lease as the renewer keeps it alive.
#[derive(Debug, Clone)]
struct Lease {
    seq: u64,
    file_name: String,
    /// Its term, as the server last said.
    term: Duration,
    renewed: Instant,
    /// Console bytes the server has.
    console_sent: u64,
    /// The server no longer honours the lease: drop whatever comes of the job.
    lost: bool,
    /// Its result or failure is being delivered: a refusal of a renewal now
    /// means the delivery ended the lease, and the delivery's answer decides.
    delivering: bool,
}

/// The leases this host holds, by job id: the pump adds and removes them,
/// the renewer keeps them alive. Never held across a request to the server.
#[derive(Default)]
struct Leases(Mutex<HashMap<String, Lease>>);

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lost(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|l| l.lost)
    }

    fn set_delivering(&self, id: &str, on: bool) {
        if let Some(l) = self.lock().get_mut(id) {
            l.delivering = on;
        }
    }
}

/// Renews every lease in `leases` about every third of its term (at least
/// every 2 s, so that the console follows closely), with the console that is
/// new, until `done`. Runs on its own thread: nothing the pump does waits on it,
/// and it waits on nothing the pump does.
fn renew_loop(api: &Api, dirs: &Dirs, leases: &Leases, done: &AtomicBool) {
    while !done.load(Ordering::Relaxed) {
        let due: Vec<(String, Lease)> = leases
            .lock()
            .iter()
            .filter(|(_, l)| !l.lost && l.renewed.elapsed() >= (l.term / 3).min(Duration::from_secs(2)))
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        for (id, l) in due {
            let console = queue::live_console(dirs, OsStr::new(&l.file_name));
            let chunk = read_from(&console, l.console_sent, 256 << 10);
            let path = format!("host/jobs/{id}/renew?seq={}&offset={}", l.seq, l.console_sent);
            let answer = api.post_bytes(&path, &chunk);
            let mut map = leases.lock();
            let Some(held) = map.get_mut(&id).filter(|h| h.seq == l.seq) else { continue };
            match answer.as_ref().map(|a| (renewal(a.0, held.delivering), a)) {
                Ok((Renewal::Renewed, answer)) => {
                    held.renewed = Instant::now();
                    held.console_sent = l.console_sent + chunk.len() as u64;
                    match decode::<wire::Renewed>(answer) {
                        Ok(renewed) => {
                            held.term = Duration::from_millis(renewed.lease_ms);
                            if renewed.cancel {
                                request_cancel(dirs, &l.file_name, "its submitter cancelled it");
                            }
                        }
                        Err(e) => log::warn!("job {}: renewed, but {e:#}", l.file_name),
                    }
                }
                Ok((Renewal::EndedByDelivery, _)) => {}
                Ok((Renewal::Lost, answer)) => {
                    log::warn!("job {}: lease lost ({}); stopping it here", l.file_name, why(answer));
                    held.lost = true;
                    drop(map);
                    request_cancel(dirs, &l.file_name, "its lease was lost");
                    // Not yet claimed by the daemon: take it out of the spool.
                    let _ = fs::remove_file(dirs.queue.join(&l.file_name));
                }
                Ok((Renewal::Failed, answer)) => {
                    log::warn!("job {}: cannot renew its lease ({})", l.file_name, why(answer))
                }
                Err(e) => log::warn!("job {}: cannot renew its lease: {e:#}", l.file_name),
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A job this host holds a lease on, as the pump follows it.
#[derive(Debug, Clone)]
struct Held {
    id: String,
    seq: u64,
    file_name: String,
    /// When the job was first seen nowhere in the spool.
    vanished: Option<Instant>,
    /// When delivery last failed for want of the server.
    retry_at: Option<Instant>,
    /// Deliveries tried and failed so far (the wait between them doubles).
    retries: u32,
}

/// Empties the spool of jobs a previous run held: their leases ran out, or
/// will, and the server hands them out again.
fn clear_spool(dirs: &Dirs) -> io::Result<usize> {
    let mut n = 0;
    for dir in [&dirs.queue, &dirs.running, &dirs.done, &dirs.failed] {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for e in rd.flatten() {
            if e.file_name() == OsStr::new(queue::HOST_FILE) || e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            fs::remove_file(e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Runs the host against the server until `stop`: the daemon on the spool,
/// and the pump beside it.
pub fn run(opts: &RunOptions, remote: &Remote, stop: Arc<AtomicBool>) -> Result<Summary> {
    let dirs = &opts.dirs;
    dirs.create_all()?;
    // One host per spool: the lock the daemon takes, taken first, so that clearing the spool
    // can never touch another running host's jobs.
    let spool_lock = File::open(&dirs.queue)?;
    let _held = nix::fcntl::Flock::lock(spool_lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .with_context(|| format!("another construir-host runs the spool {} already", dirs.queue.display()))?;
    let cleared = clear_spool(dirs)?;
    if cleared > 0 {
        log::info!("cleared {cleared} file(s) a previous run left in the spool; the server hands those jobs out again");
    }
    let api = Arc::new(Api::new(remote)?);
    // Verified in full before the server hears of them, and again at every check.
    let verified = Arc::new(Mutex::new(verified_images(&dirs.images)));
    let pump_done = Arc::new(AtomicBool::new(false));
    let leases = Arc::new(Leases::default());
    let renewals_done = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (api, dirs, leases, done) = (api.clone(), dirs.clone(), leases.clone(), renewals_done.clone());
        thread::Builder::new().name("renew".into()).spawn(move || renew_loop(&api, &dirs, &leases, &done))?
    };
    let pump = {
        let (api, dirs, stop, done) = (api.clone(), dirs.clone(), stop.clone(), pump_done.clone());
        let (capacity, host_id, remote) = (opts.workers as u64, opts.limits.host_id.clone(), remote.clone());
        let (rules, images, leases) = (opts.rules, verified.clone(), leases.clone());
        thread::Builder::new().name("pump".into()).spawn(move || {
            let mut pump = Pump { api, dirs, host_id, capacity, remote, rules, images, leases, held: HashMap::new() };
            pump.run(&stop, &done);
        })?
    };
    let images = {
        let (api, images, stop, verified) = (api.clone(), dirs.images.clone(), stop.clone(), verified.clone());
        thread::Builder::new().name("images".into()).spawn(move || {
            // Soon after a failed check (the server may have been down at start), else every minute.
            let mut next = Instant::now() + IMAGE_CHECK_EVERY;
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(500));
                if Instant::now() >= next {
                    next = Instant::now() + IMAGE_CHECK_EVERY;
                    if let Err(e) = fetch_images(&api, &images) {
                        log::warn!("cannot check the server's images: {e:#}");
                        next = Instant::now() + Duration::from_secs(5);
                    }
                    let now_verified = verified_images(&images);
                    *verified.lock().unwrap_or_else(|p| p.into_inner()) = now_verified;
                }
            }
        })?
    };
    let summary = daemon::run(opts, stop.clone());
    stop.store(true, Ordering::Relaxed);
    pump_done.store(true, Ordering::Relaxed);
    let _ = pump.join();
    renewals_done.store(true, Ordering::Relaxed);
    let _ = renewer.join();
    let _ = images.join();
    summary
}

/// How often a running host looks for new images on the server.
const IMAGE_CHECK_EVERY: Duration = Duration::from_secs(60);

struct Pump {
    api: Arc<Api>,
    dirs: Dirs,
    host_id: String,
    capacity: u64,
    remote: Remote,
    rules: queue::Rules,
    /// The images verified here, as (number, checksum of image.toml).
    images: Arc<Mutex<Vec<(String, String)>>>,
    /// What the renewer keeps alive.
    leases: Arc<Leases>,
    held: HashMap<String, Held>,
}

/// Where a held job is in the spool.
enum Local {
    Waiting,
    Running,
    Done { result: PathBuf, log: PathBuf },
    Failed { reason: String, log: Option<PathBuf>, file: PathBuf },
    Nowhere,
}

impl Pump {
    fn run(&mut self, stop: &AtomicBool, daemon_done: &AtomicBool) {
        let mut asked: Option<Instant> = None;
        let mut failures: u32 = 0;
        let mut stopping_noted = false;
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let finished = daemon_done.load(Ordering::Relaxed);
            self.deliver_all(finished);
            if stopping {
                if !stopping_noted {
                    stopping_noted = true;
                    self.release_waiting();
                }
                if finished {
                    self.final_pass();
                    return;
                }
            } else if (self.held.len() as u64) < self.capacity && asked.is_none_or(|t| t.elapsed() >= self.remote.poll)
            {
                asked = Some(Instant::now());
                match self.take_one() {
                    Ok(true) => {
                        asked = None; // there may be more: ask again at once
                        failures = 0;
                    }
                    Ok(false) => failures = 0,
                    Err(e) => {
                        // Said once per streak, then every tenth time; and asked less often.
                        if failures.is_multiple_of(10) {
                            log::warn!("cannot get work from {}: {e:#}", self.remote.server);
                        }
                        failures += 1;
                        let wait = self.remote.poll * failures.min(10);
                        asked = Some(Instant::now() + wait - self.remote.poll);
                    }
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the server for a job and puts it in the spool; `Ok(true)` when one came.
    fn take_one(&mut self) -> Result<bool> {
        let verified = self.images.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let body = wire::LeaseRequest {
            images: verified.into_iter().map(|(name, checksum)| wire::HostImage { name, checksum }).collect(),
            capacity: self.capacity,
            running: self.held.len() as u64,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let answer = self.api.post_json("host/lease", &body)?;
        if answer.0 != 200 {
            bail!("the server refused ({})", why(&answer));
        }
        let Some(lease) = decode::<wire::LeaseAnswer>(&answer)?.lease else { return Ok(false) };
        let wire::Lease { id, seq, file_name, size, lease_ms, attempt } = lease;
        let id = id.as_str();
        let Ok(job) = JobName::parse(&file_name) else {
            bail!("the server sent a job named {:?}", jobfile::sanitize(file_name.as_bytes()))
        };
        let held = Held {
            id: id.to_owned(),
            seq,
            file_name: job.input_file_name(),
            vanished: None,
            retry_at: None,
            retries: 0,
        };
        log::info!(
            "job {}: leased from the server (id {}, lease {seq}, attempt {attempt})",
            held.file_name,
            jobfile::sanitize(id.as_bytes())
        );
        // Checked here as the daemon would, so that the reason goes back to the server.
        if size < self.rules.min_size || size > self.rules.max_size {
            let reason = format!(
                "refused by host {}: {size} bytes is outside this host's {}..={} bytes",
                self.host_id, self.rules.min_size, self.rules.max_size
            );
            self.report_failed(&held, &reason, None);
            return Ok(true);
        }
        let partial = self.dirs.work.join(format!(".fetch.{}", held.file_name));
        fs::create_dir_all(&self.dirs.work)?;
        // Renewed from now on, the download included.
        self.track(&held, Duration::from_millis(lease_ms));
        let fetched = self.api.download(&format!("host/jobs/{id}/file?seq={seq}"), &partial, size);
        let failed = match &fetched {
            Ok(answer) if answer.0 == 200 => None,
            Ok(answer) => Some(format!("cannot download job {id} ({})", why(answer))),
            Err(e) => Some(format!("cannot download job {id}: {e:#}")),
        };
        if let Some(why) = failed {
            let _ = fs::remove_file(&partial);
            self.leases.lock().remove(id);
            bail!("{why}");
        }
        if self.leases.lost(id) {
            let _ = fs::remove_file(&partial);
            self.leases.lock().remove(id);
            bail!("job {id}: the lease was lost while it downloaded");
        }
        // Renamed in whole: the daemon never sees a file being written.
        fs::rename(&partial, self.dirs.queue.join(&held.file_name))
            .with_context(|| format!("cannot put {} into {}", held.file_name, self.dirs.queue.display()))?;
        self.held.insert(held.id.clone(), held);
        Ok(true)
    }

    /// Hands a lease to the renewer.
    fn track(&self, held: &Held, term: Duration) {
        let lease = Lease {
            seq: held.seq,
            file_name: held.file_name.clone(),
            term,
            renewed: Instant::now(),
            console_sent: 0,
            lost: false,
            delivering: false,
        };
        self.leases.lock().insert(held.id.clone(), lease);
    }

    /// Done with a job: the pump and the renewer forget it.
    fn forget(&mut self, id: &str) -> Option<Held> {
        self.leases.lock().remove(id);
        self.held.remove(id)
    }

    fn locate(&self, file_name: &str) -> Local {
        let name = OsStr::new(file_name);
        if self.dirs.queue.join(name).exists() {
            return Local::Waiting;
        }
        if self.dirs.running.join(name).exists() {
            return Local::Running;
        }
        let Ok(job) = JobName::parse(file_name) else { return Local::Nowhere };
        let (result, log) =
            (self.dirs.done.join(job.done_file_name()), self.dirs.done.join(job.done_with_extension("log")));
        if result.exists() {
            return Local::Done { result, log };
        }
        for candidate in [file_name.to_owned(), job.done_file_name()] {
            let file = self.dirs.failed.join(&candidate);
            if fs::symlink_metadata(&file).is_ok() {
                // No reason: the server says "failed on host <id>".
                let reason = jobfile::layout::read_reason(&file).map(|r| r.why).unwrap_or_default();
                let log = Some(self.dirs.failed.join(format!("{candidate}.log"))).filter(|p| p.exists());
                return Local::Failed { reason, log, file };
            }
        }
        Local::Nowhere
    }

    /// Delivers every held job the daemon has finished.
    fn deliver_all(&mut self, daemon_finished: bool) {
        let ids: Vec<String> = self.held.keys().cloned().collect();
        for id in ids {
            let Some(held) = self.held.get(&id) else { continue };
            if held.retry_at.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            match self.locate(&held.file_name) {
                Local::Waiting | Local::Running => {
                    if let Some(h) = self.held.get_mut(&id) {
                        h.vanished = None;
                    }
                }
                Local::Done { result, log } => {
                    let (lost, name) = (self.leases.lost(&id), held.file_name.clone());
                    if lost {
                        log::warn!("job {name}: finished, but its lease was lost: result dropped");
                    }
                    if lost || self.report_done(&id, &result, &log) {
                        remove_all(&[result, log]);
                        self.forget(&id);
                    }
                }
                Local::Failed { reason, log, file } => {
                    let h = held.clone();
                    let lost = self.leases.lost(&id);
                    if lost {
                        log::warn!("job {}: ended, but its lease was lost: nothing to report", h.file_name);
                    }
                    if lost || self.report_failed(&h, &reason, log.as_deref()) {
                        let mut files = vec![file.clone(), with_suffix(&file, ".reason")];
                        files.extend(log);
                        remove_all(&files);
                        self.forget(&id);
                    }
                }
                Local::Nowhere => {
                    // Gone from the spool without an ending (the daemon refused it under another name,
                    // or someone removed it): the server hands it out again.
                    let since = self.held.get_mut(&id).map(|h| *h.vanished.get_or_insert_with(Instant::now));
                    if daemon_finished || since.is_some_and(|t| t.elapsed() >= Duration::from_secs(5)) {
                        if let Some(h) = self.forget(&id) {
                            log::warn!("job {}: gone from the spool without an ending; giving it back", h.file_name);
                            self.release(&h);
                        }
                    }
                }
            }
        }
    }

    /// Sends the log, then the result; `true` when the job needs no more
    /// from this host (delivered, or refused for good).
    fn report_done(&mut self, id: &str, result: &Path, log: &Path) -> bool {
        let Some(h) = self.held.get(id) else { return true };
        let (seq, name) = (h.seq, h.file_name.clone());
        self.leases.set_delivering(id, true);
        let sent = (|| -> Result<Answer> {
            let mut log_file = File::open(log).with_context(|| format!("cannot open {}", log.display()))?;
            let result_file = File::open(result).with_context(|| format!("cannot open {}", result.display()))?;
            let log_len = log_file.seek(io::SeekFrom::End(0))?;
            log_file.rewind()?;
            let result_len = result_file.metadata()?.len();
            self.api.post_reader(
                &format!("host/jobs/{id}/done?seq={seq}&log_bytes={log_len}"),
                log_len + result_len,
                log_file.chain(result_file),
            )
        })();
        self.leases.set_delivering(id, false);
        self.settle(id, &name, "result", sent)
    }

    /// Sends the log (if any) and the reason; `true` when the job needs no more from this host.
    fn report_failed(&mut self, held: &Held, reason: &str, log: Option<&Path>) -> bool {
        self.leases.set_delivering(&held.id, true);
        let sent = (|| -> Result<Answer> {
            let log_bytes = match log {
                Some(p) => fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
                None => Vec::new(),
            };
            let mut body = log_bytes.clone();
            body.extend_from_slice(reason.as_bytes());
            let path = format!("host/jobs/{}/failed?seq={}&log_bytes={}", held.id, held.seq, log_bytes.len());
            self.api.post_bytes(&path, &body)
        })();
        self.leases.set_delivering(&held.id, false);
        self.settle(&held.id, &held.file_name, "failure", sent)
    }

    /// What a delivery's answer means: done with the job, or try again later.
    fn settle(&mut self, id: &str, name: &str, what: &str, sent: Result<Answer>) -> bool {
        let of = if what == "failure" { Delivering::Failure } else { Delivering::Result };
        match sent.map(|a| (settlement(a.0, of), a)) {
            Ok((Settlement::Accepted, (_, v))) => {
                let verdict = v.get("verdict").or(v.get("reason")).and_then(Value::as_str).unwrap_or("");
                log::info!("job {name}: {what} delivered to the server ({})", jobfile::sanitize(verdict.as_bytes()));
                true
            }
            Ok((Settlement::LeaseGone, answer)) => {
                log::warn!("job {name}: the server refused the {what}: {}", why(&answer));
                true
            }
            Ok((Settlement::RefusedForGood, answer)) => {
                log::error!("job {name}: the server refused the {what} ({}); reporting the job failed", why(&answer));
                let Some(h) = self.held.get(id).cloned() else { return true };
                let reason = format!("the server refused the {what} from host {}: {}", self.host_id, why(&answer));
                self.report_failed(&h, &reason, None)
            }
            Ok((Settlement::TryAgain, answer)) => {
                log::warn!("job {name}: cannot deliver the {what} ({}); trying again", why(&answer));
                self.retry_later(id);
                false
            }
            Err(e) => {
                log::warn!("job {name}: cannot deliver the {what}: {e:#}; trying again");
                self.retry_later(id);
                false
            }
        }
    }

    fn retry_later(&mut self, id: &str) {
        if let Some(h) = self.held.get_mut(id) {
            h.retries += 1;
            let wait = Duration::from_secs(1 << h.retries.min(6)).min(Duration::from_secs(60));
            h.retry_at = Some(Instant::now() + wait);
        }
    }

    /// Gives back the jobs the daemon has not started, when the host stops.
    fn release_waiting(&mut self) {
        let waiting: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| self.dirs.queue.join(&h.file_name).exists())
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            let Some(h) = self.held.get(&id) else { continue };
            // Out of the spool first: if the daemon claimed it just now, it runs and is delivered.
            if fs::remove_file(self.dirs.queue.join(&h.file_name)).is_ok() {
                if let Some(h) = self.forget(&id) {
                    self.release(&h);
                }
            }
        }
    }

    /// After the daemon stopped: deliver what finished, give back the rest.
    fn final_pass(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.held.is_empty() && Instant::now() < deadline {
            let ids: Vec<String> = self.held.keys().cloned().collect();
            for id in ids {
                let Some(h) = self.held.get(&id) else { continue };
                if let Local::Waiting = self.locate(&h.file_name) {
                    let _ = fs::remove_file(self.dirs.queue.join(&h.file_name));
                    if let Some(h) = self.forget(&id) {
                        self.release(&h);
                    }
                }
            }
            self.deliver_all(true);
            if !self.held.is_empty() {
                thread::sleep(Duration::from_millis(500));
            }
        }
        for h in self.held.values() {
            log::warn!("job {}: left undelivered; the server hands it out again when its lease runs out", h.file_name);
        }
    }

    fn release(&self, h: &Held) {
        match self.api.post_bytes(&format!("host/jobs/{}/release?seq={}", h.id, h.seq), b"") {
            Ok((200, _)) => log::info!("job {}: given back to the server", h.file_name),
            Ok(answer) => log::warn!("job {}: the server would not take it back ({})", h.file_name, why(&answer)),
            Err(e) => log::warn!("job {}: cannot give it back: {e:#}; its lease runs out instead", h.file_name),
        }
    }
}

fn request_cancel(dirs: &Dirs, file_name: &str, why: &str) {
    let path = queue::cancel_request(dirs, OsStr::new(file_name));
    if path.exists() {
        return;
    }
    let made = path.parent().map_or(Ok(()), fs::create_dir_all).and_then(|()| fs::write(&path, why.as_bytes()));
    if let Err(e) = made {
        log::error!("job {file_name}: cannot ask for it to stop ({}): {e}", path.display());
    }
}

/// Up to `max` bytes of `path` from `offset` (nothing when it is not there).
fn read_from(path: &Path, offset: u64, max: usize) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else { return Vec::new() };
    if f.seek(io::SeekFrom::Start(offset)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max as u64).read_to_end(&mut buf);
    buf
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = fs::remove_file(p);
    }
}

/// Moves a file, copying it when `to` is on another filesystem.
pub fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            fs::copy(from, to)?;
            File::open(to)?.sync_all()?;
            fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewals_answer_maps_to_what_the_host_does() {
        let table = [
            (200, false, Renewal::Renewed),
            (200, true, Renewal::Renewed),
            (409, true, Renewal::EndedByDelivery),
            (409, false, Renewal::Lost),
            (401, false, Renewal::Failed),
            (404, false, Renewal::Failed),
            (429, false, Renewal::Failed),
            (500, false, Renewal::Failed),
            (503, true, Renewal::Failed),
        ];
        for (status, delivering, want) in table {
            assert_eq!(renewal(status, delivering), want, "{status}, delivering {delivering}");
        }
    }

    #[test]
    fn a_deliverys_answer_maps_to_what_the_host_does() {
        use Delivering::{Failure, Result};
        let table = [
            (200, Result, Settlement::Accepted),
            (200, Failure, Settlement::Accepted),
            (409, Result, Settlement::LeaseGone),
            (409, Failure, Settlement::LeaseGone),
            (400, Result, Settlement::RefusedForGood),
            (413, Result, Settlement::RefusedForGood),
            (404, Result, Settlement::RefusedForGood),
            // A refused failure report is not turned into another failure report.
            (400, Failure, Settlement::TryAgain),
            (408, Result, Settlement::TryAgain),
            (429, Result, Settlement::TryAgain),
            (500, Result, Settlement::TryAgain),
            (502, Failure, Settlement::TryAgain),
            (302, Result, Settlement::TryAgain),
        ];
        for (status, what, want) in table {
            assert_eq!(settlement(status, what), want, "{status} for a {what:?}");
        }
    }
}
