-- The result cache (server::result_cache). Each entry is one account's:
-- the result of a job of its that ended ok, whose provenance verified,
-- kept under result-cache/<entry>/ with the sha256 of each file as stored.
-- `lookup` is the key of everything a submission fixes; `key` adds the
-- machine the run had (architecture, CPUs, memory, timeout), from its
-- verified provenance. `shared`: a verified rebuild found it reproducible
-- on two different hosts (`hosts`), so any account may be served it.
CREATE TABLE result_cache (
    account_id BIGINT NOT NULL,
    key TEXT NOT NULL,
    lookup TEXT NOT NULL,
    salt TEXT NOT NULL,
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    made TEXT NOT NULL,
    host TEXT NOT NULL,
    ran_on TEXT,
    file_sha256 TEXT NOT NULL,
    hosts TEXT,
    shared BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL,
    files TEXT NOT NULL,
    verdict TEXT NOT NULL,
    created_unix BIGINT NOT NULL,
    used_unix BIGINT NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX result_cache_by_lookup ON result_cache(lookup);
CREATE INDEX result_cache_by_use ON result_cache(used_unix);
-- A job's side of it: the lookup key of a job that may be cached (NULL:
-- it may not), what became of it once it ended (`stored`, or why not),
-- and, for a job served from the cache, the hit (JSON, wire::CacheHit).
ALTER TABLE jobs ADD COLUMN cache_lookup TEXT;
ALTER TABLE jobs ADD COLUMN cache_note TEXT;
ALTER TABLE jobs ADD COLUMN from_cache TEXT;
CREATE INDEX jobs_cache_undecided ON jobs(submitted_unix) WHERE cache_lookup IS NOT NULL AND cache_note IS NULL;
