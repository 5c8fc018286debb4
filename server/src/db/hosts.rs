//! The `hosts` table and `host_caches`: the remote build hosts as they last
//! said (images, capacity, the caches they hold), and the key pinned for each.

use serde::Serialize;

use super::audit::audit_in;
use super::{account_by_name, now, unix_now, Account, DbError};
use crate::params;
use crate::sql::{Database, SqlError};

/// A remote host as it last said: its images, how many VMs it runs at once.
#[derive(Debug, Clone, Serialize)]
pub struct HostRecord {
    pub name: String,
    pub last_seen: String,
    #[serde(skip)]
    pub last_seen_unix: i64,
    pub images: serde_json::Value,
    pub capacity: u64,
    pub version: String,
    pub disabled: bool,
    /// The build caches it last said it holds.
    pub caches: Vec<wire::HeldCache>,
    /// The public key pinned for it (the first it signed with).
    pub key: Option<String>,
}

impl HostRecord {
    /// Seconds since it was last heard from.
    pub fn seen_secs_ago(&self) -> i64 {
        unix_now() - self.last_seen_unix
    }
}

/// Records that host `account_id` called, with what it has (`caches`: its held caches as JSON).
/// A call in the same second saying the same changes nothing, and writes nothing.
pub async fn host_seen(
    db: &Database,
    account_id: i64,
    images: &str,
    capacity: u64,
    version: &str,
    caches: &str,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO hosts (account_id, last_seen, last_seen_unix, images, capacity, version, caches) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (account_id) DO UPDATE SET last_seen = excluded.last_seen, last_seen_unix = excluded.last_seen_unix,
         images = excluded.images, capacity = excluded.capacity, version = excluded.version, caches = excluded.caches
         WHERE hosts.last_seen_unix IS DISTINCT FROM excluded.last_seen_unix OR hosts.images IS DISTINCT FROM excluded.images
            OR hosts.capacity IS DISTINCT FROM excluded.capacity OR hosts.version IS DISTINCT FROM excluded.version
            OR hosts.caches IS DISTINCT FROM excluded.caches",
        params![account_id, now(), unix_now(), images, capacity, version, caches],
    ).await?;
    Ok(())
}

/// Records that host `host_id` was given a job with these build caches
/// (`owner`'s, on `image`): the caches it may say it holds.
pub async fn caches_given(
    db: &Database,
    host_id: i64,
    owner: &str,
    image: &str,
    names: &[String],
) -> Result<(), DbError> {
    for name in names {
        db.execute(
            "INSERT INTO host_caches (host_id, owner, image, name) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            params![host_id, owner, image, name.as_str()],
        )
        .await?;
    }
    Ok(())
}

/// The build caches host `host_id` was given jobs for: (owner, image, name).
pub async fn given_caches(
    db: &Database,
    host_id: i64,
) -> Result<std::collections::HashSet<(String, String, String)>, DbError> {
    let rows = db.query("SELECT owner, image, name FROM host_caches WHERE host_id = $1", params![host_id]).await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.text("owner")?, r.text("image")?, r.text("name")?)))
        .collect::<Result<_, SqlError>>()?)
}

/// Pins `key` for host `account_id` when it has none yet; returns the key
/// pinned now (this one, or the one it had).
pub async fn pin_key(db: &Database, account: &Account, key: &str) -> Result<String, DbError> {
    // Pinned already (every call but a host's first): a read, no transaction.
    if let Some(pinned) = host_key(db, account.id).await? {
        return Ok(pinned);
    }
    db.tx(async |tx| {
        let pinned = tx
            .execute("UPDATE hosts SET key = $1 WHERE account_id = $2 AND key IS NULL", params![key, account.id])
            .await?;
        if pinned == 1 {
            audit_in(tx, Some(&account.name), "host_key_pinned", key).await?;
        }
        let row = tx.query_opt("SELECT key FROM hosts WHERE account_id = $1", params![account.id]).await?;
        Ok(row.map(|r| r.opt_text("key")).transpose()?.flatten().unwrap_or_default())
    })
    .await
}

/// The key pinned for host `account_id`.
pub async fn host_key(db: &Database, account_id: i64) -> Result<Option<String>, DbError> {
    let row = db.query_opt("SELECT key FROM hosts WHERE account_id = $1", params![account_id]).await?;
    Ok(row.map(|r| r.opt_text("key")).transpose()?.flatten())
}

/// Forgets the key pinned for host `name`: the next key it sends is pinned.
pub async fn unpin_key(db: &Database, name: &str) -> Result<(), DbError> {
    let account = account_by_name(db, name).await?.ok_or_else(|| DbError::NoAccount(name.to_owned()))?;
    db.tx(async |tx| {
        tx.execute("UPDATE hosts SET key = NULL WHERE account_id = $1", params![account.id]).await?;
        audit_in(tx, Some(name), "host_key_unpinned", "").await
    })
    .await
}

/// Records that host `account_id` was heard from (a renewal), keeping what it said last;
/// nothing is written when it was heard from in this second already.
pub async fn host_touch(db: &Database, account_id: i64) -> Result<(), DbError> {
    db.execute(
        "UPDATE hosts SET last_seen = $1, last_seen_unix = $2 WHERE account_id = $3 AND last_seen_unix IS DISTINCT FROM $2",
        params![now(), unix_now(), account_id],
    )
    .await?;
    Ok(())
}

pub async fn hosts(db: &Database) -> Result<Vec<HostRecord>, DbError> {
    let rows = db
        .query(
            "SELECT a.name, h.last_seen, h.last_seen_unix, h.images, h.capacity, h.version, a.disabled, h.caches, h.key
         FROM hosts h JOIN accounts a ON a.id = h.account_id ORDER BY a.name",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(HostRecord {
                name: r.text("name")?,
                last_seen: r.text("last_seen")?,
                last_seen_unix: r.int("last_seen_unix")?,
                images: serde_json::from_str(&r.text("images")?).unwrap_or(serde_json::Value::Null),
                capacity: r.count("capacity")?,
                version: r.text("version")?,
                disabled: r.flag("disabled")?,
                caches: r.opt_json("caches").ok().flatten().unwrap_or_default(),
                key: r.opt_text("key")?,
            })
        })
        .collect::<Result<_, SqlError>>()?)
}
