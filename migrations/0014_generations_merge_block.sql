-- Merges read a block of merge_max_block_size rows from every part they merge. A
-- generations row carries its request and response (about 1.5 KB), so the default
-- 8,192 rows per block made a merge of a few parts hold over 100 MB; 2,048 keeps the
-- embedded ingest process well under 1 GiB (benchmarks/ingest.py) at no visible cost.
ALTER TABLE generations MODIFY SETTING merge_max_block_size = 2048;
