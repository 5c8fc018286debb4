//! The page's login links and sessions. A browser cannot send a bearer
//! token, so `POST /v1/page-link` (with the token) issues a link that works
//! once, within five minutes; the page's confirmation trades it for a
//! session. Both are bound to the token they were made with: a new token
//! (`account token`), a disabled or removed account ends them all. Both
//! tables are bounded, per account and in all.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth;
use crate::db::{self, Account};
use crate::sql::Database;

/// How long a login link works, and a session lasts.
pub const LINK_LIFE: Duration = Duration::from_secs(300);

pub const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);

pub const COOKIE: &str = "construir_session";

/// Live links and sessions one account may hold (the oldest go first).
const PER_ACCOUNT: usize = 8;

/// Live links, and sessions, in all.
const IN_ALL: usize = 10_000;

/// A login link or a session: whose, made with which token, until when.
#[derive(Debug, Clone)]
pub struct Grant {
    account: i64,
    token_hash: Vec<u8>,
    until: Instant,
}

/// Login links not yet used, and live sessions, by their secret.
#[derive(Default)]
pub struct Sessions {
    pub(crate) links: Mutex<HashMap<String, Grant>>,
    pub(crate) sessions: Mutex<HashMap<String, Grant>>,
}

impl Sessions {
    /// A new secret for `account`, or `None` when the table is full of live entries.
    pub fn issue(map: &Mutex<HashMap<String, Grant>>, account: &Account, life: Duration) -> Option<String> {
        let now = Instant::now();
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, g| g.until > now);
        let mut mine: Vec<(Instant, String)> =
            m.iter().filter(|(_, g)| g.account == account.id).map(|(k, g)| (g.until, k.clone())).collect();
        mine.sort();
        while mine.len() >= PER_ACCOUNT {
            let (_, oldest) = mine.remove(0);
            m.remove(&oldest);
        }
        if m.len() >= IN_ALL {
            return None;
        }
        let secret = auth::new_secret();
        m.insert(
            secret.clone(),
            Grant { account: account.id, token_hash: account.token_hash.clone(), until: now + life },
        );
        Some(secret)
    }

    pub fn live(map: &Mutex<HashMap<String, Grant>>, secret: &str) -> Option<Grant> {
        let m = map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(secret).filter(|g| g.until > Instant::now()).cloned()
    }

    /// Uses up a login link.
    pub fn redeem(&self, secret: &str) -> Option<Grant> {
        let mut m = self.links.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(secret).filter(|g| g.until > Instant::now())
    }

    /// Entries held now: (links, sessions).
    pub fn held(&self) -> (usize, usize) {
        let n = |m: &Mutex<HashMap<String, Grant>>| m.lock().unwrap_or_else(|p| p.into_inner()).len();
        (n(&self.links), n(&self.sessions))
    }
}

/// The account a grant was made for, while the account is enabled and its
/// token is still the one the grant was made with.
pub async fn still_valid(db: &Database, grant: &Grant) -> Result<Option<Account>, db::DbError> {
    let Some(account) = db::account_by_id(db, grant.account).await? else { return Ok(None) };
    let same = bool::from(subtle::ConstantTimeEq::ct_eq(&account.token_hash[..], &grant.token_hash[..]));
    Ok((!account.disabled && account.removed.is_none() && same).then_some(account))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn account(id: i64, hash: &[u8]) -> Account {
        Account {
            id,
            name: format!("a{id}"),
            token_hash: hash.to_vec(),
            disabled: false,
            created: String::new(),
            limits: Default::default(),
            kind: crate::db::Kind::Submitter,
            removed: None,
        }
    }

    #[test]
    fn a_link_works_once_sessions_expire_and_each_account_holds_a_bounded_few() {
        let s = Sessions::default();
        let a = account(7, b"h");
        let link = Sessions::issue(&s.links, &a, LINK_LIFE).expect("room");
        assert_eq!(s.redeem(&link).map(|g| g.account), Some(7));
        assert!(s.redeem(&link).is_none(), "used up");
        let session = Sessions::issue(&s.sessions, &a, Duration::ZERO).expect("room");
        assert!(Sessions::live(&s.sessions, &session).is_none(), "expired");
        let session = Sessions::issue(&s.sessions, &a, SESSION_LIFE).expect("room");
        assert_eq!(Sessions::live(&s.sessions, &session).map(|g| g.token_hash), Some(b"h".to_vec()));
        for _ in 0..100 {
            Sessions::issue(&s.links, &a, LINK_LIFE).expect("room");
        }
        assert_eq!(s.held().0, PER_ACCOUNT, "the oldest links go first");
    }
}
