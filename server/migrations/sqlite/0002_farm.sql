-- The farm: host accounts, leases with their fencing sequence, remote hosts.
ALTER TABLE accounts ADD COLUMN kind TEXT NOT NULL DEFAULT 'submitter';
ALTER TABLE jobs ADD COLUMN lease_host TEXT;
ALTER TABLE jobs ADD COLUMN lease_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_expires_ms INTEGER;
ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN delivered_seq INTEGER;
ALTER TABLE jobs ADD COLUMN delivered_as TEXT;
CREATE INDEX jobs_by_lease ON jobs(lease_host, lease_expires_ms);
CREATE INDEX jobs_by_submission ON jobs(submitted_unix, id);
CREATE TABLE hosts (
    account_id INTEGER NOT NULL PRIMARY KEY REFERENCES accounts(id),
    last_seen TEXT NOT NULL,
    last_seen_unix INTEGER NOT NULL,
    images TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    version TEXT NOT NULL
);
