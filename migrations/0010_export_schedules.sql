-- Scheduled exports (docs/exports.md). ClickHouse is the source of truth: the
-- scheduler rebuilds its jobs from `export_schedules` at start and reconciles them
-- every few seconds, and finds the windows still to run in `export_schedule_runs`.
-- Both are versioned rows (ReplacingMergeTree(version)), read with FINAL.
CREATE TABLE IF NOT EXISTS export_schedules
(
    id              String,
    organisation_id LowCardinality(String),
    workspace_slug  LowCardinality(String),
    created_by      String DEFAULT '',
    description     String DEFAULT '',
    cron            String,
    timezone        String,
    window_kind     LowCardinality(String), -- 'hour', 'day' or 'week'
    filters         String,                 -- JSON text, without the time bounds (each run sets them)
    requested_data  Array(String),
    format          LowCardinality(String),
    destination     LowCardinality(String),
    prefix          String,
    status          LowCardinality(String), -- 'active', 'paused' or 'deleted'
    start_at        DateTime64(3, 'UTC'),   -- windows whose cron time is after this are exported
    created_at      DateTime64(3, 'UTC'),
    updated_at      DateTime64(3, 'UTC'),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (organisation_id, id);

-- One row per (schedule, window); a re-run of a window is a new version of the same
-- row (attempts + 1), so the history shows each window once, with its latest outcome.
CREATE TABLE IF NOT EXISTS export_schedule_runs
(
    schedule_id     String,
    organisation_id LowCardinality(String),
    window_start    DateTime64(3, 'UTC'),
    window_end      DateTime64(3, 'UTC'),
    fire_time       DateTime64(3, 'UTC'),   -- the cron time this window belongs to
    status          LowCardinality(String), -- 'pending', 'running', 'success', 'failed' or 'skipped'
    cause           LowCardinality(String), -- 'schedule', 'catch-up', 'retry' or 'backfill'
    attempts        UInt32 DEFAULT 1,
    row_count       UInt64 DEFAULT 0,
    files           String DEFAULT '[]',
    error           String DEFAULT '',
    started_at      DateTime64(3, 'UTC'),
    finished_at     Nullable(DateTime64(3, 'UTC')),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (organisation_id, schedule_id, window_start);
