-- One row per feedback id. An update of the same id is a new row with a later
-- updated_at; ReplacingMergeTree(updated_at) keeps the latest. Read with FINAL.
-- Feedback joins generations by trace_id.
CREATE TABLE IF NOT EXISTS feedback
(
    id              String,
    organisation_id LowCardinality(String),
    workspace_slug  LowCardinality(String) DEFAULT '',
    trace_id        String,
    value           Int8,
    weight          Float64 DEFAULT 1,
    metadata Nested
    (
        key   LowCardinality(String),
        value String
    ),
    created_at      DateTime64(3, 'UTC'),
    updated_at      DateTime64(3, 'UTC'),

    INDEX idx_trace trace_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (organisation_id, id)
SETTINGS non_replicated_deduplication_window = 1000;
