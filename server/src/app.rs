//! The state every request handler reaches: the database, the queue's
//! directories, the server's settings, the failed authentications, the
//! page's sessions, and how leases are handed out. It also brings a job's
//! record up to what the directories say (`refresh`).

use std::sync::Arc;
use std::time::Duration;

use crate::auth;
use crate::db::{self, JobRecord, Limits};
use crate::quota::UploadRules;
use crate::sql::Database;
use crate::store::{Place, Queued, Store};

/// How the server treats uploads and the clients that send them.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Limits for accounts that set none of their own.
    pub defaults: Limits,
    /// How long an upload may go without sending a byte.
    pub idle_timeout: Duration,
    /// How long a whole upload may take, however steadily it trickles.
    pub upload_timeout: Duration,
    /// Uploads under way per account, and the disk's reserve.
    pub uploads: UploadRules,
    /// Whether clients reach the server over TLS (the page's cookie is then `Secure`).
    pub tls: bool,
    /// Whether jobs may ask for debug sessions.
    pub debug: DebugPolicy,
}

/// Why the server takes no debug jobs, if it takes none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DebugPolicy {
    #[default]
    Allowed,
    /// `serve --no-debug`.
    Off,
    /// `serve --executor slurm`: a node's VM has no connection back to the server.
    Slurm,
}

impl DebugPolicy {
    /// Why a job that asks for a debug session is refused, if it is.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            DebugPolicy::Allowed => None,
            DebugPolicy::Off => Some("this server runs with --no-debug: it opens no debug sessions"),
            DebugPolicy::Slurm => Some(
                "this server runs its jobs under Slurm, where a failed job's VM has no connection back to the \
                 server to carry a debug session; submit without --debug (and without debug = true)",
            ),
        }
    }
}

/// Everything a request handler reaches.
pub struct App {
    pub db: Database,
    pub store: Store,
    pub settings: Settings,
    /// Failed authentications per client.
    pub(crate) failures: auth::Failures,
    /// The page's login links and sessions.
    pub sessions: crate::sessions::Sessions,
    /// How remote build hosts are handed jobs.
    pub farm: crate::lease::Settings,
    /// Resolves jobs' packages at submit (`None`: a job that declares any is refused).
    pub packages: Option<deps::Resolver>,
    /// When each build host was last written down as heard from.
    pub(crate) heard: crate::heard::Heard,
    /// The debug sessions remote hosts offer.
    pub(crate) debug: crate::offers::Offers,
    /// Results kept for jobs with the same inputs (`None`: the server keeps none).
    pub result_cache: Option<crate::result_cache::settings::Settings>,
}

/// Failed authentications a client may make in a minute before its failures are answered 429.
pub(crate) const MAX_FAILURES_PER_MINUTE: u32 = 10;

impl App {
    pub fn new(
        db: Database,
        store: Store,
        settings: Settings,
        farm: crate::lease::Settings,
        packages: Option<deps::Resolver>,
        result_cache: Option<crate::result_cache::settings::Settings>,
    ) -> Arc<App> {
        Arc::new(App {
            db,
            store,
            settings,
            failures: auth::Failures::new(MAX_FAILURES_PER_MINUTE, Duration::from_secs(60)),
            sessions: crate::sessions::Sessions::default(),
            farm,
            packages,
            heard: Default::default(),
            debug: Default::default(),
            result_cache,
        })
    }

    /// An app for tests: `db` and `store`, default limits and farm, no packages.
    #[cfg(test)]
    pub(crate) fn for_test(db: Database, store: Store) -> Arc<App> {
        App::for_test_with(db, store, None)
    }

    /// `for_test`, keeping results as `result_cache` says.
    #[cfg(test)]
    pub(crate) fn for_test_with(
        db: Database,
        store: Store,
        result_cache: Option<crate::result_cache::settings::Settings>,
    ) -> Arc<App> {
        let settings = Settings {
            defaults: Default::default(),
            idle_timeout: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(60),
            uploads: crate::quota::UploadRules { max_uploads: 1, min_free: 0 },
            tls: false,
            debug: Default::default(),
        };
        App::new(db, store, settings, crate::lease::Settings::default(), None, result_cache)
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Where a job is, as the directories say (only the server's own file counts).
    pub fn locate(&self, job: &JobRecord) -> Place {
        self.locate_among(job, &Queued::default())
    }

    /// `locate`, with the queue listed once for a pass over many jobs (`store::Queued`).
    pub fn locate_among(&self, job: &JobRecord, queued: &Queued) -> Place {
        let mut place = self.store.locate_among(&job.file_name, job.file_id, queued);
        if let (Place::Running { host, .. }, Some(lease_host)) = (&mut place, &job.host) {
            // A farm job's file waits in running/.farm; its host is the lease's.
            host.clone_from(lease_host);
        }
        place
    }

    /// Brings a job's record up to what the directories say; returns where it is.
    pub async fn refresh(&self, job: &JobRecord) -> Place {
        self.refresh_among(job, &Queued::default()).await
    }

    /// `refresh`, with the queue listed once for a pass over many jobs (`store::Queued`).
    pub async fn refresh_among(&self, job: &JobRecord, queued: &Queued) -> Place {
        let place = self.locate_among(job, queued);
        let (verdict, bytes) = match &place {
            Place::Done { verdict, result_bytes } => (Some(verdict.as_str()), Some(*result_bytes)),
            Place::Failed { reason } => (Some(reason.as_str()), None),
            _ => (None, None),
        };
        if place.is_final() {
            // A cancel that came too late has nothing left to stop.
            self.store.forget_cancel(&job.file_name);
        }
        // What the record read says already needs no write: the follow loop refreshes every job every
        // second, and nearly all are as they were. (A record read just before another request changed
        // it is put right by the next round, from a fresh read.)
        let unchanged =
            job.state == db::JobState::of(&place) && verdict.is_none_or(|v| job.verdict.as_deref() == Some(v));
        // A finished job whose files retention removed keeps its last state.
        let kept = place == Place::Missing && job.deleted.is_some();
        if !(unchanged || kept) {
            // One transaction reads, changes and audits: two requests never both log the same change.
            if let Err(e) = db::update_state(self.db(), &job.id, db::JobState::of(&place), verdict, bytes).await {
                log::error!("cannot record job {}: {}", job.id, jobfile::error_chain(&e));
            }
        }
        place
    }
}
