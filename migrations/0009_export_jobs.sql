-- On-demand log exports (docs/exports.md): control-plane state written by the API
-- directly, one row per version. Every change (an edit of a draft, start, progress,
-- the end) writes the whole row again with a larger `version`; read with FINAL.
--
-- `version` orders the states, not only the writes: (rank << 56) | time, where rank
-- is 0 for a draft, 1 for in_progress and 2 for the final states (success, failed,
-- stopped). So a late progress write can never bring a stopped or finished export back
-- to in_progress, and an edit of a draft can never undo a start. Among final states
-- the FIRST one written wins (its time part counts down): a run that finishes after a
-- cancel was recorded stays stopped (the runner sees this and removes its files).
CREATE TABLE IF NOT EXISTS export_jobs
(
    id              String,
    organisation_id LowCardinality(String),
    workspace_slug  LowCardinality(String),
    created_by      String DEFAULT '',
    description     String DEFAULT '',
    filters         String,                 -- the request's filters, as JSON text
    requested_data  Array(String),
    format          LowCardinality(String),
    destination     LowCardinality(String), -- 'local' or 's3', fixed when the export is created
    status          LowCardinality(String),
    total           UInt64 DEFAULT 0,       -- matching rows (counted at create/update, again at start)
    rows_written    UInt64 DEFAULT 0,
    files           String DEFAULT '[]',    -- JSON: the manifest's file list once finished
    error           String DEFAULT '',
    created_at      DateTime64(3, 'UTC'),
    updated_at      DateTime64(3, 'UTC'),
    started_at      Nullable(DateTime64(3, 'UTC')),
    finished_at     Nullable(DateTime64(3, 'UTC')),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (organisation_id, id);
