-- One row per clip the split stage produced (kept or not), joined with its source video and every clip-level stage.
-- `clip_*` are the split stage's clip geometry under stage-independent names; `status` / `reason` come from the
-- first stage (in pipeline order) that did not say ok; `shard` is set once the clip is in a WebDataset shard.
-- The joins, columns and status expressions are generated from the installed stages' declarations.
SELECT
    sc.*,
    $clip_aliases
    i.* EXCLUDE (video_id, ingest_ts),
    $video_columns
    $stage_columns
    sh.shard,
    $status_case AS status,
    $reason_case AS reason
FROM (SELECT * FROM "$split" WHERE clip_id IS NOT NULL) sc
LEFT JOIN ingest i USING (video_id)
$video_joins
$joins
LEFT JOIN (SELECT clip_id, shard FROM shards) sh USING (clip_id)
