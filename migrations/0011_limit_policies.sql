-- Limit policies (docs/limits.md): usage limits and rate limits, control-plane rows
-- written directly by the API. Every change writes the whole policy again as a new
-- version; the version is part of the sorting key, so every version is kept (the
-- history) and ReplacingMergeTree only collapses an identical version written twice.
-- The current policy is the highest version of its id:
--   SELECT … FROM limit_policies ORDER BY id, version DESC LIMIT 1 BY id
-- Delete archives: a version with status 'archived'. Who made each change is the
-- `changed_by` API key id (and the audit trail has the request).
CREATE TABLE IF NOT EXISTS limit_policies
(
    id               String,
    version          UInt64,
    kind             LowCardinality(String),
    organisation_id  LowCardinality(String),
    workspace_slug   LowCardinality(String) DEFAULT '',
    name             Nullable(String),
    conditions       Array(Tuple(key String, value String)),
    group_by         Array(String),
    type             LowCardinality(String),
    credit_limit     Float64 DEFAULT 0,
    alert_threshold  Nullable(Float64),
    periodic_reset   LowCardinality(String) DEFAULT '',
    unit             LowCardinality(String) DEFAULT '',
    value            Float64 DEFAULT 0,
    status           LowCardinality(String),
    created_at       DateTime64(3, 'UTC'),
    updated_at       DateTime64(3, 'UTC'),
    baseline_at      DateTime64(3, 'UTC'),
    limits_at        DateTime64(3, 'UTC'),
    changed_by       String DEFAULT ''
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (organisation_id, id, version);

-- Resets of one value key of a usage-limits policy: from `reset_at` on, the key counts
-- usage again from zero. Every reset is kept; the latest one of a key is the one in force.
CREATE TABLE IF NOT EXISTS limit_resets
(
    policy_id        String,
    value_key        String,
    reset_at         DateTime64(3, 'UTC'),
    organisation_id  LowCardinality(String),
    reset_by         String DEFAULT ''
)
ENGINE = ReplacingMergeTree
ORDER BY (policy_id, value_key, reset_at);
