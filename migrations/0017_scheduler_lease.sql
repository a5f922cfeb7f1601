-- The scheduler lease (warehouse/lease.py, docs/deploy.md "The scheduler lease"): only the
-- `tollgate scheduler` process holding it runs the scheduled jobs (export schedules, the
-- limits job, settle). Every acquire or renewal writes a new row with a higher version;
-- the current holder is the row of the highest version (read with FINAL). expires_at is
-- the server's clock at the write plus the lease's time to live.
CREATE TABLE IF NOT EXISTS scheduler_lease
(
    name        String,
    holder      String,
    expires_at  DateTime64(3, 'UTC'),
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY name;
