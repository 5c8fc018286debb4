-- Verified rebuilds: a job's second run is a job of its own whose record
-- names the first (twin_of; listings leave it out), and the first's record
-- keeps the pair: the second's id, the SOURCE_DATE_EPOCH both get and, once
-- both have ended, the verdict (JSON, server::db::RebuildRecord).
ALTER TABLE jobs ADD COLUMN twin_of TEXT;
ALTER TABLE jobs ADD COLUMN rebuild TEXT;
