-- One row per gateway request: every field of the spec's AnalyticsMetrics, plus the
-- request and response of the LogObject. Public table: operators query it directly.
--
-- Exactly-once reads: the ingest path is at-least-once (offsets are committed only
-- after ClickHouse acknowledged the insert), so a crash or rebalance can re-insert a
-- batch. A redelivered event is byte-identical, so it lands with the same sorting key
-- (organisation_id, workspace_slug, created_at, id) and ReplacingMergeTree collapses
-- it. Read with FINAL (the API always does) to see each id once before merges run.
-- Identical re-sent blocks are also dropped on insert (non_replicated_deduplication_window).
-- Merges are vertical (one column at a time) even for small parts: this table is wide,
-- and a horizontal merge of its 57 columns needs hundreds of MB. Parts stay compact
-- (one file) up to 256 MB, which makes the many-column inserts of ingest cheaper.
-- LowCardinality only where dashboards group or filter; it costs insert CPU.
CREATE TABLE IF NOT EXISTS generations
(
    id                         String,
    organisation_id            LowCardinality(String),
    workspace_slug             LowCardinality(String),
    created_at                 DateTime64(3, 'UTC'),
    organisation_name          String DEFAULT '',
    prompt_id                  String DEFAULT '',
    prompt_version_id          String DEFAULT '',
    prompt_slug                LowCardinality(String) DEFAULT '',
    config_id                  String DEFAULT '',
    config                     LowCardinality(String) DEFAULT '',
    config_version_id          String DEFAULT '',
    is_success                 Bool,
    ai_org                     LowCardinality(String) DEFAULT '',
    ai_model                   LowCardinality(String) DEFAULT '',
    req_units                  UInt32 DEFAULT 0,
    res_units                  UInt32 DEFAULT 0,
    total_units                UInt32 DEFAULT 0,
    cost                       Nullable(Float64),
    cost_currency              String DEFAULT 'USD',
    request_url                String DEFAULT '',
    request_method             String DEFAULT '',
    response_status_code       UInt16,
    response_time              UInt32 DEFAULT 0,
    is_proxy_call              Bool DEFAULT false,
    cache_status               LowCardinality(Nullable(String)),
    cache_type                 Nullable(String),
    stream_mode                Nullable(UInt8),
    retry_success_count        UInt16 DEFAULT 0,
    trace_id                   String DEFAULT '',
    span_id                    String DEFAULT '',
    span_name                  String DEFAULT '',
    parent_span_id             String DEFAULT '',
    mode                       LowCardinality(String) DEFAULT '',
    virtual_key                LowCardinality(String) DEFAULT '',
    source                     String DEFAULT '',
    runtime                    String DEFAULT '',
    runtime_version            String DEFAULT '',
    sdk_version                String DEFAULT '',
    internal_trace_id          String DEFAULT '',
    last_used_option_index     Int32 DEFAULT 0,
    log_store_file_path_format String DEFAULT '',
    metadata Nested
    (
        key   LowCardinality(String),
        value String
    ),
    api_key_id                 LowCardinality(String) DEFAULT '',
    request_parsing_time       UInt32 DEFAULT 0,
    pre_processing_time        UInt32 DEFAULT 0,
    cache_processing_time      UInt32 DEFAULT 0,
    response_parsing_time      UInt32 DEFAULT 0,
    gateway_processing_time    UInt32 DEFAULT 0,
    upstream_response_time     UInt32 DEFAULT 0,
    -- LogObject.request / LogObject.response (headers and bodies as JSON text)
    request_headers            String DEFAULT '' CODEC(ZSTD(3)),
    request_body               String DEFAULT '' CODEC(ZSTD(3)),
    request_portkey_headers    String DEFAULT '' CODEC(ZSTD(3)),
    response_headers           String DEFAULT '' CODEC(ZSTD(3)),
    response_body              String DEFAULT '' CODEC(ZSTD(3)),
    response_last_used_option_json_path String DEFAULT '',
    -- finalUntransformedRequest / originalResponse / transformedRequest, when present (JSON object text)
    debug_payloads             String DEFAULT '' CODEC(ZSTD(3)),

    INDEX idx_id id TYPE bloom_filter(0.001) GRANULARITY 4,
    INDEX idx_trace trace_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (organisation_id, workspace_slug, created_at, id)
SETTINGS non_replicated_deduplication_window = 1000,
         vertical_merge_algorithm_min_rows_to_activate = 1,
         vertical_merge_algorithm_min_columns_to_activate = 1,
         min_bytes_for_wide_part = 268435456;
