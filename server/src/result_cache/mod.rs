//! The result cache: a job whose inputs are all those of an earlier job
//! that ended ok is not run again; the server serves that job's result and
//! its original signed provenance, with a record of the hit it signs itself.
//!
//! What keeps it from being poisoned or leaking:
//! - Results come only from hosts, never from a client, and an entry is made
//!   only from a result that ended `ok` and whose provenance verifies against
//!   the key of the host the server recorded for the run, naming the job file
//!   the server received (`crate::rebuild::verify_run`), checked on the
//!   server's own copy of the files. A failure, a debug job, a job with build
//!   caches (their state is in no key) and a job marked `no_result_cache` are
//!   never stored.
//! - The key (`key`) is a sha256 over everything that can change the result;
//!   an entry is served again only while each of its files has the sha256 it
//!   was stored with and its provenance still verifies against a key the
//!   server trusts now. Anything else is a miss, and the entry is removed.
//! - An account is served only its own entries, and, with
//!   `--share-reproducible`, entries a verified rebuild found reproducible on
//!   two different hosts. Which entries another account holds is never
//!   looked at otherwise, so neither a hit nor a miss says anything about them.
//!
//! Entries are files beside the queue (`entry::Entries`) and rows of the
//! `result_cache` table (`db::result_cache`); they count against their
//! account's stored bytes, and the least recently used go when the cache is
//! over `--result-cache-size`.

mod admit;
pub mod entry;
mod hit;
pub mod key;
pub mod settings;

pub use admit::admit_ended;
pub use hit::{serve, Served};
pub use settings::{default_key_path, default_root, Settings};

use jobfile::jobenv::JobEnv;

use crate::app::App;
use crate::db::result_cache::{self as rows, Entry};
use crate::db::{self, Account, DbError};

/// What a submission brings to a lookup.
pub struct Submission<'a> {
    pub account: &'a Account,
    pub image: &'a str,
    pub sha256: &'a str,
    pub size: u64,
    pub packages: Option<&'a jobfile::deps::Resolution>,
    pub env: Option<&'a JobEnv>,
    /// Why its result may not be cached, whatever its key: it names build
    /// caches, asks for a debug session, is marked `no_result_cache`.
    pub excluded: Option<&'static str>,
}

/// Why a job that asks for `debug`, names `caches`, is marked
/// `no_result_cache` or is a verified rebuild's second run may not be cached.
pub fn exclusion(no_result_cache: bool, debug: bool, caches: &[String]) -> Option<&'static str> {
    if no_result_cache {
        Some("it was asked to run whatever the cache holds (--no-result-cache, or a rerun)")
    } else if debug {
        Some("it is a debug job")
    } else if !caches.is_empty() {
        Some("it names build caches, whose state is in no key")
    } else {
        None
    }
}

/// The lookup digest of a submission whose result may be cached, or why it may not be.
pub fn lookup_of(app: &App, s: &Submission<'_>) -> Result<String, String> {
    let settings = app.result_cache.as_ref().ok_or("this server keeps no results")?;
    if let Some(why) = s.excluded {
        return Err(why.to_owned());
    }
    let env = s.env.ok_or("its job file could not be read for its newest time")?;
    let dir = app.store.images.join(format!("i{}", s.image));
    let manifest = jobfile::image::ImageManifest::load(&dir).map_err(|e| jobfile::error_chain(&e))?;
    let manifest_sha256 =
        jobfile::image::sha256_file(&dir.join(jobfile::image::MANIFEST)).map_err(|e| e.to_string())?;
    let lookup = key::Lookup {
        job_sha256: s.sha256,
        size: s.size,
        image: s.image,
        manifest_sha256: &manifest_sha256,
        arch: manifest.arch.debian(),
        init: &manifest.builder_version,
        construir: env!("CARGO_PKG_VERSION"),
        packages: s.packages,
        env,
        salt: &settings.salt,
    };
    Ok(lookup.digest())
}

/// Removes an entry (its row, then its files), saying why.
async fn drop_entry(app: &App, entry: &Entry, why: &str) {
    let Some(settings) = &app.result_cache else { return };
    match rows::remove(app.db(), entry.account_id, &entry.key).await {
        Ok(true) => {
            settings.entries.remove(entry.account_id, &entry.key);
            log::warn!("result cache: removed entry {} (job {}): {why}", entry.key, entry.job_id);
            let account = db::account_by_id(app.db(), entry.account_id).await.ok().flatten().map(|a| a.name);
            let detail = format!("{} {}: {}", entry.job_id, entry.key, jobfile::sanitize(why.as_bytes()));
            db::audit_or_log(app.db(), account.as_deref(), "result_cache_removed", &detail).await;
        }
        Ok(false) => settings.entries.remove(entry.account_id, &entry.key),
        Err(e) => log::error!("result cache: cannot remove entry {}: {}", entry.key, jobfile::error_chain(&e)),
    }
}

/// Removes the least recently used entries until all fit in `--result-cache-size`.
pub async fn evict(app: &App) -> Result<(), DbError> {
    let Some(settings) = &app.result_cache else { return Ok(()) };
    let mut total = rows::total_bytes(app.db()).await?;
    if total <= settings.max_bytes {
        return Ok(());
    }
    for entry in rows::least_recently_used(app.db()).await? {
        if total <= settings.max_bytes {
            break;
        }
        let why = format!("the cache is over its {} bytes (least recently used first)", settings.max_bytes);
        drop_entry(app, &entry, &why).await;
        total = total.saturating_sub(entry.bytes);
    }
    Ok(())
}

/// Removes `account`'s entry `key`, or all of its entries: how many, and their bytes.
pub async fn forget(app: &App, account: &Account, key: Option<&str>) -> Result<(u64, u64), DbError> {
    let Some(settings) = &app.result_cache else { return Ok((0, 0)) };
    let mut out = (0, 0);
    for entry in rows::entries_of(app.db(), account.id).await? {
        if key.is_some_and(|k| k != entry.key) {
            continue;
        }
        if rows::remove(app.db(), account.id, &entry.key).await? {
            settings.entries.remove(account.id, &entry.key);
            out = (out.0 + 1, out.1 + entry.bytes);
        }
    }
    if out.0 > 0 {
        let what = key.map_or_else(|| format!("all ({} entries)", out.0), str::to_owned);
        db::audit_or_log(app.db(), Some(&account.name), "result_cache_forgot", &what).await;
    }
    Ok(out)
}

/// Removes the entries of removed accounts: how many. (A lookup never
/// finds them; this gives their room back.)
pub async fn drop_removed_accounts(app: &App) -> Result<usize, DbError> {
    if app.result_cache.is_none() {
        return Ok(0);
    }
    let gone = rows::of_removed_accounts(app.db()).await?;
    for entry in &gone {
        drop_entry(app, entry, "its account was removed").await;
    }
    Ok(gone.len())
}

/// Removes the entries stored under another `--cache-salt` (at start): how many.
pub async fn disown_other_salts(app: &App) -> Result<usize, DbError> {
    let Some(settings) = &app.result_cache else { return Ok(0) };
    let mut n = 0;
    for entry in rows::least_recently_used(app.db()).await? {
        if entry.salt != settings.salt {
            drop_entry(app, &entry, "it was stored under another --cache-salt").await;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::entry::{self, Entries};
    use super::*;
    use crate::db::result_cache::Entry;

    async fn app(root: &Path, share_reproducible: bool, max_bytes: u64) -> (Arc<App>, Vec<Account>) {
        let store = crate::store::Store::beside(&root.join("queue"));
        store.create_all().expect("dirs");
        let db = db::open(&root.join("server.db").to_string_lossy()).await.expect("db");
        let mut accounts = Vec::new();
        for name in ["alice", "bob", "carol"] {
            accounts.push(db::add_account(&db, name, db::Kind::Submitter, name.as_bytes()).await.expect("account"));
        }
        let settings = Settings {
            salt: key::salt_digest("now"),
            share_reproducible,
            max_bytes,
            entries: Entries { root: root.join("result-cache") },
            key: Arc::new(construir_provenance::HostKey::from_seed([3; 32])),
        };
        (App::for_test_with(db, store, Some(settings)), accounts)
    }

    /// An entry of `account` for `lookup`, its files in place, used at `used`.
    async fn entry(app: &App, account: &Account, key: &str, lookup: &str, shared: bool, used: i64) -> Entry {
        let settings = app.result_cache.as_ref().expect("on");
        let file = settings.entries.root.with_file_name(format!("{key}.src"));
        std::fs::write(&file, key.as_bytes()).expect("write");
        let staged = settings.entries.stage(key, &[(entry::RESULT, &file), (entry::PROVENANCE, &file)]).expect("stage");
        let files = staged.files.clone();
        staged.commit(&settings.entries, account.id, key).expect("commit");
        let e = Entry {
            account_id: account.id,
            key: key.into(),
            lookup: lookup.into(),
            salt: settings.salt.clone(),
            job_id: format!("job-{key}"),
            name: "hello".into(),
            image: "0".into(),
            made: "2026-12-06T10:00:00Z".into(),
            host: "h1".into(),
            ran_on: None,
            file_sha256: "f".into(),
            hosts: if shared { vec!["h1".into(), "h2".into()] } else { Vec::new() },
            shared,
            bytes: 100,
            files,
            verdict: "ok".into(),
            created_unix: used,
            used_unix: used,
        };
        assert!(db::result_cache::insert(app.db(), &e).await.expect("insert"));
        e
    }

    fn keys(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.key.as_str()).collect()
    }

    #[tokio::test]
    async fn an_account_is_offered_its_own_entries_and_shared_ones_only_of_accounts_not_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for share in [true, false] {
            let root = tmp.path().join(format!("share-{share}"));
            let (app, a) = app(&root, share, 1 << 30).await;
            let (alice, bob, carol) = (&a[0], &a[1], &a[2]);
            entry(&app, alice, "ka", "L", false, 1).await;
            entry(&app, carol, "kc", "L", true, 2).await;
            entry(&app, bob, "kb", "L", false, 3).await;
            let offered = |who: &Account| db::result_cache::candidates(app.db(), "L", who.id, share);
            // Alice: hers first, then carol's reproduced one (when shared); never bob's.
            let want: &[&str] = if share { &["ka", "kc"] } else { &["ka"] };
            assert_eq!(keys(&offered(alice).await.expect("alice")), want);
            let want: &[&str] = if share { &["kb", "kc"] } else { &["kb"] };
            assert_eq!(keys(&offered(bob).await.expect("bob")), want);
            assert!(db::result_cache::candidates(app.db(), "M", alice.id, share).await.expect("other").is_empty());
            // Carol removed: her shared entry is never offered again, and its room comes back.
            db::remove_account(app.db(), "carol").await.expect("remove carol");
            let want: &[&str] = &["ka"];
            assert_eq!(keys(&offered(alice).await.expect("alice")), want);
            let dir = app.result_cache.as_ref().map(|s| s.entries.dir(carol.id, "kc")).expect("on");
            assert!(dir.exists());
            assert_eq!(drop_removed_accounts(&app).await.expect("drop"), 1);
            assert!(!dir.exists());
            assert_eq!(keys(&db::result_cache::least_recently_used(app.db()).await.expect("rows")), ["ka", "kb"]);
        }
    }

    #[tokio::test]
    async fn the_least_recently_used_go_past_the_size_and_other_salts_at_start() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (app, a) = app(tmp.path(), true, 250).await;
        let entries = app.result_cache.as_ref().map(|s| s.entries.clone()).expect("on");
        entry(&app, &a[0], "old", "L1", false, 1).await;
        entry(&app, &a[1], "mid", "L2", false, 2).await;
        entry(&app, &a[0], "new", "L3", false, 3).await;
        db::result_cache::touch(app.db(), a[0].id, "old").await.expect("used again");
        // 300 bytes over 250: the least recently used goes, which is "mid" now that "old" was used.
        evict(&app).await.expect("evict");
        let left = db::result_cache::least_recently_used(app.db()).await.expect("rows");
        assert_eq!(keys(&left), ["new", "old"]);
        assert!(!entries.dir(a[1].id, "mid").exists() && entries.dir(a[0].id, "old").exists());
        // Forgotten by its owner alone.
        assert_eq!(forget(&app, &a[1], Some("old")).await.expect("bob"), (0, 0));
        assert_eq!(forget(&app, &a[0], Some("new")).await.expect("alice"), (1, 100));
        assert!(!entries.dir(a[0].id, "new").exists());
        // An entry of another salt is disowned at start.
        let mut stale = entry(&app, &a[2], "stale", "L4", false, 4).await;
        stale.salt = key::salt_digest("before");
        db::result_cache::remove(app.db(), a[2].id, "stale").await.expect("rm");
        std::fs::create_dir_all(entries.dir(a[2].id, "stale")).expect("dir");
        assert!(db::result_cache::insert(app.db(), &stale).await.expect("insert"));
        assert_eq!(disown_other_salts(&app).await.expect("disown"), 1);
        assert_eq!(keys(&db::result_cache::least_recently_used(app.db()).await.expect("rows")), ["old"]);
        assert!(!entries.dir(a[2].id, "stale").exists());
    }
}
