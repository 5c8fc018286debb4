-- The jobs a host may be leased, oldest first: only those waiting, so that
-- finding the next one does not read past every finished job before it.
-- The condition is the lease query's own (`db::leases::lease_next`).
CREATE INDEX jobs_waiting ON jobs(submitted_unix, id)
    WHERE lease_host IS NULL AND delivered_seq IS NULL AND deleted IS NULL
      AND state NOT IN ('done', 'failed', 'uploading');
