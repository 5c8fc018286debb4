//! How the server keeps results: the salt, sharing, the size, where entries
//! live and the key that signs hits (`serve`'s options).

use std::path::{Path, PathBuf};

use construir_provenance::HostKey;

use super::entry::Entries;

/// How the server keeps results.
pub struct Settings {
    /// A digest of `--cache-salt` (`key::salt_digest`).
    pub salt: String,
    /// Whether entries reproduced on two hosts are served to every account.
    pub share_reproducible: bool,
    /// Most bytes all entries may take before the least recently used go.
    pub max_bytes: u64,
    pub entries: Entries,
    /// What the server signs each hit's record with.
    pub key: std::sync::Arc<HostKey>,
}

/// Where the key that signs hits is kept [default: beside the queue].
pub fn default_key_path(queue: &Path) -> PathBuf {
    jobfile::layout::sibling(queue, "server-keys").join("result-cache.key")
}

/// Where entries are kept: `result-cache/` beside the queue.
pub fn default_root(queue: &Path) -> PathBuf {
    jobfile::layout::sibling(queue, "result-cache")
}
