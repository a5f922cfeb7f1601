-- API keys managed through /v1/api-keys: what the Portkey SDK sends besides name
-- and scopes. `sub_type` is Portkey's `service` / `user`; the key's type
-- (organisation or workspace) is whether `workspace_slug` is set. Every version of
-- a row carries all columns, so ReplacingMergeTree(version) keeps them together.
ALTER TABLE api_keys
    ADD COLUMN IF NOT EXISTS description String DEFAULT '',
    ADD COLUMN IF NOT EXISTS sub_type LowCardinality(String) DEFAULT 'service',
    ADD COLUMN IF NOT EXISTS user_id String DEFAULT '';
