-- What the limits job publishes, written to ClickHouse before it is published
-- (docs/limits.md, "Guarantees").
--
-- Alerts: one row per (policy, value key, alert window, kind), the decision that the
-- alert is due. Written as 'pending' (with the alert topic's end offsets at that time)
-- before the alert is produced, then as 'sent' (a higher version) once Kafka
-- acknowledged it. A row exists at most once per key, so the alert is decided once;
-- a 'pending' row found at start-up is produced only when the topic, read from the
-- recorded offsets, does not hold its alert_id yet.
CREATE TABLE IF NOT EXISTS limit_alerts
(
    policy_id        String,
    value_key        String,
    alert_window     DateTime64(3, 'UTC'),
    kind             LowCardinality(String),
    alert_id         String,
    organisation_id  LowCardinality(String),
    payload          String,
    state            LowCardinality(String),
    topic_offsets    String DEFAULT '',
    created_at       DateTime64(3, 'UTC'),
    version          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (policy_id, value_key, alert_window, kind);

-- The enforcement feed: the latest record of every (policy, value key) on the compacted
-- state topic ('' is a tombstone), and whether Kafka acknowledged it. Unpublished rows
-- are produced again at start-up (a compacted topic keeps the last record per key, so a
-- repeat is harmless).
CREATE TABLE IF NOT EXISTS limit_state
(
    policy_id        String,
    value_key        String,
    organisation_id  LowCardinality(String),
    record           String,
    signature        String DEFAULT '',
    published        Bool,
    updated_at       DateTime64(3, 'UTC'),
    version          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (policy_id, value_key);
