-- One stage's table: every part file, keeping only the latest attempt per input key.
-- A rerun writes new parts instead of editing old ones; this view is what makes the newest attempt win
-- (for a fan-out stage such as scenecut, all clips of a video's newest attempt win together).
SELECT * EXCLUDE (_attempt) FROM (
    SELECT *, dense_rank() OVER (PARTITION BY $input_key ORDER BY $ts_col DESC) AS _attempt
    FROM read_parquet('$glob', union_by_name = true)
) WHERE _attempt = 1
