-- The audit trail: one record per mutating API request (docs/api.md, "Audit trail"),
-- written only by ingest from the audit topic. Append-only: no API path updates or
-- deletes it; rows leave only through the retention TTL, which the migration runner
-- sets from TOLLGATE_AUDIT_RETENTION_DAYS (like generations' TOLLGATE_RETENTION_DAYS).
--
-- A request is published twice: a `pending` record (version 1, before its handler
-- runs, response_status_code 0) and its final record (version 2, with the status).
-- Both carry the same (organisation_id, timestamp, request_id), so
-- ReplacingMergeTree(version) keeps the final one and collapses re-deliveries of
-- either. Read with FINAL: a request then appears once, as its latest version.
-- The sorting key serves the API's query: one organisation, a time range, newest first.
CREATE TABLE IF NOT EXISTS audit_logs
(
    request_id           String,
    version              UInt8,
    timestamp            DateTime64(3, 'UTC'),
    organisation_id      LowCardinality(String),
    workspace_id         LowCardinality(String) DEFAULT '',
    method               LowCardinality(String),
    uri                  String,
    query_params         String DEFAULT '',
    request_headers      String DEFAULT '' CODEC(ZSTD(3)),
    request_body         String DEFAULT '' CODEC(ZSTD(3)),
    user_id              String DEFAULT '',
    user_type            LowCardinality(String) DEFAULT '',
    response_status_code UInt16 DEFAULT 0,
    resource_type        LowCardinality(String) DEFAULT '',
    action               LowCardinality(String) DEFAULT '',
    client_ip            String DEFAULT '',
    country              LowCardinality(String) DEFAULT '',

    INDEX idx_request_id request_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(timestamp)
ORDER BY (organisation_id, timestamp, request_id)
SETTINGS non_replicated_deduplication_window = 1000;
