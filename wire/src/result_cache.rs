//! The result cache as submitters see it: a job served from it (`CacheHit`,
//! on `Job::from_cache`), and their entries (`GET /v1/result-cache`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A job that was not run: the server served the result of an earlier job
/// with the same key, and its original provenance, with a record of the hit
/// signed by the server (`GET /v1/jobs/{id}/cache-hit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CacheHit {
    /// The entry's key (sha256, hex): everything that can change the result.
    pub key: String,
    /// The job whose run made the result.
    pub job: String,
    /// When that job was submitted (RFC 3339, UTC).
    pub made: String,
    /// The host that ran it and signed its result.
    pub host: String,
    /// That host as `GET /v1/hosts/keys` names it, when the server recorded
    /// it (as `Job::built_by`: none for a local host's run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_by: Option<String>,
    /// A verified rebuild found it reproducible on these two hosts (an entry
    /// any account may be served); empty for the account's own entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reproduced_on: Vec<String>,
}

impl CacheHit {
    /// One line for a person: `from cache: job X of <time> on <host>`.
    pub fn describe(&self) -> String {
        let on = if self.reproduced_on.is_empty() {
            self.host.clone()
        } else {
            format!("{} (reproduced on {})", self.host, self.reproduced_on.join(" and "))
        };
        format!("from cache: the result of job {} of {} on {on}", self.job, self.made)
    }
}

/// One entry of the account's result cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResultCacheEntry {
    pub key: String,
    /// The job's name and image.
    pub name: String,
    pub image: String,
    /// The job whose result it is, and when it was submitted.
    pub job: String,
    pub made: String,
    /// The host that signed it.
    pub host: String,
    /// Bytes it takes on the server (counted against the account's stored bytes).
    pub bytes: u64,
    /// Reproduced on two hosts by a verified rebuild: any account may be served it.
    pub shared: bool,
    /// When it was last stored or served (RFC 3339, UTC); the least recently
    /// used go first when the cache is over its size.
    pub used: String,
}

/// `GET /v1/result-cache`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResultCacheList {
    pub entries: Vec<ResultCacheEntry>,
}

/// `DELETE /v1/result-cache[/{key}]`: how many entries went, and their bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Forgotten {
    pub entries: u64,
    pub bytes: u64,
}
