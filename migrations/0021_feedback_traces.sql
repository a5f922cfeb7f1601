-- The feedback of each trace, summed: what every analytics query needs of feedback
-- (docs/analytics.md, "Feedback"), so that no query re-reads and re-groups the whole
-- `feedback` table (FINAL, then GROUP BY trace: ~45 ms for 500k feedback rows).
--
-- Exact by construction: a row is the aggregate of the trace's latest feedback versions
-- (`feedback FINAL`) as one read saw them. The feedback ingest rewrites the rows of the
-- traces of every batch after ClickHouse acknowledged the batch and before its offsets are
-- committed (warehouse/queries/feedback.py, refresh_traces): a crash in between re-delivers
-- the batch, which rewrites them again.
--
-- version = Σ updated_at (ms) of the trace's latest feedback versions. It grows with every
-- change the trace's feedback can undergo (a new feedback adds a term, an update replaces
-- a term by a later one, a redelivery changes nothing), so of two rewrites the one that saw
-- more keeps the higher version, whatever order two ingest workers write them in:
-- ReplacingMergeTree keeps it. Read with FINAL.
CREATE TABLE IF NOT EXISTS feedback_traces
(
    organisation_id LowCardinality(String),
    trace_hash      UInt64,
    feedbacks       UInt64,
    weighted_sum    Float64,
    weight_sum      Float64,
    score_values    Array(Int8),
    score_counts    Array(UInt64),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (organisation_id, trace_hash);

-- Every trace that has feedback now. Batches ingested meanwhile rewrite their traces
-- after this; the version orders the two.
INSERT INTO feedback_traces
SELECT organisation_id, trace_hash, count(), sum(value * weight), sum(weight),
       (sumMap([value], [toUInt64(1)]) AS scores).1, scores.2, sum(toUInt64(toUnixTimestamp64Milli(updated_at)))
FROM feedback FINAL
GROUP BY organisation_id, trace_hash;
