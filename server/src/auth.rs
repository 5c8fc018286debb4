//! Account tokens: `cst1.<account id>.<64 hex digits>`, shown once when
//! made; the server keeps only their SHA-256. A request's token is found by
//! its account id and compared by hash in constant time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "cst1";

/// A new random secret (32 bytes from the kernel's generator), in hex.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the kernel's random generator works");
    hex(&bytes)
}

/// A random id for a job: 16 hex digits.
pub fn new_job_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the kernel's random generator works");
    hex(&bytes)
}

/// Whether `id` has the shape of a job id (16 lowercase hex digits).
pub fn is_job_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token an account's holder uses, for a secret.
pub fn token(account_id: i64, secret: &str) -> String {
    format!("{PREFIX}.{account_id}.{secret}")
}

/// What the server stores of a token.
pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The account id a token names, if it has the token's shape.
pub fn account_of(token: &str) -> Option<i64> {
    let mut parts = token.split('.');
    let (prefix, id, secret) = (parts.next()?, parts.next()?, parts.next()?);
    let shaped = prefix == PREFIX
        && parts.next().is_none()
        && secret.len() == 64
        && secret.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    shaped.then(|| id.parse().ok()).flatten()
}

/// Whether `token` is the one whose hash is `stored`, in time that does not depend on where they differ.
pub fn matches(token: &str, stored: &[u8]) -> bool {
    let got = hash(token);
    got.len() == stored.len() && bool::from(got.ct_eq(stored))
}

/// Failed authentications, counted per client: an IPv4 address, or an
/// IPv6 /64 (one machine has a whole /64 to pick addresses from). Only
/// failures are counted and only failures are slowed down: a token that
/// verifies is never refused for what others sent, so no client (behind a
/// proxy or not) can lock another out. The table is bounded: past
/// `MAX_CLIENTS` the oldest windows are dropped, and clients beyond that
/// share one count.
pub struct Failures {
    seen: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    window: Duration,
    limit: u32,
}

/// Clients whose failures are tracked one by one.
const MAX_CLIENTS: usize = 16_384;

/// What one more failure from a client means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first in its window: worth a log line.
    First,
    /// More, within the limit.
    Again(u32),
    /// Past the limit in this window: answered 429, and not logged one by one.
    TooMany(u32),
}

impl Failures {
    pub fn new(limit: u32, window: Duration) -> Failures {
        Failures { seen: Mutex::new(HashMap::new()), window, limit }
    }

    fn client(peer: IpAddr) -> IpAddr {
        match peer {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
                }
            },
            v4 => v4,
        }
    }

    /// Counts a failure from `peer`, at `now`.
    pub fn record(&self, peer: IpAddr, now: Instant) -> Failure {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = Failures::client(peer);
        if !seen.contains_key(&key) && seen.len() >= MAX_CLIENTS {
            seen.retain(|_, (_, since)| now.duration_since(*since) < self.window);
            if seen.len() >= MAX_CLIENTS {
                key = IpAddr::from([0u8, 0, 0, 0]);
            }
        }
        let entry = seen.entry(key).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
        match entry.0 {
            1 => Failure::First,
            n if n > self.limit => Failure::TooMany(n),
            n => Failure::Again(n),
        }
    }

    /// Clients tracked now (for tests).
    pub fn tracked(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_account_and_matches_only_its_own_hash() {
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, new_secret());
        let t = token(42, &secret);
        assert_eq!(account_of(&t), Some(42));
        assert!(matches(&t, &hash(&t)));
        assert!(!matches(&token(42, &new_secret()), &hash(&t)));
        assert!(!matches(&t, b""), "a removed account's empty hash matches nothing");
        for bad in [
            "",
            "cst1.42",
            "cst1.x.abc",
            &format!("cst2.42.{secret}"),
            &format!("cst1.42.{secret}.x"),
            &format!("cst1.42.{}", secret.to_uppercase()),
        ] {
            assert_eq!(account_of(bad), None, "{bad}");
        }
        assert_eq!(new_job_id().len(), 16);
        assert!(is_job_id(&new_job_id()));
        for bad in
            ["", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdefa", "../../../etc/pa", "0123456789abcdeg"]
        {
            assert!(!is_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn failures_are_counted_per_client_and_window_and_the_table_stays_bounded() {
        let f = Failures::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let got: Vec<Failure> = (0..5).map(|_| f.record(a, t0)).collect();
        assert_eq!(
            got,
            [Failure::First, Failure::Again(2), Failure::Again(3), Failure::TooMany(4), Failure::TooMany(5)]
        );
        assert_eq!(f.record("192.0.2.2".parse().expect("ip"), t0), Failure::First, "another client");
        assert_eq!(f.record(a, t0 + Duration::from_secs(61)), Failure::First, "a new window");
        // One /64 is one client; a v4-mapped address is its v4 address.
        let v6 = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert_eq!(f.record(v6("2001:db8::1"), t0), Failure::First);
        assert_eq!(f.record(v6("2001:db8::ffff:1:2"), t0), Failure::Again(2));
        assert_eq!(f.record(v6("::ffff:192.0.2.2"), t0), Failure::Again(2));
        // A flood of addresses fills the table to its bound and no further.
        for i in 0..(MAX_CLIENTS as u32 + 100) {
            f.record(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(f.tracked() <= MAX_CLIENTS + 1, "{}", f.tracked());
    }
}
