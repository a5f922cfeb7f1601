-- Derived state of the limits job (analytics_api/limits/), written only by the job.
--
-- Closed days: once a UTC day is over, each usage-limits policy's usage per value key
-- on that day is computed once (from generations FINAL) and kept here, so a refresh
-- only scans the current day. A day is computed again, as a new version, when new
-- data lands in it (late events: the job watches the parts of `generations`) or when
-- a cut inside it changes (a reset, a policy's start). `limit_days` is the index: the
-- current version of each (policy, day), also for days without usage; the rows of
-- older versions are deleted by the job.
CREATE TABLE IF NOT EXISTS limit_days
(
    policy_id    String,
    day          Date,
    version      UInt64,
    cuts_hash    UInt64,
    computed_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (policy_id, day);

CREATE TABLE IF NOT EXISTS limit_day_usage
(
    policy_id  String,
    day        Date,
    version    UInt64,
    value_key  String,
    usage      Float64
)
ENGINE = MergeTree
ORDER BY (policy_id, day, version, value_key);

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

-- Small named values of the job (the parts of `generations` its closed days reflect).
CREATE TABLE IF NOT EXISTS limit_job_state
(
    name     String,
    value    String,
    version  UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY name;
