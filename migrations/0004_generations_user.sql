-- The request's user (metadata `_user`, '' when absent) as its own column.
-- Users graphs and groups read it instead of the metadata arrays, which are the
-- widest columns of the table. MATERIALIZED: computed on insert (and on the fly for
-- parts written before this migration); SELECT * does not return it.
ALTER TABLE generations
    ADD COLUMN IF NOT EXISTS metadata_user LowCardinality(String)
    MATERIALIZED metadata.value[indexOf(metadata.key, '_user')];
