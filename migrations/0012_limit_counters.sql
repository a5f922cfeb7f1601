-- Derived state of the limits job (analytics_api/limits/), written only by the job.
--
-- Closed segments: once a UTC day (before today) or an hour (of today, or of a
-- rate-limits window) is over, each policy's usage per value key in it is computed once
-- (from generations FINAL) and kept here, so a refresh only scans the current hour (and
-- the partial hours at the edges of a sliding window). A segment is computed again, as a
-- new version, when new data lands in it (late events: the job watches the parts of
-- `generations`) or when a cut inside it changes (a reset, a policy's start).
-- `limit_segments` is the index: the current version of each (policy, segment), also for
-- segments without usage; the rows of older versions are deleted by the job.
CREATE TABLE IF NOT EXISTS limit_segments
(
    policy_id    String,
    start        DateTime64(3, 'UTC'),
    end          DateTime64(3, 'UTC'),
    version      UInt64,
    cuts_hash    UInt64,
    computed_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (policy_id, start, end);

CREATE TABLE IF NOT EXISTS limit_segment_usage
(
    policy_id  String,
    start      DateTime64(3, 'UTC'),
    end        DateTime64(3, 'UTC'),
    version    UInt64,
    value_key  String,
    usage      Float64
)
ENGINE = MergeTree
ORDER BY (policy_id, start, end, version, value_key);

-- The counters the API shows: the latest state of every value key of every policy,
-- written by the job when it changes. Read with FINAL.
CREATE TABLE IF NOT EXISTS limit_counters
(
    policy_id             String,
    kind                  LowCardinality(String),
    organisation_id       LowCardinality(String),
    value_key             String,
    entity_id             String,
    window_start          DateTime64(3, 'UTC'),
    window_end            Nullable(DateTime64(3, 'UTC')),
    current_usage         Float64,
    status                LowCardinality(String),
    threshold_alert_sent  Bool DEFAULT false,
    exhausted_alert_sent  Bool DEFAULT false,
    updated_at            DateTime64(3, 'UTC'),
    version               UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (policy_id, value_key);

-- Small named values of the job (the parts of `generations` its closed segments reflect).
CREATE TABLE IF NOT EXISTS limit_job_state
(
    name     String,
    value    String,
    version  UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY name;
