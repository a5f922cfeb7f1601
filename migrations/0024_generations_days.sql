-- Daily totals per workspace of settled days: what the organisation-wide workspace groups
-- (`/analytics/groups/workspaces`, `/analytics/groups/workspace`) read instead of every
-- request of the window (on the 10M-row benchmark: 150-157 ms for the scan, ~50 ms with
-- the totals; docs/analytics.md "Daily totals").
--
-- Exact by construction, never by timing: the settle job (warehouse/settle.py) computes
-- the totals of a day from the ONE part its partition is, reading only that part (`_part`,
-- with FINAL), and records which part it read, by name and
-- by the hash of its files, with the totals and in generations_days_parts after them. A query uses a
-- day's totals only while that part is still the day's only active part and the whole
-- UTC day lies inside the window; every other day (today, a day a late event or a
-- redelivery touched since, the partial days at the window's edges) is read from
-- generations as before. A part is never rewritten under its name (a merge, a mutation or a
-- lightweight delete makes a new part), so totals can never be stale while they are used.
--
-- Totals of parts that are gone are unused (a row per workspace each time a day is settled
-- again). A settle pass marks such a part retired, and a later pass, once it has been retired
-- for a minute, deletes its rows: a query that chose a part's totals while it was active
-- has read them by then.
--
-- Only additive measures are kept: counts, sums and the latest request. Percentiles,
-- distinct users and feedback are not (their per-day states would be nearly as large as
-- the requests at the benchmark's 1.5 M requests per workspace a month). Cluster mode does
-- not use these tables (docs/deploy.md).
CREATE TABLE IF NOT EXISTS generations_days
(
    organisation_id   LowCardinality(String),
    workspace_slug    LowCardinality(String),
    day               Date,   -- the UTC day of the partition of generations (its requests of that day only:
                              -- toDate() wraps around outside 1970..2149, so a partition may hold others)
    part              String, -- the part of generations these totals were computed from,
    part_hash         String, -- and its system.parts.hash_of_all_files (should a name recur in a rebuilt table)
    requests          UInt64,
    cost              Float64,
    tokens            UInt64,
    prompt_tokens     UInt64,
    completion_tokens UInt64,
    latency_sum       UInt64,
    errors            UInt64,
    simple_hits       UInt64,
    semantic_hits     UInt64,
    last_seen         DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (organisation_id, workspace_slug, day, part, part_hash);

-- The parts whose totals are complete in generations_days (written after them), and since
-- when each is no longer active (the epoch: still active when last looked at).
CREATE TABLE IF NOT EXISTS generations_days_parts
(
    day        Date,
    part       String,
    part_hash  String,
    rolled_at  DateTime64(3, 'UTC') DEFAULT now64(3),
    retired_at DateTime64(3, 'UTC') DEFAULT 0
)
ENGINE = ReplacingMergeTree(retired_at)
ORDER BY (day, part, part_hash);
