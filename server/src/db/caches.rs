//! The `cache_generations` table: each account's cleared build caches.

use super::audit::audit_in;
use super::{Account, DbError};
use crate::params;
use crate::sql::Database;

/// Every account's cleared caches, as hosts read them: owner (`a<id>`) ->
/// cache name -> generation.
pub async fn cache_generations(db: &Database) -> Result<jobfile::caches::Generations, DbError> {
    let rows = db.query("SELECT account_id, name, generation FROM cache_generations", &[]).await?;
    let mut out = jobfile::caches::Generations::new();
    for r in &rows {
        let owner = jobfile::caches::account_owner(r.int("account_id")?);
        out.entry(owner).or_default().insert(r.text("name")?, r.count("generation")?);
    }
    Ok(out)
}

/// Clears `account`'s caches named `names`: raises each one's generation,
/// so that no host lends what they held again. Returns each name with its
/// new generation.
pub async fn clear_caches(db: &Database, account: &Account, names: &[String]) -> Result<Vec<(String, u64)>, DbError> {
    db.tx(async |tx| {
        let mut out = Vec::new();
        for name in names {
            tx.execute(
                "INSERT INTO cache_generations (account_id, name, generation) VALUES ($1, $2, 1)
                 ON CONFLICT (account_id, name) DO UPDATE SET generation = cache_generations.generation + 1",
                params![account.id, name],
            )
            .await?;
            let row = tx
                .query_opt(
                    "SELECT generation FROM cache_generations WHERE account_id = $1 AND name = $2",
                    params![account.id, name],
                )
                .await?;
            let generation = row.map(|r| r.count("generation")).transpose()?.unwrap_or(0);
            out.push((name.clone(), generation));
        }
        let detail = out.iter().map(|(n, g)| format!("{n} (generation {g})")).collect::<Vec<_>>().join(", ");
        audit_in(tx, Some(&account.name), "caches_cleared", &detail).await?;
        Ok(out)
    })
    .await
}
