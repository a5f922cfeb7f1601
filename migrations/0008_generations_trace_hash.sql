-- 64-bit hash of trace_id, materialized. The feedback join first keeps the requests
-- whose trace has feedback by probing a set of these hashes: reading 8 bytes per row
-- instead of the trace_id string. The join itself stays on the exact trace_id.
ALTER TABLE generations
    ADD COLUMN IF NOT EXISTS trace_hash UInt64
    MATERIALIZED cityHash64(trace_id);
