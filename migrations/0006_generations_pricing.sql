-- How a generation's cost came about (docs/events.md, `metrics.pricing_status`):
-- '' when the event brought its own cost (a gateway log), otherwise set by Tollgate
-- when it priced a custom log (POST /v1/logs) from the bundled pricing table:
-- 'priced', 'unknown_model' (no price for the provider/model: cost is NULL) or
-- 'no_usage' (a successful response without a usage block: cost is NULL).
ALTER TABLE generations
    ADD COLUMN IF NOT EXISTS pricing_status LowCardinality(String) DEFAULT '';
