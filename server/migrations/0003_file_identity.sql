-- The inode of the job file the server wrote (a file of the job's name with
-- another inode is not the job's); each delivery's own staging tag; uploads
-- under way hold their reservation as a row in state 'uploading'.
ALTER TABLE jobs ADD COLUMN file_ino BIGINT;
ALTER TABLE jobs ADD COLUMN file_birth BIGINT;
ALTER TABLE jobs ADD COLUMN delivered_part TEXT;
CREATE INDEX jobs_by_state ON jobs(state);
