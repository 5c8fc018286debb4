-- Build caches and host keys: the names a job's declaration gives (JSON list; NULL: none),
-- the caches each remote host last said it holds (JSON list of
-- wire::HeldCache), and each account's cleared caches: clearing raises a
-- name's generation, and hosts start a cache of another generation again.
ALTER TABLE jobs ADD COLUMN caches TEXT;
ALTER TABLE hosts ADD COLUMN caches TEXT;
-- The public key a remote host first signed its results with (ed25519:<base64>), pinned.
ALTER TABLE hosts ADD COLUMN key TEXT;
CREATE TABLE cache_generations (
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    generation BIGINT NOT NULL,
    PRIMARY KEY (account_id, name)
);
