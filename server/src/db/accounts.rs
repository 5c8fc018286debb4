//! The `accounts` table: who may submit or take work, with the hash of
//! their token, their kind and limits; a removed account stays (its jobs
//! keep their records) with the time it was removed.

use serde::Serialize;

use super::audit::audit_in;
use super::{now, DbError, Limits};
use crate::params;
use crate::sql::{Database, Row, SqlError};

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Submits jobs and reads its own.
    Submitter,
    /// A build host: takes work, never submits or reads jobs.
    Host,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Submitter => "submitter",
            Kind::Host => "host",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub id: i64,
    pub name: String,
    #[serde(skip)]
    pub token_hash: Vec<u8>,
    pub disabled: bool,
    pub created: String,
    pub limits: Limits,
    pub kind: Kind,
    /// When it was removed (its jobs' records stay).
    pub removed: Option<String>,
}

fn check_account_name(name: &str) -> Result<(), DbError> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(DbError::BadAccountName(name.to_owned()))
    }
}

fn account_from_row(r: &Row) -> Result<Account, SqlError> {
    let limit = |column: &str| r.opt_int(column).map(|v| v.map(|v| v.max(0) as u64));
    Ok(Account {
        id: r.int("id")?,
        name: r.text("name")?,
        token_hash: r.bytes("token_hash")?,
        disabled: r.flag("disabled")?,
        created: r.text("created")?,
        limits: Limits {
            max_job_bytes: limit("max_job_bytes")?,
            max_waiting: limit("max_waiting")?,
            max_stored_bytes: limit("max_stored_bytes")?,
            max_per_hour: limit("max_per_hour")?,
            retention_days: limit("retention_days")?,
        },
        kind: if r.text("kind")? == "host" { Kind::Host } else { Kind::Submitter },
        removed: r.opt_text("removed")?,
    })
}

const ACCOUNT_COLUMNS: &str = "id, name, token_hash, disabled, created, max_job_bytes, max_waiting, max_stored_bytes, max_per_hour, retention_days, kind, removed";

pub async fn add_account(db: &Database, name: &str, kind: Kind, token_hash: &[u8]) -> Result<Account, DbError> {
    check_account_name(name)?;
    db.tx(async |tx| {
        if tx.query_opt("SELECT id FROM accounts WHERE name = $1 AND removed IS NULL", params![name]).await?.is_some() {
            return Err(DbError::AccountExists(name.to_owned()));
        }
        tx.execute(
            "INSERT INTO accounts (name, token_hash, created, kind) VALUES ($1, $2, $3, $4)",
            params![name, token_hash, now(), kind.name()],
        )
        .await?;
        audit_in(tx, Some(name), if kind == Kind::Host { "host_account_added" } else { "account_added" }, "").await
    })
    .await?;
    account_by_name(db, name).await?.ok_or_else(|| DbError::NoAccount(name.to_owned()))
}

pub async fn account_by_name(db: &Database, name: &str) -> Result<Option<Account>, DbError> {
    let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = $1 AND removed IS NULL");
    let row = db.query_opt(&sql, params![name]).await?;
    Ok(row.as_ref().map(account_from_row).transpose()?)
}

pub async fn account_by_id(db: &Database, id: i64) -> Result<Option<Account>, DbError> {
    let row = db.query_opt(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"), params![id]).await?;
    Ok(row.as_ref().map(account_from_row).transpose()?)
}

pub async fn accounts(db: &Database) -> Result<Vec<Account>, DbError> {
    let rows = db.query(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY name"), &[]).await?;
    Ok(rows.iter().map(account_from_row).collect::<Result<_, _>>()?)
}

async fn update_account(
    db: &Database,
    name: &str,
    sql: &str,
    params: &[crate::sql::Value],
    action: &str,
    detail: &str,
) -> Result<(), DbError> {
    db.tx(async |tx| {
        if tx.execute(sql, params).await? == 0 {
            return Err(DbError::NoAccount(name.to_owned()));
        }
        audit_in(tx, Some(name), action, detail).await
    })
    .await
}

pub async fn set_disabled(db: &Database, name: &str, disabled: bool) -> Result<(), DbError> {
    let action = if disabled { "account_disabled" } else { "account_enabled" };
    update_account(
        db,
        name,
        "UPDATE accounts SET disabled = $1 WHERE name = $2 AND removed IS NULL",
        params![disabled, name],
        action,
        "",
    )
    .await
}

pub async fn set_token(db: &Database, name: &str, token_hash: &[u8]) -> Result<(), DbError> {
    update_account(
        db,
        name,
        "UPDATE accounts SET token_hash = $1 WHERE name = $2 AND removed IS NULL",
        params![token_hash, name],
        "token_replaced",
        "",
    )
    .await
}

/// Removes an account; its job records stay (with their files) for the
/// audit. The records keep their account id; the name is free again, for
/// a new account that inherits nothing.
pub async fn remove_account(db: &Database, name: &str) -> Result<(), DbError> {
    let account = account_by_name(db, name).await?.ok_or_else(|| DbError::NoAccount(name.to_owned()))?;
    update_account(
        db,
        name,
        "UPDATE accounts SET disabled = 1, removed = $1, name = $2, token_hash = $3 WHERE id = $4",
        params![now(), format!("{name}#{}", account.id), &b""[..], account.id],
        "account_removed",
        "",
    )
    .await
}

pub async fn set_limits(db: &Database, name: &str, l: &Limits) -> Result<(), DbError> {
    update_account(
        db,
        name,
        "UPDATE accounts SET max_job_bytes = $1, max_waiting = $2, max_stored_bytes = $3, max_per_hour = $4, retention_days = $5 WHERE name = $6 AND removed IS NULL",
        params![l.max_job_bytes, l.max_waiting, l.max_stored_bytes, l.max_per_hour, l.retention_days, name],
        "limits_set",
        &serde_json::to_string(l).unwrap_or_default(),
    ).await
}
