//! The `audit` table: what changed, when, by whom.

use super::{now, DbError};
use crate::params;
use crate::sql::{Database, Row, SqlError, Tx};

pub async fn audit(db: &Database, account: Option<&str>, action: &str, detail: &str) -> Result<(), DbError> {
    db.tx(async |tx| audit_in(tx, account, action, detail).await).await
}

/// `audit`, for a caller whose work is done whatever the audit says: an
/// entry that cannot be written is logged, with what it would have said.
pub async fn audit_or_log(db: &Database, account: Option<&str>, action: &str, detail: &str) {
    if let Err(e) = audit(db, account, action, detail).await {
        let who = account.unwrap_or("(the server)");
        log::error!("cannot write the audit entry {action} by {who} ({detail}): {}", jobfile::error_chain(&e));
    }
}

pub(super) async fn audit_in(tx: &mut Tx, account: Option<&str>, action: &str, detail: &str) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO audit (time, account, action, detail) VALUES ($1, $2, $3, $4)",
        params![now(), account, action, jobfile::sanitize(detail.as_bytes())],
    )
    .await?;
    Ok(())
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub time: String,
    /// Who did it (none: the server itself).
    pub account: Option<String>,
    pub action: String,
    pub detail: String,
}

impl AuditEntry {
    fn from_row(r: &Row) -> Result<AuditEntry, SqlError> {
        Ok(AuditEntry {
            time: r.text("time")?,
            account: r.opt_text("account")?,
            action: r.text("action")?,
            detail: r.text("detail")?,
        })
    }
}

/// The audit log, newest first.
pub async fn audit_log(db: &Database, limit: usize) -> Result<Vec<AuditEntry>, DbError> {
    let rows = db
        .query("SELECT time, account, action, detail FROM audit ORDER BY id DESC LIMIT $1", params![limit as i64])
        .await?;
    Ok(rows.iter().map(AuditEntry::from_row).collect::<Result<_, _>>()?)
}
