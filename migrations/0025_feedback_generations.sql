-- The requests whose trace has feedback: a copy of those rows of generations, with the
-- columns that analytics filters, groups and measures read (no bodies). Analytics reads it
-- instead of probing every request of a window for feedback (docs/analytics.md, "Requests
-- with feedback"): the feedback columns of groups, the feedback graphs, and every endpoint
-- under the weighted-feedback filter. On the 10M-row benchmark a workspace month holds
-- 1.5 M requests, 171 k of them in this table.
--
-- The invariant: every request of generations whose (organisation, workspace, trace hash)
-- is in trace_feedback is here. Both ingest streams keep it, each after its own insert is
-- acknowledged and before its offsets are committed (warehouse/queries/feedback_generations.py):
-- the feedback side copies the requests of the traces whose sums it rewrote, the
-- gateway-log side copies its batch's requests whose trace has feedback. One side always
-- sees the other's rows. Rows are never removed but by the retention TTL (the same as
-- generations'); a redelivered or twice-copied request collapses under FINAL, as in
-- generations (same sorting key).
--
-- Single server only, like the daily totals (0024): in cluster mode the backfill below fills
-- it once, and then nothing keeps or reads it (docs/deploy.md).
CREATE TABLE IF NOT EXISTS feedback_generations
(
    id                     String,
    organisation_id        LowCardinality(String),
    workspace_slug         LowCardinality(String),
    created_at             DateTime64(3, 'UTC'),
    prompt_slug            LowCardinality(String),
    config                 LowCardinality(String),
    ai_org                 LowCardinality(String),
    ai_model               LowCardinality(String),
    req_units              UInt32,
    res_units              UInt32,
    total_units            UInt32,
    cost                   Nullable(Float64),
    response_status_code   UInt16,
    response_time          UInt32,
    cache_status           LowCardinality(Nullable(String)),
    retry_success_count    UInt16,
    trace_id               String,
    span_id                String,
    mode                   LowCardinality(String),
    virtual_key            LowCardinality(String),
    last_used_option_index Int32,
    metadata Nested
    (
        key   LowCardinality(String),
        value String
    ),
    api_key_id             LowCardinality(String),
    metadata_user          LowCardinality(String),
    user_hash              UInt64,
    trace_hash             UInt64,
    metadata_pairs         Array(UInt64),
    metadata_key_hashes    Array(UInt64)
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(created_at)
ORDER BY (organisation_id, workspace_slug, created_at, id)
SETTINGS ttl_only_drop_parts = 1;

-- The requests that already have feedback.
INSERT INTO feedback_generations (id, organisation_id, workspace_slug, created_at, prompt_slug, config, ai_org, ai_model,
    req_units, res_units, total_units, cost, response_status_code, response_time, cache_status, retry_success_count,
    trace_id, span_id, mode, virtual_key, last_used_option_index, metadata.key, metadata.value, api_key_id,
    metadata_user, user_hash, trace_hash, metadata_pairs, metadata_key_hashes)
SELECT id, organisation_id, workspace_slug, created_at, prompt_slug, config, ai_org, ai_model,
    req_units, res_units, total_units, cost, response_status_code, response_time, cache_status, retry_success_count,
    trace_id, span_id, mode, virtual_key, last_used_option_index, metadata.key, metadata.value, api_key_id,
    metadata_user, user_hash, trace_hash, metadata_pairs, metadata_key_hashes
FROM generations
WHERE (organisation_id, workspace_slug, trace_hash) IN (SELECT organisation_id, workspace_slug, trace_hash FROM trace_feedback);
