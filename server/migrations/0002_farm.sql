-- The farm: host accounts, leases with their fencing sequence, remote hosts.
ALTER TABLE accounts ADD COLUMN kind TEXT NOT NULL DEFAULT 'submitter';
ALTER TABLE jobs ADD COLUMN lease_host TEXT;
ALTER TABLE jobs ADD COLUMN lease_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_expires_ms BIGINT;
ALTER TABLE jobs ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN delivered_seq BIGINT;
ALTER TABLE jobs ADD COLUMN delivered_as TEXT;
CREATE INDEX jobs_by_lease ON jobs(lease_host, lease_expires_ms);
CREATE INDEX jobs_by_submission ON jobs(submitted_unix, id);
CREATE TABLE hosts (
    account_id BIGINT NOT NULL PRIMARY KEY REFERENCES accounts(id),
    last_seen TEXT NOT NULL,
    last_seen_unix BIGINT NOT NULL,
    images TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    version TEXT NOT NULL
);
