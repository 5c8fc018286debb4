-- The host the server recorded for each run it did not see a local host
-- run: `remote:<account>` for a remote host's delivery, `slurm:<node>` for
-- the node Slurm named once the job ended. A result's provenance must be
-- signed as that host, with the key pinned for it (not any key the server
-- knows); NULL for a local host's run and for runs that have not ended.
ALTER TABLE jobs ADD COLUMN ran_on TEXT;
-- The job file's sha256 as the server received it: every result's
-- statement must name it as the job that ran.
ALTER TABLE jobs ADD COLUMN file_sha256 TEXT;
-- The build caches the server gave each remote host jobs for: a host's
-- word about which caches it holds counts only for these (another
-- account's cache it names is not shown, nor steers that account's jobs).
CREATE TABLE host_caches (
    host_id INTEGER NOT NULL,
    owner TEXT NOT NULL,
    image TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (host_id, owner, image, name)
);
