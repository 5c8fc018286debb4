-- When an account was removed (NULL: it was not). A removed account stays
-- for the records of its jobs and the audit; its name is freed for a new
-- account by adding `#<id>` (no account name has a `#`).
ALTER TABLE accounts ADD COLUMN removed TEXT;
-- Accounts removed before this column: renamed `removed-<id>-<name>`,
-- disabled, their token gone.
UPDATE accounts SET removed = created, name = name || '#' || id WHERE name LIKE 'removed-%' AND disabled = 1 AND length(token_hash) = 0;
