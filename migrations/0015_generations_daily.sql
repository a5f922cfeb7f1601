-- generations, rebuilt with DAILY partitions (it was monthly), so that FINAL is nearly
-- free on settled days.
--
-- Why: the API reads with FINAL (exactly-once reads over at-least-once ingest). FINAL
-- merges rows by the sorting key at read time, which cost about half of every analytics
-- query. ClickHouse skips that work for a partition that is a single merged part
-- (do_not_merge_across_partitions_select_final): such a part cannot hold duplicates.
-- With a partition per UTC day, the settle job (warehouse/settle.py) merges each day
-- that has ended into one part, so a 30-day window merges at read time only today and
-- any day a late event touched since the last settle. Duplicates share created_at,
-- hence their day and partition, so FINAL stays exact.
--
-- Also: merges read merge_max_block_size rows from every part they merge; a row holds
-- its request and response (about 1.5 KB), so 2,048 instead of 8,192 keeps a merge's
-- memory small (embedded ingest stays under 1 GiB). ttl_only_drop_parts: retention drops
-- whole expired days instead of rewriting parts.
--
-- The copy below runs once; on a large table it takes as long as re-reading it
-- (about 1 M rows/s on 2 cores). Columns, types, codecs and indexes are unchanged.
CREATE TABLE IF NOT EXISTS generations_daily
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
    request_headers            String DEFAULT '' CODEC(ZSTD(3)),
    request_body               String DEFAULT '' CODEC(ZSTD(3)),
    request_portkey_headers    String DEFAULT '' CODEC(ZSTD(3)),
    response_headers           String DEFAULT '' CODEC(ZSTD(3)),
    response_body              String DEFAULT '' CODEC(ZSTD(3)),
    response_last_used_option_json_path String DEFAULT '',
    debug_payloads             String DEFAULT '' CODEC(ZSTD(3)),
    metadata_user              LowCardinality(String) MATERIALIZED metadata.value[indexOf(metadata.key, '_user')],
    pricing_status             LowCardinality(String) DEFAULT '',
    trace_hash                 UInt64 MATERIALIZED cityHash64(trace_id),

    INDEX idx_id id TYPE bloom_filter(0.001) GRANULARITY 4,
    INDEX idx_trace trace_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(created_at)
ORDER BY (organisation_id, workspace_slug, created_at, id)
SETTINGS non_replicated_deduplication_window = 1000,
         vertical_merge_algorithm_min_rows_to_activate = 1,
         vertical_merge_algorithm_min_columns_to_activate = 1,
         min_bytes_for_wide_part = 268435456,
         merge_max_block_size = 2048,
         ttl_only_drop_parts = 1;

-- A rerun after a failed copy starts the copy again.
TRUNCATE TABLE generations_daily;

INSERT INTO generations_daily
SELECT * FROM generations
SETTINGS max_partitions_per_insert_block = 0, insert_deduplicate = 0;

EXCHANGE TABLES generations AND generations_daily;

DROP TABLE generations_daily;
