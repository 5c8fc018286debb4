//! When each build host was last written down as heard from, in this
//! process: a host that calls several times a second (a lease, then its
//! renewals) has its `last_seen` written once in that second, not on every
//! call. `last_seen` is kept to the second, so nothing anyone reads
//! changes; a call that says something new about the host (its images,
//! capacity, version or caches) is always written.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// Host account id -> (the second it was last written, a digest of what it said then).
#[derive(Debug, Default)]
pub struct Heard(Mutex<HashMap<i64, (i64, u64)>>);

/// A digest of what a host says of itself in a lease request.
pub fn digest(said: &impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    said.hash(&mut h);
    h.finish()
}

impl Heard {
    /// Whether a lease request from `host` at second `now`, saying what
    /// `said` digests, needs writing: the host was not written this second,
    /// or it says something other than it said then.
    pub fn seen_is_news(&self, host: i64, now: i64, said: u64) -> bool {
        self.map().get(&host) != Some(&(now, said))
    }

    /// Whether a renewal from `host` at second `now` needs writing: the host was not written this second.
    pub fn touch_is_news(&self, host: i64, now: i64) -> bool {
        self.map().get(&host).is_none_or(|(second, _)| *second != now)
    }

    /// `host` was written at second `now`, saying `said` (`None`: a renewal, which says nothing new).
    pub fn written(&self, host: i64, now: i64, said: Option<u64>) {
        let mut map = self.map();
        let said = said.or_else(|| map.get(&host).map(|(_, s)| *s)).unwrap_or(0);
        map.insert(host, (now, said));
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (i64, u64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_written_once_a_second_unless_it_says_something_new() {
        let heard = Heard::default();
        let said = digest(&("[i0]", 2u64, "0.1.0", "[]"));
        assert!(heard.seen_is_news(7, 100, said));
        heard.written(7, 100, Some(said));
        // The same second, the same words: nothing to write, for a lease or a renewal.
        assert!(!heard.seen_is_news(7, 100, said));
        assert!(!heard.touch_is_news(7, 100));
        // Something new in the same second is written.
        let more = digest(&("[i0, i1]", 2u64, "0.1.0", "[]"));
        assert!(heard.seen_is_news(7, 100, more));
        // The next second is written, and a renewal keeps what the host said last.
        assert!(heard.touch_is_news(7, 101));
        heard.written(7, 101, None);
        assert!(!heard.seen_is_news(7, 101, said));
        assert!(heard.seen_is_news(7, 101, more));
        // Another host is its own.
        assert!(heard.touch_is_news(8, 101));
    }
}
