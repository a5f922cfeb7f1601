-- API keys (control plane, written by the API and the CLI directly). Only the
-- SHA-256 of a key is stored. Every change is a new version of the row; read with
-- FINAL (or argMax by version) to see the current state.
CREATE TABLE IF NOT EXISTS api_keys
(
    id              String,
    key_hash        String,
    name            String DEFAULT '',
    organisation_id LowCardinality(String),
    workspace_slug  LowCardinality(String) DEFAULT '',
    scopes          Array(LowCardinality(String)),
    status          LowCardinality(String) DEFAULT 'active',
    created_at      DateTime64(3, 'UTC'),
    updated_at      DateTime64(3, 'UTC'),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY id;
