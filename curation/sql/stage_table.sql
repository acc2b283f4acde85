-- One stage's table: every part file, keeping only the latest attempt per input key.
-- A rerun writes new parts instead of editing old ones; this view is what makes the newest attempt win
-- (for a split stage such as scenecut, all clips of a video's newest attempt win together).
-- The same row in two parts (a compaction killed between writing its part and removing the parts it folded)
-- is kept once, so such a crash never shows as duplicates.
SELECT * EXCLUDE (_attempt, _copy, filename) FROM (
    SELECT
        *,
        dense_rank() OVER (PARTITION BY $key ORDER BY $ts_col DESC) AS _attempt,
        row_number() OVER (PARTITION BY $row_id, $ts_col ORDER BY filename) AS _copy
    FROM read_parquet($files, union_by_name = true, filename = true)
) WHERE _attempt = 1 AND _copy = 1
