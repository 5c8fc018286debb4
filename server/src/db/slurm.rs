//! The `slurm_runs` and `slurm_nodes` tables: jobs handed to Slurm, and the
//! key the operator pinned for each node.

use super::{now, unix_now, DbError};
use crate::params;
use crate::sql::{Database, SqlError};

/// A job handed to Slurm: one row while it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmRun {
    pub job_id: String,
    pub attempt: u64,
    /// Its attempt's directory on the shared directory.
    pub dir: String,
    /// Slurm's job id, once sbatch answered.
    pub slurm_id: Option<String>,
    /// Where it is, as shown for its host: the node, or that it is pending.
    pub node: Option<String>,
    pub cancel_sent: bool,
    pub started_unix: i64,
}

/// Records a job handed to Slurm (before sbatch: a crash in between leaves
/// the row, and the server finds the Slurm job by its name), counting the attempt.
pub async fn slurm_start(db: &Database, job_id: &str, attempt: u64, dir: &str) -> Result<(), DbError> {
    db.tx(async |tx| {
        tx.execute(
            "INSERT INTO slurm_runs (job_id, attempt, dir, started_unix) VALUES ($1, $2, $3, $4)",
            params![job_id, attempt, dir, unix_now()],
        )
        .await?;
        tx.execute("UPDATE jobs SET attempts = $1 WHERE id = $2", params![attempt, job_id]).await?;
        Ok(())
    })
    .await
}

/// Notes what Slurm said of a run: its id, where it is.
pub async fn slurm_update(
    db: &Database,
    job_id: &str,
    slurm_id: Option<&str>,
    node: Option<&str>,
) -> Result<(), DbError> {
    db.execute(
        "UPDATE slurm_runs SET slurm_id = COALESCE($1, slurm_id), node = COALESCE($2, node) WHERE job_id = $3",
        params![slurm_id, node, job_id],
    )
    .await?;
    Ok(())
}

pub async fn slurm_cancel_sent(db: &Database, job_id: &str) -> Result<(), DbError> {
    db.execute("UPDATE slurm_runs SET cancel_sent = 1 WHERE job_id = $1", params![job_id]).await?;
    Ok(())
}

/// The run's row is gone: it ended, went back to the queue, or failed.
pub async fn slurm_end(db: &Database, job_id: &str) -> Result<(), DbError> {
    db.execute("DELETE FROM slurm_runs WHERE job_id = $1", params![job_id]).await?;
    Ok(())
}

/// A job Slurm did not take: its row goes, and its attempts are as they were (`attempts`).
pub async fn slurm_abandon(db: &Database, job_id: &str, attempts: u64) -> Result<(), DbError> {
    db.tx(async |tx| {
        tx.execute("DELETE FROM slurm_runs WHERE job_id = $1", params![job_id]).await?;
        tx.execute("UPDATE jobs SET attempts = $1 WHERE id = $2", params![attempts, job_id]).await?;
        Ok(())
    })
    .await
}

/// Every job in Slurm now, oldest first.
pub async fn slurm_runs(db: &Database) -> Result<Vec<SlurmRun>, DbError> {
    let rows = db
        .query(
            "SELECT job_id, attempt, dir, slurm_id, node, cancel_sent, started_unix FROM slurm_runs ORDER BY started_unix, job_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(SlurmRun {
                job_id: r.text("job_id")?,
                attempt: r.count("attempt")?,
                dir: r.text("dir")?,
                slurm_id: r.opt_text("slurm_id")?,
                node: r.opt_text("node")?,
                cancel_sent: r.flag("cancel_sent")?,
                started_unix: r.int("started_unix")?,
            })
        })
        .collect::<Result<_, SqlError>>()?)
}

/// The key pinned for Slurm node `node`, pinning `key` when none is: the key returned.
pub async fn pin_node_key(db: &Database, node: &str, key: &str) -> Result<String, DbError> {
    db.tx(async |tx| {
        let lock = format!("SELECT key FROM slurm_nodes WHERE node = $1{}", tx.for_update());
        if let Some(row) = tx.query_opt(&lock, params![node]).await? {
            return Ok(row.text("key")?);
        }
        tx.execute("INSERT INTO slurm_nodes (node, key, pinned) VALUES ($1, $2, $3)", params![node, key, now()])
            .await?;
        Ok(key.to_owned())
    })
    .await
}

/// The Slurm nodes' pinned keys: (node, key).
pub async fn node_keys(db: &Database) -> Result<Vec<(String, String)>, DbError> {
    let rows = db.query("SELECT node, key FROM slurm_nodes ORDER BY node", &[]).await?;
    Ok(rows.iter().map(|r| Ok((r.text("node")?, r.text("key")?))).collect::<Result<_, SqlError>>()?)
}

/// Forgets a Slurm node's key (replaced on purpose): the next it signs with is pinned.
pub async fn unpin_node_key(db: &Database, node: &str) -> Result<bool, DbError> {
    Ok(db.execute("DELETE FROM slurm_nodes WHERE node = $1", params![node]).await? == 1)
}
