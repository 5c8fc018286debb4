-- Accounts, job records and the audit log.
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash BLOB NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    max_job_bytes INTEGER,
    max_waiting INTEGER,
    max_stored_bytes INTEGER,
    max_per_hour INTEGER,
    retention_days INTEGER
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    file_name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    submitted TEXT NOT NULL,
    submitted_unix INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated TEXT NOT NULL,
    verdict TEXT,
    result_bytes INTEGER,
    deleted TEXT
);
CREATE INDEX jobs_by_account ON jobs(account_id, submitted_unix);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    account TEXT,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
