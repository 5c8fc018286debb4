//! Account tokens: `cst1.<account id>.<64 hex digits>`, shown once when
//! made; the server keeps only their SHA-256. A request's token is found by
//! its account id and compared by hash in constant time.

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
    }
}
