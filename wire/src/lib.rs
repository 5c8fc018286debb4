//! What construir's parts say to each other over HTTP: every request and
//! response body of API version 1, as one set of serde types that the
//! server writes and the build hosts, the client and the page read. The
//! API's OpenAPI schema (served by the server) is made from these same types, so a
//! third-party client can be written from it.
//!
//! Two parts of the API:
//! - submitters (`/v1/jobs`, `/v1/whoami`, `/v1/hosts`, `/v1/page-link`):
//!   submit, follow, fetch and cancel their own jobs;
//! - build hosts (`/v1/host/...`): take a job under a lease, renew it,
//!   deliver the result or give the job back.
//!
//! Fields only ever get added; a reader ignores what it does not know.

#[cfg(feature = "client")]
pub mod client;
pub mod result_cache;
#[cfg(feature = "client")]
pub mod socket;

use jobfile::arch::Arch;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Every error the API answers: what went wrong, in words meant for a
/// person. A refusal by a limit also names the limit and the amounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    /// The limit that refused an upload (`max_job_bytes`, `max_waiting`,
    /// `max_stored_bytes`, `max_per_hour`, `max_uploads`, `min_free`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<u64>,
    /// How far `requested` is over `allowed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_by: Option<u64>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody { error: error.into(), limit: None, allowed: None, requested: None, over_by: None }
    }
}

/// An account's limits; an absent one is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    pub max_job_bytes: Option<u64>,
    pub max_waiting: Option<u64>,
    pub max_stored_bytes: Option<u64>,
    pub max_per_hour: Option<u64>,
    pub retention_days: Option<u64>,
}

impl Limits {
    /// Each limit of `self`, or `defaults`' where `self` has none.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            max_job_bytes: self.max_job_bytes.or(defaults.max_job_bytes),
            max_waiting: self.max_waiting.or(defaults.max_waiting),
            max_stored_bytes: self.max_stored_bytes.or(defaults.max_stored_bytes),
            max_per_hour: self.max_per_hour.or(defaults.max_per_hour),
            retention_days: self.retention_days.or(defaults.retention_days),
        }
    }
}

/// `GET /v1/whoami`: the account a token names, and the limits that apply to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    pub account: String,
    pub limits: Limits,
}

/// `POST /v1/jobs?name=N&image=I`: the job file is the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// The job's name: what its file is called before `_i<image>`.
    pub name: String,
    /// The image number it runs on.
    pub image: String,
    /// `2`: a verified rebuild. The job runs twice, on two hosts where the
    /// farm has two, with `SOURCE_DATE_EPOCH` and the rest of the
    /// environment fixed, and the two results are compared file by file
    /// (it counts as two jobs against the account's limits). `1` or none:
    /// once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_on: Option<u32>,
    /// `true`: when the job does not end ok, its VM stays up for a debug
    /// session (`GET /v1/jobs/{id}/debug`), as `debug = true` in its
    /// `construir.toml` asks too. Not with `verify_on=2`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debug: bool,
    /// `true`: run it even when the result cache holds its result, and
    /// keep its result out of the cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_result_cache: bool,
}

/// `POST /v1/jobs/{id}/rerun?debug=true`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
pub struct RerunQuery {
    /// Run it as a debug job (`SubmitQuery::debug`).
    #[serde(default)]
    pub debug: bool,
}

/// `?run=2` on a job's log, result and provenance: a verified rebuild's
/// second run (`1` or none: the job's own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u32>,
}

/// Where a job is now, as the server's directories say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Place {
    /// Waiting in the queue; `position` 1 is next.
    Waiting { position: usize, waiting: usize },
    /// Running on `host`, for `elapsed_secs`.
    Running { host: String, elapsed_secs: u64 },
    /// Finished with a result; `verdict` is the log's last line.
    Done { verdict: String, result_bytes: u64 },
    /// Failed, with the first line of its reason.
    Failed { reason: String },
    /// In none of the directories (removed by hand, or between two of them).
    Missing,
}

impl Place {
    pub fn name(&self) -> &'static str {
        match self {
            Place::Waiting { .. } => "waiting",
            Place::Running { .. } => "running",
            Place::Done { .. } => "done",
            Place::Failed { .. } => "failed",
            Place::Missing => "missing",
        }
    }

    /// Whether the job can change no more.
    pub fn is_final(&self) -> bool {
        matches!(self, Place::Done { .. } | Place::Failed { .. })
    }

    /// One line for a person: `waiting: position 1 of 3`, `running on h1 for 4 s`, ...
    pub fn describe(&self) -> String {
        match self {
            Place::Waiting { position, waiting } => format!("waiting: position {position} of {waiting}"),
            Place::Running { host, elapsed_secs } => format!("running on {host} for {elapsed_secs} s"),
            Place::Done { verdict, .. } => format!("done: {verdict}"),
            Place::Failed { reason } => format!("failed: {reason}"),
            Place::Missing => "missing".to_owned(),
        }
    }
}

/// A job as its submitter sees it (`POST /v1/jobs`, `GET /v1/jobs/{id}`,
/// `POST /v1/jobs/{id}/cancel`, and each of `GET /v1/jobs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub image: String,
    /// Bytes of the job file, which is also the most its result may take.
    pub size: u64,
    /// When it was submitted (RFC 3339, UTC).
    pub submitted: String,
    /// `place`'s state, repeated for readers that want only that.
    pub state: String,
    pub place: Place,
    /// When retention removed its result and log (RFC 3339, UTC).
    pub deleted: Option<String>,
    /// Times a build host was handed it.
    pub attempts: u64,
    /// The packages the server resolved for it at submit, which every host
    /// installs exactly (a `jobfile::deps::Resolution`: each package's
    /// name, version, architecture, sha256, size and path in the archive);
    /// none when the job declares none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub packages: Option<jobfile::deps::Resolution>,
    /// What the job's own `status.json` says, once it has a result
    /// (`GET /v1/jobs/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub status: Option<jobfile::JobStatus>,
    /// What a cancel of a running job did (`POST /v1/jobs/{id}/cancel` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<String>,
    /// A verified rebuild: where its second run is and, once both have
    /// ended, the verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<Rebuild>,
    /// The host the server recorded for its run, as `GET /v1/hosts/keys`
    /// names it (a remote host's account, or `<node> (slurm)`): its result
    /// must be signed with that host's key, as that host. None for a local
    /// host's run (signed as the local host whose key signed it) and for a
    /// run that has not ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_by: Option<String>,
    /// The debug session its failed VM keeps open for its owner
    /// (`construir debug ID`), while there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<DebugSession>,
    /// Served from the result cache, not run: whose result it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cache: Option<result_cache::CacheHit>,
    /// What the result cache does with its result: `stored`, `not stored:
    /// <why>`, or, before it ends, whether it will be looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_cache: Option<String>,
}

/// An open debug session: a root shell in the failed job's VM, which its
/// owner reaches over `GET /v1/jobs/{id}/debug` (a WebSocket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DebugSession {
    /// The host whose VM it is.
    pub host: String,
    /// When it opened, the latest its owner may attach, the latest it ends (RFC 3339, UTC).
    pub opened: String,
    pub attach_by: String,
    pub ends_by: String,
    /// Whether its owner has attached (a session takes one attach).
    pub attached: bool,
}

/// `GET /v1/host/jobs/{id}/debug`: a remote host offers the debug session
/// of a job it delivered; the bounds it serves it within (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
pub struct OfferQuery {
    pub attach_by: u64,
    pub ends_by: u64,
}

/// A verified rebuild as its submitter sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rebuild {
    /// Where the second run is (the first is the job's own `place`).
    pub second: Place,
    /// `SOURCE_DATE_EPOCH` in both runs.
    pub epoch: u64,
    /// The verdict, once both runs have ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<RebuildVerdict>,
    /// The host recorded for the second run, as [`Job::built_by`] is for the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_built_by: Option<String>,
}

/// What a verified rebuild's comparison came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RebuildOutcome {
    /// Every file the same (path, mode, content).
    Reproducible,
    /// Some are not.
    Differs,
    /// A run failed or a result cannot be read (`reason`).
    NotCompared,
}

impl RebuildOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RebuildOutcome::Reproducible => "reproducible",
            RebuildOutcome::Differs => "differs",
            RebuildOutcome::NotCompared => "not_compared",
        }
    }
}

/// What the comparison of a verified rebuild's two results found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RebuildVerdict {
    pub outcome: RebuildOutcome,
    /// The hosts that ran the first and the second run: each the host the
    /// server recorded for it (or, for a local host's run, the local host
    /// whose key signed it), which its signed provenance names too.
    pub hosts: Vec<String>,
    /// Whether both runs had to share one host (the farm had one).
    pub same_host: bool,
    /// Files compared (the job's status without its times, and its console, among them).
    pub files: u64,
    /// The job names build caches, and both runs were built without them
    /// (each started empty): an account's cache could feed both the same objects.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_caches: bool,
    /// The files that differ, in path order (at most 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub differing: Vec<jobfile::rebuild::Difference>,
    /// How many differ in all.
    pub differing_total: u64,
    /// Why the runs were not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was decided (RFC 3339, UTC).
    pub decided: String,
}

impl RebuildVerdict {
    /// One line: the outcome, the hosts, the first files that differ.
    pub fn summary(&self) -> String {
        let hosts = if self.same_host {
            format!("both runs on {} (the farm had one host)", self.hosts.first().map_or("?", |h| h.as_str()))
        } else {
            format!("on {}", self.hosts.join(" and "))
        };
        let hosts = if self.without_caches { format!("{hosts}, both without build caches") } else { hosts };
        match self.outcome {
            RebuildOutcome::Reproducible => format!("reproducible: all {} files the same {hosts}", self.files),
            RebuildOutcome::Differs => {
                let shown: Vec<String> =
                    self.differing.iter().take(5).map(|d| format!("{} ({})", d.path, d.what)).collect();
                let more = self.differing_total.saturating_sub(shown.len() as u64);
                let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                format!(
                    "NOT reproducible: {} of {} files differ {hosts}: {}{more}",
                    self.differing_total,
                    self.files,
                    shown.join(", ")
                )
            }
            RebuildOutcome::NotCompared => format!("not compared: {}", self.reason.as_deref().unwrap_or("(no reason)")),
        }
    }
}

/// `GET /v1/jobs`: the account's jobs, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// `POST /v1/page-link`: a one-time path that logs a browser into the page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PageLink {
    /// Append to the server's address; it works once.
    pub path: String,
    pub expires_in_secs: u64,
}

/// An image as a build host has it: its number and the checksum of its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostImage {
    pub name: String,
    pub checksum: String,
    /// Its architecture (`amd64`, `arm64`), from its manifest (which the checksum covers).
    /// A host lists only images it can run.
    #[serde(default)]
    #[schema(value_type = String)]
    pub arch: Arch,
}

/// Most images a host may say it has.
pub const MAX_HOST_IMAGES: usize = 64;

impl HostImage {
    /// An image as a host may name it: a number of 1 to 9 digits with a sha256 in lowercase hex.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 9 || !self.name.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{:?} is not an image number",
                jobfile::text::sanitize_capped(self.name.as_bytes(), 32)
            ));
        }
        if self.checksum.len() != 64 || !self.checksum.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("image i{}: the checksum is not a sha256 in lowercase hex", self.name));
        }
        Ok(())
    }
}

/// One of the submitter's own jobs on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobRef {
    pub id: String,
    pub name: String,
}

/// A build host as a submitter sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub name: String,
    /// When it last asked for work or renewed a lease (RFC 3339, UTC).
    pub last_seen: String,
    pub seen_secs_ago: i64,
    /// The images it has that passed the server's checks.
    pub images: Vec<HostImage>,
    /// Jobs it runs at once.
    pub capacity: u64,
    /// Jobs it holds now.
    pub running: usize,
    /// Which of those are the asking account's.
    pub your_jobs: Vec<JobRef>,
    /// The asking account's build caches it holds warm, as `name (i<image>)`.
    #[serde(default)]
    pub your_caches: Vec<String>,
    pub version: String,
    pub disabled: bool,
    /// The public key its results are signed with, as the server pinned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl HostView {
    /// Its images as a person reads them: `i0 i1` (empty for none).
    pub fn image_names(&self) -> String {
        self.images.iter().map(|i| format!("i{}", i.name)).collect::<Vec<_>>().join(" ")
    }

    /// The architectures of its images, each once: `amd64 arm64`.
    pub fn archs(&self) -> String {
        let archs: std::collections::BTreeSet<Arch> = self.images.iter().map(|i| i.arch).collect();
        archs.iter().map(|a| a.debian()).collect::<Vec<_>>().join(" ")
    }
}

/// A build host's public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostKey {
    /// The remote host's account, or a local host's id followed by ` (local)`.
    pub host: String,
    /// `ed25519:<base64>`.
    pub key: String,
}

/// `GET /v1/hosts/keys`: the keys that sign the results of this server's hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostKeys {
    pub keys: Vec<HostKey>,
}

/// `GET /v1/hosts`: the build hosts the server knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostList {
    pub hosts: Vec<HostView>,
}

/// `POST /v1/host/lease`: what a build host says of itself when it asks for work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseRequest {
    /// The images it has, each verified against the server's checksum.
    pub images: Vec<HostImage>,
    /// Jobs it runs at once.
    pub capacity: u64,
    /// Jobs it holds now (the server hands one more only below capacity).
    pub running: u64,
    /// Its `construir-host` version.
    #[serde(default)]
    pub version: String,
    /// The build caches it holds (most recently used first, at most
    /// [`MAX_HELD_CACHES`]): the server prefers a host with a warm cache for
    /// a job's key, and shows an account its caches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<HeldCache>,
    /// The public key it signs its results' provenance with (`ed25519:<base64>`),
    /// pinned by the server the first time it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Most caches a host may say it holds.
pub const MAX_HELD_CACHES: usize = 1024;

/// A build cache a host holds: its key (owner, image, name), its
/// generation (raised when its owner clears it) and its kept version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeldCache {
    /// `a<id>` for a server's account, `local` on a local queue.
    pub owner: String,
    /// The image number.
    pub image: String,
    pub name: String,
    pub generation: u64,
    pub version: u64,
    /// Bytes it takes on the host's disk.
    pub bytes: u64,
    /// When a job last started from it (RFC 3339, UTC).
    pub used: String,
}

impl HeldCache {
    /// A key as a host may name it: an owner, an image number of 1 to 9
    /// digits, a cache name, and a short time.
    pub fn check(&self) -> Result<(), String> {
        jobfile::caches::check_owner(&self.owner)?;
        jobfile::caches::check_name(&self.name)?;
        if self.image.is_empty() || self.image.len() > 9 || !self.image.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("cache {}: the image is not an image number", self.name));
        }
        if self.used.len() > 40 || !self.used.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("cache {}: the time is not up to 40 printable ASCII characters", self.name));
        }
        Ok(())
    }
}

impl LeaseRequest {
    /// Checks what a host says of itself: an image is a number of 1 to 9
    /// digits with a sha256 in lowercase hex, at most `MAX_HOST_IMAGES` of
    /// them, and the version is short printable text. What passes is what
    /// the server stores and shows to submitters.
    pub fn check(&self) -> Result<(), String> {
        if self.images.len() > MAX_HOST_IMAGES {
            return Err(format!("{} images listed; a host may list at most {MAX_HOST_IMAGES}", self.images.len()));
        }
        for i in &self.images {
            i.check()?;
        }
        if self.version.len() > 64 || !self.version.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the version is not up to 64 printable ASCII characters".to_owned());
        }
        if self.caches.len() > MAX_HELD_CACHES {
            return Err(format!("{} caches listed; a host may list at most {MAX_HELD_CACHES}", self.caches.len()));
        }
        for c in &self.caches {
            c.check()?;
        }
        if let Some(key) = &self.key {
            if key.len() > 100 || !key.starts_with("ed25519:") || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("the key is not ed25519:<base64>".to_owned());
            }
        }
        Ok(())
    }
}

/// A job handed to a build host. Every later request about it names `seq`,
/// the lease's fencing number: a host whose lease ran out or was given to
/// another is refused (409).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub id: String,
    /// The job file's name, `<name>_i<image>.tar.xz`.
    pub file_name: String,
    pub size: u64,
    pub seq: u64,
    /// Which time this job is handed out (1 the first).
    pub attempt: u64,
    /// How long the lease lasts unless renewed.
    pub lease_ms: u64,
    /// The packages the server resolved for the job at submit, which the
    /// host installs exactly (a `jobfile::deps::Resolution`); none when the
    /// job declares none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub packages: Option<jobfile::deps::Resolution>,
    /// Whose build caches the job uses (`a<id>`: the submitter's account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A verified rebuild's run: the name and `SOURCE_DATE_EPOCH` both runs
    /// get (`jobfile::rebuild::Terms`; the server has placed it already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub rebuild: Option<jobfile::rebuild::Terms>,
    /// Its submitter asked for a debug session: when it does not end ok,
    /// its VM stays up and the host offers the session
    /// (`GET /v1/host/jobs/{id}/debug`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debug: bool,
    /// The name (`CONSTRUIR_JOB`) and `SOURCE_DATE_EPOCH` the job is given,
    /// fixed by its inputs (`jobfile::jobenv::JobEnv`); none from a server
    /// before them, whose jobs see their queue name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub env: Option<jobfile::jobenv::JobEnv>,
}

/// The answer to `POST /v1/host/lease`: a job, or none for now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseAnswer {
    pub lease: Option<Lease>,
    /// The generations of the cleared caches of every owner the host named
    /// (and of the leased job's): a host starts a cache whose generation
    /// is not this one again, empty (owner -> name -> generation).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub generations: jobfile::caches::Generations,
}

/// One of the asking account's build caches, as a host holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CacheView {
    /// The host that holds it (`local` hosts by their host id).
    pub host: String,
    pub image: String,
    pub name: String,
    pub version: u64,
    pub bytes: u64,
    /// When a job last started from it (RFC 3339, UTC).
    pub used: String,
}

/// `GET /v1/caches`: the asking account's build caches on every host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CacheList {
    pub caches: Vec<CacheView>,
}

/// `POST /v1/caches/clear`: clear one cache by name (on every image and
/// host), or all of the account's when `name` is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClearCaches {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The answer to `POST /v1/caches/clear`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClearedCaches {
    /// The names cleared: no job starts from what they held.
    pub cleared: Vec<String>,
    /// How many copies hosts held of them (each host frees its own when it next hears from the server).
    pub copies: u64,
}

/// The query of every request under a lease (`/v1/host/jobs/{id}/...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SeqQuery {
    /// The lease's fencing number.
    pub seq: u64,
    /// Renew: the byte of the console the body starts at.
    #[serde(default)]
    pub offset: u64,
    /// Done and failed: how many bytes of the body are the console log.
    #[serde(default)]
    pub log_bytes: u64,
    /// Done: how many bytes after the log are the result's signed provenance (the result follows).
    #[serde(default)]
    pub provenance_bytes: u64,
}

/// The answer to `POST /v1/host/jobs/{id}/renew`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Renewed {
    /// The lease's term from now.
    pub lease_ms: u64,
    /// Whether the submitter asked for the job to be stopped.
    pub cancel: bool,
}

/// The answer to `POST /v1/host/jobs/{id}/done` and `.../failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Delivered {
    pub delivered: bool,
    /// Done: the verdict the server read from the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// Failed: the reason as the server recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to `POST /v1/host/jobs/{id}/release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Released {
    pub released: bool,
}

/// One file of an offered image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OfferedFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// An image the server offers to build hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OfferedImage {
    pub name: String,
    /// The sha256 of its manifest: what a host reports once it has it.
    pub checksum: String,
    /// Its architecture: a host fetches only images it can run.
    #[serde(default)]
    #[schema(value_type = String)]
    pub arch: Arch,
    pub files: Vec<OfferedFile>,
}

/// `GET /v1/host/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<OfferedImage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    /// `value` as JSON is `expected`, and reads back as itself.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: T,
        expected: serde_json::Value,
    ) {
        let written = serde_json::to_value(&value).expect("serialize");
        assert_eq!(written, expected);
        let read: T = serde_json::from_value(written).expect("deserialize");
        assert_eq!(read, value);
    }

    fn job(place: Place) -> Job {
        Job {
            id: "j1".into(),
            name: "hello".into(),
            image: "0".into(),
            size: 65536,
            submitted: "2026-12-03T10:00:00Z".into(),
            state: place.name().into(),
            place,
            deleted: None,
            attempts: 1,
            packages: None,
            status: None,
            cancel: None,
            rebuild: None,
            built_by: None,
            debug: None,
            from_cache: None,
            result_cache: None,
        }
    }

    #[test]
    fn a_verified_rebuild_and_its_verdict_round_trip_as_documented() {
        let differing = vec![jobfile::rebuild::Difference { path: "out/when".into(), what: "content".into() }];
        let verdict = RebuildVerdict {
            outcome: RebuildOutcome::Differs,
            hosts: vec!["h1".into(), "h2".into()],
            same_host: false,
            files: 3,
            differing,
            differing_total: 1,
            reason: None,
            decided: "2026-12-04T10:00:00Z".into(),
            without_caches: false,
        };
        assert_eq!(verdict.summary(), "NOT reproducible: 1 of 3 files differ on h1 and h2: out/when (content)");
        let mut done = job(Place::Done { verdict: "ok (exit code 0)".into(), result_bytes: 300 });
        done.rebuild = Some(Rebuild {
            second: Place::Failed { reason: "cancelled".into() },
            epoch: 1_700_000_000,
            verdict: Some(verdict.clone()),
            second_built_by: None,
        });
        let value = serde_json::to_value(&done).expect("json");
        assert_eq!(
            value["rebuild"],
            json!({"second": {"state": "failed", "reason": "cancelled"}, "epoch": 1_700_000_000u64,
                "verdict": {"outcome": "differs", "hosts": ["h1", "h2"], "same_host": false, "files": 3,
                "differing": [{"path": "out/when", "what": "content"}], "differing_total": 1,
                "decided": "2026-12-04T10:00:00Z"}})
        );
        assert_eq!(serde_json::from_value::<Job>(value).expect("back"), done);
        let same = RebuildVerdict {
            outcome: RebuildOutcome::Reproducible,
            hosts: vec!["h1".into(), "h1".into()],
            same_host: true,
            differing: vec![],
            differing_total: 0,
            ..verdict.clone()
        };
        assert_eq!(same.summary(), "reproducible: all 3 files the same both runs on h1 (the farm had one host)");
        let cacheless = RebuildVerdict { without_caches: true, same_host: false, ..same.clone() };
        assert_eq!(cacheless.summary(), "reproducible: all 3 files the same on h1 and h1, both without build caches");
        let lost = RebuildVerdict {
            outcome: RebuildOutcome::NotCompared,
            reason: Some("the second run failed: x".into()),
            ..same
        };
        assert_eq!(lost.summary(), "not compared: the second run failed: x");
        // A lease of a run carries its terms.
        let terms = jobfile::rebuild::Terms {
            sibling: "a.0000000000000001.x_i0.tar.xz".into(),
            name: "x".into(),
            epoch: 5,
            apart_until: 0,
        };
        let lease: Lease = serde_json::from_value(json!({"id": "j1", "file_name": "x_i0.tar.xz", "size": 1, "seq": 1,
            "attempt": 1, "lease_ms": 1, "rebuild": {"sibling": "a.0000000000000001.x_i0.tar.xz", "name": "x", "epoch": 5,
            "apart_until": 0}}))
        .expect("lease");
        assert_eq!(lease.rebuild, Some(terms));
        let query: SubmitQuery =
            serde_json::from_value(json!({"name": "x", "image": "0", "verify_on": 2})).expect("query");
        assert_eq!(query.verify_on, Some(2));
    }

    #[test]
    fn submitter_types_round_trip_as_documented() {
        round_trip(ErrorBody::new("no such job"), json!({"error": "no such job"}));
        round_trip(
            ErrorBody {
                error: "too big".into(),
                limit: Some("max_job_bytes".into()),
                allowed: Some(10),
                requested: Some(12),
                over_by: Some(2),
            },
            json!({"error": "too big", "limit": "max_job_bytes", "allowed": 10, "requested": 12, "over_by": 2}),
        );
        round_trip(
            Whoami { account: "alice".into(), limits: Limits { max_waiting: Some(3), ..Limits::default() } },
            json!({"account": "alice", "limits": {"max_job_bytes": null, "max_waiting": 3, "max_stored_bytes": null,
                "max_per_hour": null, "retention_days": null}}),
        );
        let waiting = job(Place::Waiting { position: 1, waiting: 2 });
        round_trip(
            waiting.clone(),
            json!({"id": "j1", "name": "hello", "image": "0", "size": 65536, "submitted": "2026-12-03T10:00:00Z",
                "state": "waiting", "place": {"state": "waiting", "position": 1, "waiting": 2}, "deleted": null,
                "attempts": 1}),
        );
        let mut done = job(Place::Done { verdict: "ok".into(), result_bytes: 300 });
        done.status =
            Some(jobfile::JobStatus { result: jobfile::Outcome::Ok, exit_code: Some(0), ..Default::default() });
        let written = serde_json::to_value(&done).expect("serialize");
        assert_eq!(written["place"], json!({"state": "done", "verdict": "ok", "result_bytes": 300}));
        assert_eq!(written["status"]["result"], "ok");
        assert_eq!(serde_json::from_value::<Job>(written).expect("deserialize"), done);
        // Served from the result cache: whose result it is.
        done.from_cache = Some(result_cache::CacheHit {
            key: "k".repeat(64),
            job: "j0".into(),
            made: "2026-12-03T09:00:00Z".into(),
            host: "h1".into(),
            built_by: None,
            reproduced_on: Vec::new(),
        });
        let written = serde_json::to_value(&done).expect("serialize");
        assert_eq!(
            written["from_cache"],
            json!({"key": "k".repeat(64), "job": "j0", "made": "2026-12-03T09:00:00Z", "host": "h1"})
        );
        assert_eq!(serde_json::from_value::<Job>(written).expect("deserialize"), done);
        assert_eq!(
            done.from_cache.as_ref().map(result_cache::CacheHit::describe).as_deref(),
            Some("from cache: the result of job j0 of 2026-12-03T09:00:00Z on h1")
        );
        // The packages pinned at submit, as the job's view shows them.
        let mut pinned = job(Place::Waiting { position: 1, waiting: 1 });
        pinned.packages = Some(jobfile::deps::Resolution {
            install: vec![jobfile::deps::Pinned {
                name: "pkgconf".into(),
                version: "1.8.1-1".into(),
                architecture: "amd64".into(),
                sha256: "b".repeat(64),
                size: 25892,
                filename: "pool/main/p/pkgconf/pkgconf_1.8.1-1_amd64.deb".into(),
            }],
            remove: vec![],
        });
        let written = serde_json::to_value(&pinned).expect("serialize");
        assert_eq!(
            written["packages"],
            json!({"install": [{"name": "pkgconf", "version": "1.8.1-1", "architecture": "amd64",
                "sha256": "b".repeat(64), "size": 25892, "filename": "pool/main/p/pkgconf/pkgconf_1.8.1-1_amd64.deb"}]})
        );
        assert_eq!(serde_json::from_value::<Job>(written).expect("deserialize"), pinned);
        let mut cancelled = job(Place::Running { host: "h1".into(), elapsed_secs: 4 });
        cancelled.cancel = Some("requested".into());
        let written = serde_json::to_value(&cancelled).expect("serialize");
        assert_eq!(written["cancel"], "requested");
        assert_eq!(written["place"], json!({"state": "running", "host": "h1", "elapsed_secs": 4}));
        round_trip(
            JobList { jobs: vec![waiting] },
            serde_json::to_value(JobList { jobs: vec![job(Place::Waiting { position: 1, waiting: 2 })] })
                .expect("serialize"),
        );
        round_trip(
            PageLink { path: "/page/login/x".into(), expires_in_secs: 600 },
            json!({"path": "/page/login/x", "expires_in_secs": 600}),
        );
        for (place, expected) in [
            (Place::Failed { reason: "timed out".into() }, json!({"state": "failed", "reason": "timed out"})),
            (Place::Missing, json!({"state": "missing"})),
        ] {
            round_trip(place, expected);
        }
        let host = HostView {
            name: "h1".into(),
            last_seen: "2026-12-03T10:00:00Z".into(),
            seen_secs_ago: 2,
            images: vec![
                HostImage { name: "0".into(), checksum: "a".repeat(64), arch: Arch::Amd64 },
                HostImage { name: "7".into(), checksum: "e".repeat(64), arch: Arch::Arm64 },
            ],
            capacity: 2,
            running: 1,
            your_jobs: vec![JobRef { id: "j1".into(), name: "hello".into() }],
            your_caches: vec!["ccache (i0)".into()],
            version: "0.1.0".into(),
            disabled: false,
            key: Some("ed25519:AAAA".into()),
        };
        assert_eq!(host.image_names(), "i0 i7");
        assert_eq!(host.archs(), "amd64 arm64");
        round_trip(
            HostList { hosts: vec![host] },
            json!({"hosts": [{"name": "h1", "last_seen": "2026-12-03T10:00:00Z", "seen_secs_ago": 2,
                "images": [{"name": "0", "checksum": "a".repeat(64), "arch": "amd64"},
                           {"name": "7", "checksum": "e".repeat(64), "arch": "arm64"}], "capacity": 2, "running": 1,
                "your_jobs": [{"id": "j1", "name": "hello"}], "your_caches": ["ccache (i0)"], "version": "0.1.0",
                "disabled": false, "key": "ed25519:AAAA"}]}),
        );
    }

    #[test]
    fn host_types_round_trip_as_documented() {
        round_trip(
            LeaseRequest {
                images: vec![HostImage { name: "1".into(), checksum: "b".repeat(64), arch: Arch::Arm64 }],
                capacity: 2,
                running: 0,
                version: "0.1.0".into(),
                caches: vec![],
                key: None,
            },
            json!({"images": [{"name": "1", "checksum": "b".repeat(64), "arch": "arm64"}], "capacity": 2, "running": 0,
                "version": "0.1.0"}),
        );
        // A host from before architectures were named lists amd64 images.
        let old: HostImage = serde_json::from_value(json!({"name": "1", "checksum": "b".repeat(64)})).expect("old");
        assert_eq!(old.arch, Arch::Amd64);
        // With the caches it holds.
        let held = HeldCache {
            owner: "a3".into(),
            image: "100".into(),
            name: "ccache".into(),
            generation: 1,
            version: 4,
            bytes: 4096,
            used: "2026-12-03T10:00:00Z".into(),
        };
        round_trip(
            LeaseRequest {
                images: vec![],
                capacity: 1,
                running: 0,
                version: "0.1.0".into(),
                caches: vec![held],
                key: Some("ed25519:AAAA".into()),
            },
            json!({"images": [], "capacity": 1, "running": 0, "version": "0.1.0", "caches": [{"owner": "a3",
                "image": "100", "name": "ccache", "generation": 1, "version": 4, "bytes": 4096,
                "used": "2026-12-03T10:00:00Z"}], "key": "ed25519:AAAA"}),
        );
        // A host from before versions were sent is still understood.
        let old: LeaseRequest =
            serde_json::from_value(json!({"images": [], "capacity": 1, "running": 0})).expect("old");
        assert_eq!(old.version, "");
        round_trip(LeaseAnswer { lease: None, generations: Default::default() }, json!({"lease": null}));
        let mut generations = jobfile::caches::Generations::new();
        generations.entry("a3".into()).or_default().insert("ccache".into(), 2);
        round_trip(
            LeaseAnswer { lease: None, generations },
            json!({"lease": null, "generations": {"a3": {"ccache": 2}}}),
        );
        round_trip(
            LeaseAnswer {
                lease: Some(Lease {
                    id: "j1".into(),
                    file_name: "hello_i0.tar.xz".into(),
                    size: 65536,
                    seq: 7,
                    attempt: 1,
                    lease_ms: 30000,
                    packages: None,
                    owner: None,
                    rebuild: None,
                    debug: false,
                    env: None,
                }),
                generations: Default::default(),
            },
            json!({"lease": {"id": "j1", "file_name": "hello_i0.tar.xz", "size": 65536, "seq": 7, "attempt": 1,
                "lease_ms": 30000}}),
        );
        // With the packages the server pinned.
        let pinned = jobfile::deps::Resolution {
            install: vec![jobfile::deps::Pinned {
                name: "pkgconf".into(),
                version: "1.8.1-1".into(),
                architecture: "amd64".into(),
                sha256: "a".repeat(64),
                size: 30000,
                filename: "pool/main/p/pkgconf/pkgconf_1.8.1-1_amd64.deb".into(),
            }],
            remove: vec![],
        };
        round_trip(
            LeaseAnswer {
                lease: Some(Lease {
                    id: "j2".into(),
                    file_name: "ssl_i100.tar.xz".into(),
                    size: 65536,
                    seq: 1,
                    attempt: 1,
                    lease_ms: 30000,
                    packages: Some(pinned),
                    owner: Some("a3".into()),
                    rebuild: None,
                    debug: false,
                    env: None,
                }),
                generations: Default::default(),
            },
            json!({"lease": {"id": "j2", "file_name": "ssl_i100.tar.xz", "size": 65536, "seq": 1, "attempt": 1,
                "lease_ms": 30000, "owner": "a3", "packages": {"install": [{"name": "pkgconf", "version": "1.8.1-1",
                "architecture": "amd64", "sha256": "a".repeat(64), "size": 30000,
                "filename": "pool/main/p/pkgconf/pkgconf_1.8.1-1_amd64.deb"}]}}}),
        );
        round_trip(Renewed { lease_ms: 30000, cancel: true }, json!({"lease_ms": 30000, "cancel": true}));
        round_trip(
            Delivered { delivered: true, verdict: Some("ok".into()), reason: None },
            json!({"delivered": true, "verdict": "ok"}),
        );
        round_trip(
            Delivered { delivered: true, verdict: None, reason: Some("timed out".into()) },
            json!({"delivered": true, "reason": "timed out"}),
        );
        round_trip(Released { released: true }, json!({"released": true}));
        round_trip(
            ImageList {
                images: vec![OfferedImage {
                    name: "0".into(),
                    checksum: "c".repeat(64),
                    arch: Arch::Arm64,
                    files: vec![OfferedFile { name: "manifest.json".into(), size: 10, sha256: "d".repeat(64) }],
                }],
            },
            json!({"images": [{"name": "0", "checksum": "c".repeat(64), "arch": "arm64",
                "files": [{"name": "manifest.json", "size": 10, "sha256": "d".repeat(64)}]}]}),
        );
        let q: SeqQuery = serde_json::from_value(json!({"seq": 3})).expect("seq only");
        assert_eq!(q, SeqQuery { seq: 3, offset: 0, log_bytes: 0, provenance_bytes: 0 });
    }

    #[test]
    fn what_a_host_says_of_itself_is_checked() {
        let good = HostImage { name: "12".into(), checksum: "0".repeat(64), arch: Arch::Amd64 };
        assert_eq!(good.check(), Ok(()));
        let named = |name: &str| HostImage { name: name.into(), ..good.clone() };
        assert!(named("").check().is_err());
        assert!(named("1234567890").check().is_err());
        assert_eq!(named("x\u{1b}").check(), Err("\"x\\\\x1b\" is not an image number".to_owned()));
        let upper = HostImage { checksum: "A".repeat(64), ..good.clone() };
        assert_eq!(upper.check(), Err("image i12: the checksum is not a sha256 in lowercase hex".to_owned()));
        let many = LeaseRequest {
            images: vec![good.clone(); MAX_HOST_IMAGES + 1],
            capacity: 1,
            running: 0,
            version: String::new(),
            caches: vec![],
            key: None,
        };
        assert!(many.check().expect_err("too many").contains("at most 64"));
        let version = LeaseRequest {
            images: vec![good.clone()],
            capacity: 1,
            running: 0,
            version: "1 0".into(),
            caches: vec![],
            key: None,
        };
        assert!(version.check().is_err());
        // Each held cache: an owner, an image number, a cache name, a short time.
        let held = HeldCache {
            owner: "a3".into(),
            image: "100".into(),
            name: "ccache".into(),
            generation: 0,
            version: 1,
            bytes: 0,
            used: "2026-12-03T10:00:00Z".into(),
        };
        let with = |c: HeldCache| LeaseRequest {
            images: vec![good.clone()],
            capacity: 1,
            running: 0,
            version: String::new(),
            caches: vec![c],
            key: None,
        };
        assert_eq!(with(held.clone()).check(), Ok(()));
        for (bad, why) in [
            (HeldCache { owner: "../etc".into(), ..held.clone() }, "is not a cache owner"),
            (HeldCache { name: "A b".into(), ..held.clone() }, "is not a cache name"),
            (HeldCache { image: "x".into(), ..held.clone() }, "not an image number"),
            (HeldCache { used: "\u{1b}[2J".into(), ..held.clone() }, "printable"),
        ] {
            assert!(with(bad.clone()).check().expect_err("refused").contains(why), "{bad:?}");
        }
        let flood = LeaseRequest { caches: vec![held.clone(); MAX_HELD_CACHES + 1], ..with(held.clone()) };
        assert!(flood.check().expect_err("too many").contains("at most 1024"));
        let bad_key = LeaseRequest { key: Some("rsa:AAAA".into()), ..with(held.clone()) };
        assert!(bad_key.check().expect_err("not ed25519").contains("not ed25519"));
    }
}
