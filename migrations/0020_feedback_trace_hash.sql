-- 64-bit hash of the feedback's trace_id, materialized like generations.trace_hash
-- (0008). Feedback queries group and join traces on these 8-byte integers instead of
-- the trace_id strings on both sides: the generations side then never reads trace_id
-- at all (docs/analytics.md, "Feedback": exact unless two different trace ids of one
-- organisation share a 64-bit hash). Parts written before this migration compute it on
-- read.
ALTER TABLE feedback
    ADD COLUMN IF NOT EXISTS trace_hash UInt64
    MATERIALIZED cityHash64(trace_id);
