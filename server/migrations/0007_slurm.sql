-- The Slurm executor: each job handed to Slurm, one row while it is there
-- (its attempt's directory on the shared directory, the Slurm job id once
-- sbatch answered, the node Slurm names, whether its cancel was sent), and
-- the key each node first signed a result with, pinned.
CREATE TABLE slurm_runs (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    attempt BIGINT NOT NULL,
    dir TEXT NOT NULL,
    slurm_id TEXT,
    node TEXT,
    cancel_sent BIGINT NOT NULL DEFAULT 0,
    started_unix BIGINT NOT NULL
);
CREATE TABLE slurm_nodes (
    node TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    pinned TEXT NOT NULL
);
