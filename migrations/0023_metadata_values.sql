-- Metadata groups (`/analytics/groups/metadata/{key}`) without reading the metadata strings.
--
-- metadata_key_hashes: cityHash64 of each key, aligned with metadata_pairs (0016: a key's
--   first occurrence only). A request's pair for key K is
--   metadata_pairs[indexOf(metadata_key_hashes, cityHash64(K))], 0 when it has no K: a
--   metadata group groups requests by that 8-byte integer instead of reading both string
--   arrays (on the 10M-row benchmark, `env` over one workspace's month 71–79 → 56–64 ms;
--   under filters, which copy the string arrays row by row, 130–150 → 82–88 ms).
-- metadata_values: the text behind each pair hash, per organisation and workspace, so a
--   group's value comes from a lookup of the few groups instead of the scan. The
--   generations ingest writes the pairs of a batch here BEFORE the batch itself (ingest/sink.py),
--   so a stored request's pair always has its text. Versioned by the latest request
--   seen with it (`last_seen`), which the retention TTL of generations also applies to
--   (warehouse/migrate.py): a text leaves once no request that carries it is kept.
--
-- Parts written before this migration compute metadata_key_hashes on read until the
-- MATERIALIZE below (a background mutation) rewrites them; results are the same either
-- way. Stop the ingest of an older release before migrating (docs/deploy.md): it does not
-- write metadata_values.
ALTER TABLE generations
    ADD COLUMN IF NOT EXISTS metadata_key_hashes Array(UInt64)
    MATERIALIZED arrayMap(i -> cityHash64(metadata.key[i]),
                          arrayFilter(i -> indexOf(metadata.key, metadata.key[i]) = i, arrayEnumerate(metadata.key)));

ALTER TABLE generations MATERIALIZE COLUMN metadata_key_hashes;

CREATE TABLE IF NOT EXISTS metadata_values
(
    organisation_id LowCardinality(String),
    workspace_slug  LowCardinality(String),
    key             String,
    value           String,
    pair_hash       UInt64 MATERIALIZED cityHash64(key, value),
    last_seen       DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(last_seen)
ORDER BY (organisation_id, workspace_slug, key, value);

INSERT INTO metadata_values (organisation_id, workspace_slug, key, value, last_seen)
SELECT organisation_id, workspace_slug, k, v, max(created_at)
FROM generations ARRAY JOIN metadata.key AS k, metadata.value AS v
GROUP BY organisation_id, workspace_slug, k, v;
