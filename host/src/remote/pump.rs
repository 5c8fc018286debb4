//! The pump: takes jobs under leases into the spool, renews the leases on
//! a thread of its own, and delivers what the daemon finished.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jobfile::arch::Arch;
use jobfile::layout::{self, CacheTree, Found};
use jobfile::JobName;
use wire::client::{Api, CallError, Upload};
use wire::HostImage;

use super::images::{fetch_images, verified_images};
use super::offer;
use super::{download_to, renewal, settlement, status_of, Delivering, Remote, Renewal, Settlement};
use crate::daemon::{self, RunOptions, Summary};
use crate::queue::{self, Dirs};

/// A lease as the renewer keeps it alive.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub(crate) seq: u64,
    pub(crate) file_name: String,
    /// Its term, as the server last said.
    pub(crate) term: Duration,
    pub(crate) renewed: Instant,
    /// Console bytes the server has.
    pub(crate) console_sent: u64,
    /// The server no longer honours the lease: drop whatever comes of the job.
    pub(crate) lost: bool,
    /// Its result or failure is being delivered: a refusal of a renewal now
    /// means the delivery ended the lease, and the delivery's answer decides.
    pub(crate) delivering: bool,
}

/// The leases this host holds, by job id: the pump adds and removes them,
/// the renewer keeps them alive. Never held across a request to the server.
#[derive(Default)]
pub(crate) struct Leases(Mutex<HashMap<String, Lease>>);

impl Leases {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lost(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|l| l.lost)
    }

    pub(crate) fn set_delivering(&self, id: &str, on: bool) {
        if let Some(l) = self.lock().get_mut(id) {
            l.delivering = on;
        }
    }
}

/// Renews every lease in `leases` about every third of its term (at least
/// every 2 s, so that the console follows closely), with the console that is
/// new, until `done`. Runs on its own thread: nothing the pump does waits on it,
/// and it waits on nothing the pump does.
pub(crate) fn renew_loop(api: &Api, dirs: &Dirs, leases: &Leases, done: &AtomicBool) {
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
            let answer = api.post_bytes::<wire::Renewed>(&path, &chunk);
            let mut map = leases.lock();
            let Some(held) = map.get_mut(&id).filter(|h| h.seq == l.seq) else { continue };
            let said = status_of(&answer).map(|s| renewal(s, held.delivering));
            match (said, answer) {
                (_, Ok(renewed)) => {
                    held.renewed = Instant::now();
                    held.console_sent = l.console_sent + chunk.len() as u64;
                    held.term = Duration::from_millis(renewed.lease_ms);
                    if renewed.cancel {
                        request_cancel(dirs, &l.file_name, "its submitter cancelled it");
                    }
                }
                (Some(Renewal::EndedByDelivery), Err(_)) => {}
                (Some(Renewal::Lost), Err(e)) => {
                    log::warn!("job {}: lease lost ({e}); stopping it here", l.file_name);
                    held.lost = true;
                    drop(map);
                    request_cancel(dirs, &l.file_name, "its lease was lost");
                    // Not yet claimed by the daemon: take it out of the spool.
                    let _ = fs::remove_file(dirs.queue.join(&l.file_name));
                }
                (_, Err(e)) => log::warn!("job {}: cannot renew its lease: {e}", l.file_name),
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Why a delivery did not get the server's yes: this host could not send
/// it, or the call did not give its answer.
#[derive(Debug)]
pub(crate) enum SendError {
    Local(anyhow::Error),
    Call(CallError),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Local(e) => write!(f, "{e:#}"),
            SendError::Call(e) => write!(f, "{e}"),
        }
    }
}

impl From<CallError> for SendError {
    fn from(e: CallError) -> SendError {
        SendError::Call(e)
    }
}

impl From<anyhow::Error> for SendError {
    fn from(e: anyhow::Error) -> SendError {
        SendError::Local(e)
    }
}

impl From<io::Error> for SendError {
    fn from(e: io::Error) -> SendError {
        SendError::Local(e.into())
    }
}

/// A job this host holds a lease on, as the pump follows it.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) id: String,
    pub(crate) seq: u64,
    pub(crate) file_name: String,
    /// When the job was first seen nowhere in the spool.
    pub(crate) vanished: Option<Instant>,
    /// When delivery last failed for want of the server.
    pub(crate) retry_at: Option<Instant>,
    /// Deliveries tried and failed so far (the wait between them doubles).
    pub(crate) retries: u32,
    /// Where its time went here: leased, in the spool (fetched), its result seen.
    pub(crate) leased: Instant,
    pub(crate) spooled: Option<Instant>,
    pub(crate) ended: Option<Instant>,
}

impl Held {
    /// `lease to delivered 4.2 s: fetch 0.1 s, here 3.9 s, sending 0.2 s`: the
    /// overhead a job pays for coming from a server, stage by stage (`here`
    /// is the spool's claim, the VM, and landing the result in the spool).
    fn stages(&self, sending: Duration) -> String {
        let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        let fetched = self.spooled.map(|t| t - self.leased);
        let here = self.spooled.zip(self.ended).map(|(s, e)| e.saturating_duration_since(s));
        format!(
            "lease to delivered {}: fetch {}, here {}, sending {}",
            secs(self.leased.elapsed()),
            fetched.map_or("-".into(), secs),
            here.map_or("-".into(), secs),
            secs(sending)
        )
    }
}

/// Empties the spool of jobs a previous run held: their leases ran out, or
/// will, and the server hands them out again.
pub(crate) fn clear_spool(dirs: &Dirs) -> io::Result<usize> {
    let mut n = 0;
    for dir in [&dirs.queue, &dirs.host_dir, &dirs.done, &dirs.failed] {
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
    let api = Arc::new(remote.api()?);
    // Verified in full before the server hears of them, and again at every check.
    let archs = opts.limits.emulators.archs();
    let verified = Arc::new(Mutex::new(verified_images(&dirs.images, &archs)));
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
        let key = opts.limits.signer.as_ref().map(|s| s.key.public().to_string());
        thread::Builder::new().name("pump".into()).spawn(move || {
            let mut pump = Pump {
                api,
                dirs,
                host_id,
                capacity,
                remote,
                rules,
                images,
                leases,
                held: HashMap::new(),
                key,
                sessions: Arc::default(),
            };
            pump.run(&stop, &done);
        })?
    };
    let images = {
        let (api, images, stop, verified) = (api.clone(), dirs.images.clone(), stop.clone(), verified.clone());
        let archs = archs.clone();
        thread::Builder::new()
            .name("images".into())
            .spawn(move || follow_images(&api, (&images, &archs), &stop, &verified))?
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

/// Fetches the images the server offers that this host lacks, every
/// minute (soon after a failed check: the server may have been down at
/// start), and keeps `verified` to what is verified in full.
fn follow_images(api: &Api, (images, archs): (&Path, &[Arch]), stop: &AtomicBool, verified: &Mutex<Vec<HostImage>>) {
    let mut next = Instant::now() + IMAGE_CHECK_EVERY;
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(500));
        if Instant::now() >= next {
            next = Instant::now() + IMAGE_CHECK_EVERY;
            if let Err(e) = fetch_images(api, images, archs) {
                log::warn!("cannot check the server's images: {e:#}");
                next = Instant::now() + Duration::from_secs(5);
            }
            let now_verified = verified_images(images, archs);
            *verified.lock().unwrap_or_else(|p| p.into_inner()) = now_verified;
        }
    }
}

/// How often a running host looks for new images on the server.
pub(crate) const IMAGE_CHECK_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct Pump {
    pub(crate) api: Arc<Api>,
    pub(crate) dirs: Dirs,
    pub(crate) host_id: String,
    pub(crate) capacity: u64,
    pub(crate) remote: Remote,
    pub(crate) rules: queue::Rules,
    /// The images verified here (number, checksum of image.toml, architecture).
    pub(crate) images: Arc<Mutex<Vec<HostImage>>>,
    /// What the renewer keeps alive.
    pub(crate) leases: Arc<Leases>,
    pub(crate) held: HashMap<String, Held>,
    /// The public key this host signs its results with, for the server to pin.
    pub(crate) key: Option<String>,
    /// Debug sessions this host offers now (`offer`): each holds a worker, so each counts as a job held.
    pub(crate) sessions: Arc<AtomicUsize>,
}

/// Where a held job is in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    Waiting,
    Running,
    Done { result: PathBuf, log: PathBuf },
    Failed { reason: String, log: Option<PathBuf>, file: PathBuf },
    Nowhere,
}

/// Where a job this remote host holds is in its own directories
/// (`Beside::locate`, with this host's `running/<host-id>/` its only host).
pub fn locate(dirs: &Dirs, file_name: &str) -> Local {
    let mine = [(String::new(), dirs.host_dir.clone())];
    match dirs.locate(file_name, &mine, layout::lone_file) {
        Found::Waiting(_) => Local::Waiting,
        Found::Running { .. } => Local::Running,
        Found::Done { result, log, .. } => Local::Done { result, log },
        // No reason: the server says "failed on host <id>".
        Found::Failed { file, reason, log } => {
            Local::Failed { reason: reason.map(|r| r.why).unwrap_or_default(), log, file }
        }
        Found::Missing => Local::Nowhere,
    }
}

impl Pump {
    pub(crate) fn run(&mut self, stop: &AtomicBool, daemon_done: &AtomicBool) {
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
            } else if self.busy() < self.capacity && asked.is_none_or(|t| t.elapsed() >= self.remote.poll) {
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

    /// Jobs held and debug sessions offered: what takes this host's workers.
    fn busy(&self) -> u64 {
        self.held.len() as u64 + self.sessions.load(Ordering::Relaxed) as u64
    }

    /// Asks the server for a job and puts it in the spool; `Ok(true)` when one came.
    pub(crate) fn take_one(&mut self) -> Result<bool> {
        let verified = self.images.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let body = wire::LeaseRequest {
            images: verified,
            capacity: self.capacity,
            running: self.busy(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            caches: self.held_caches(),
            key: self.key.clone(),
        };
        let answer: wire::LeaseAnswer = self.api.post_json("host/lease", &body)?;
        // Before the job is in the spool: its caches are lent at the generation the server says.
        self.note_generations(answer.generations)?;
        let Some(lease) = answer.lease else { return Ok(false) };
        let wire::Lease { id, seq, file_name, size, lease_ms, attempt, packages, owner, rebuild, debug, env } = lease;
        let id = id.as_str();
        let Ok(job) = JobName::parse(&file_name) else {
            bail!("the server sent a job named {:?}", jobfile::sanitize(file_name.as_bytes()))
        };
        let mut held = Held {
            id: id.to_owned(),
            seq,
            file_name: job.input_file_name(),
            vanished: None,
            retry_at: None,
            retries: 0,
            leased: Instant::now(),
            spooled: None,
            ended: None,
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
        if let Err(e) = download_to(&self.api, &format!("host/jobs/{id}/file?seq={seq}"), &partial, size) {
            let _ = fs::remove_file(&partial);
            self.leases.lock().remove(id);
            bail!("cannot download job {id}: {e:#}");
        }
        if self.leases.lost(id) {
            let _ = fs::remove_file(&partial);
            self.leases.lock().remove(id);
            bail!("job {id}: the lease was lost while it downloaded");
        }
        // Its terms first, so that the daemon installs exactly the packages the
        // server pinned and lends the submitter's caches. A verified rebuild's
        // run: the server placed it; here its terms only name the job and date it.
        let rebuild = rebuild.map(|terms| jobfile::rebuild::Terms { apart_until: 0, ..terms });
        let terms = jobfile::layout::Terms { pin: packages, owner, rebuild, debug, env };
        if let Err(e) = terms.write(&self.dirs.running, OsStr::new(&held.file_name)) {
            let _ = fs::remove_file(&partial);
            self.leases.lock().remove(id);
            bail!("job {id}: cannot keep the terms the server gave it: {e}");
        }
        // Renamed in whole: the daemon never sees a file being written.
        fs::rename(&partial, self.dirs.queue.join(&held.file_name))
            .with_context(|| format!("cannot put {} into {}", held.file_name, self.dirs.queue.display()))?;
        held.spooled = Some(Instant::now());
        self.held.insert(held.id.clone(), held);
        Ok(true)
    }

    /// The build caches the daemon last said it holds (`running/.caches/host.<host-id>.json`).
    pub(crate) fn held_caches(&self) -> Vec<wire::HeldCache> {
        let held: Vec<wire::HeldCache> = match CacheTree::of(&self.dirs.running).report(&self.host_id) {
            Ok(held) => held.unwrap_or_default(),
            Err(why) => {
                log::warn!("cannot read what this host's caches hold: {why}");
                Vec::new()
            }
        };
        held.into_iter().filter(|h| h.check().is_ok()).take(wire::MAX_HELD_CACHES).collect()
    }

    /// Keeps the generations the server sent for the owners it names (the
    /// daemon then frees the caches those owners cleared).
    pub(crate) fn note_generations(&self, sent: jobfile::caches::Generations) -> Result<()> {
        if sent.is_empty() {
            return Ok(());
        }
        let tree = CacheTree::of(&self.dirs.running);
        let mut generations = tree.generations().unwrap_or_default();
        let before = generations.clone();
        for (owner, names) in sent {
            if jobfile::caches::check_owner(&owner).is_ok() {
                generations
                    .insert(owner, names.into_iter().filter(|(n, _)| jobfile::caches::check_name(n).is_ok()).collect());
            }
        }
        if generations != before {
            tree.write_generations(&generations)
                .context("cannot keep the generations of the server's cleared caches")?;
        }
        Ok(())
    }

    /// Hands a lease to the renewer.
    pub(crate) fn track(&self, held: &Held, term: Duration) {
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
    pub(crate) fn forget(&mut self, id: &str) -> Option<Held> {
        self.leases.lock().remove(id);
        let held = self.held.remove(id);
        // A verified rebuild's terms here were the lease's: the server keeps the pair's own.
        if let Some(h) = &held {
            jobfile::rebuild::remove_terms(&self.dirs.running, OsStr::new(&h.file_name));
        }
        held
    }

    pub(crate) fn locate(&self, file_name: &str) -> Local {
        locate(&self.dirs, file_name)
    }

    /// Delivers every held job the daemon has finished.
    pub(crate) fn deliver_all(&mut self, daemon_finished: bool) {
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
                    if let Some(h) = self.held.get_mut(&id) {
                        h.ended.get_or_insert_with(Instant::now);
                    }
                    if lost {
                        log::warn!("job {name}: finished, but its lease was lost: result dropped");
                    }
                    if lost || self.report_done(&id, &result, &log) {
                        remove_all(&[layout::provenance_beside(&result), result, log]);
                        self.forget(&id);
                        if !lost {
                            offer::offer_if_open(offer::Offer {
                                api: Arc::clone(&self.api),
                                running: self.dirs.running.clone(),
                                file_name: name,
                                id: id.clone(),
                                open: Arc::clone(&self.sessions),
                            });
                        }
                    }
                }
                Local::Failed { reason, log, file } => {
                    let h = held.clone();
                    let lost = self.leases.lost(&id);
                    if lost {
                        log::warn!("job {}: ended, but its lease was lost: nothing to report", h.file_name);
                    }
                    if lost || self.report_failed(&h, &reason, log.as_deref()) {
                        let mut files = vec![file.clone(), layout::beside_entry(&file, "reason")];
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
    pub(crate) fn report_done(&mut self, id: &str, result: &Path, log: &Path) -> bool {
        let Some(h) = self.held.get(id) else { return true };
        let (seq, name) = (h.seq, h.file_name.clone());
        self.leases.set_delivering(id, true);
        let sending = Instant::now();
        let sent = (|| -> Result<wire::Delivered, SendError> {
            let mut log_file = File::open(log).with_context(|| format!("cannot open {}", log.display()))?;
            let result_file = File::open(result).with_context(|| format!("cannot open {}", result.display()))?;
            let log_len = log_file.seek(io::SeekFrom::End(0))?;
            log_file.rewind()?;
            let result_len = result_file.metadata()?.len();
            // Its signed provenance between them (none: the server refuses the result, saying so).
            let provenance = fs::read(layout::provenance_beside(result)).unwrap_or_default();
            let prov_len = provenance.len() as u64;
            let upload = Upload {
                len: log_len + prov_len + result_len,
                content_type: "application/octet-stream",
                expect_continue: false,
                body: log_file.chain(io::Cursor::new(provenance)).chain(result_file),
            };
            let path = format!("host/jobs/{id}/done?seq={seq}&log_bytes={log_len}&provenance_bytes={prov_len}");
            Ok(self.api.post_stream(&path, upload)?)
        })();
        self.leases.set_delivering(id, false);
        if let (Ok(_), Some(h)) = (&sent, self.held.get(id)) {
            log::info!("job {name}: {}", h.stages(sending.elapsed()));
        }
        self.settle(id, &name, "result", sent)
    }

    /// Sends the log (if any) and the reason; `true` when the job needs no more from this host.
    pub(crate) fn report_failed(&mut self, held: &Held, reason: &str, log: Option<&Path>) -> bool {
        self.leases.set_delivering(&held.id, true);
        let sent = (|| -> Result<wire::Delivered, SendError> {
            let log_bytes = match log {
                Some(p) => fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
                None => Vec::new(),
            };
            let mut body = log_bytes.clone();
            body.extend_from_slice(reason.as_bytes());
            let path = format!("host/jobs/{}/failed?seq={}&log_bytes={}", held.id, held.seq, log_bytes.len());
            Ok(self.api.post_bytes(&path, &body)?)
        })();
        self.leases.set_delivering(&held.id, false);
        self.settle(&held.id, &held.file_name, "failure", sent)
    }

    /// What a delivery's answer means: done with the job, or try again later.
    pub(crate) fn settle(
        &mut self,
        id: &str,
        name: &str,
        what: &str,
        sent: Result<wire::Delivered, SendError>,
    ) -> bool {
        let of = if what == "failure" { Delivering::Failure } else { Delivering::Result };
        let refusal = match &sent {
            Err(SendError::Call(e)) => e.refusal().cloned(),
            _ => None,
        };
        match (sent, refusal.map(|r| (settlement(r.status, of), r))) {
            (Ok(delivered), _) => {
                let said = delivered.verdict.or(delivered.reason).unwrap_or_default();
                log::info!("job {name}: {what} delivered to the server ({})", jobfile::sanitize(said.as_bytes()));
                true
            }
            (_, Some((Settlement::LeaseGone, refusal))) => {
                log::warn!("job {name}: the server refused the {what}: {refusal}");
                true
            }
            (_, Some((Settlement::RefusedForGood, refusal))) => {
                log::error!("job {name}: the server refused the {what} ({refusal}); reporting the job failed");
                let Some(h) = self.held.get(id).cloned() else { return true };
                let reason = format!("the server refused the {what} from host {}: {refusal}", self.host_id);
                self.report_failed(&h, &reason, None)
            }
            (Err(e), _) => {
                log::warn!("job {name}: cannot deliver the {what} ({e}); trying again");
                self.retry_later(id);
                false
            }
        }
    }

    pub(crate) fn retry_later(&mut self, id: &str) {
        if let Some(h) = self.held.get_mut(id) {
            h.retries += 1;
            let wait = Duration::from_secs(1 << h.retries.min(6)).min(Duration::from_secs(60));
            h.retry_at = Some(Instant::now() + wait);
        }
    }

    /// Gives back the jobs the daemon has not started, when the host stops.
    pub(crate) fn release_waiting(&mut self) {
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
    pub(crate) fn final_pass(&mut self) {
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

    pub(crate) fn release(&self, h: &Held) {
        match self.api.post_bytes::<wire::Released>(&format!("host/jobs/{}/release?seq={}", h.id, h.seq), b"") {
            Ok(_) => log::info!("job {}: given back to the server", h.file_name),
            Err(CallError::Refused(r)) => log::warn!("job {}: the server would not take it back ({r})", h.file_name),
            Err(e) => log::warn!("job {}: cannot give it back: {e}; its lease runs out instead", h.file_name),
        }
    }
}

pub(crate) fn request_cancel(dirs: &Dirs, file_name: &str, why: &str) {
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
pub(crate) fn read_from(path: &Path, offset: u64, max: usize) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else { return Vec::new() };
    if f.seek(io::SeekFrom::Start(offset)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max as u64).read_to_end(&mut buf);
    buf
}

pub(crate) fn remove_all(paths: &[PathBuf]) {
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
