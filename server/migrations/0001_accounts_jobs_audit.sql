-- Accounts, job records and the audit log.
CREATE TABLE accounts (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash BYTEA NOT NULL,
    disabled BIGINT NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    max_job_bytes BIGINT,
    max_waiting BIGINT,
    max_stored_bytes BIGINT,
    max_per_hour BIGINT,
    retention_days BIGINT
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    file_name TEXT NOT NULL UNIQUE,
    size BIGINT NOT NULL,
    submitted TEXT NOT NULL,
    submitted_unix BIGINT NOT NULL,
    state TEXT NOT NULL,
    updated TEXT NOT NULL,
    verdict TEXT,
    result_bytes BIGINT,
    deleted TEXT
);
CREATE INDEX jobs_by_account ON jobs(account_id, submitted_unix);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    time TEXT NOT NULL,
    account TEXT,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
