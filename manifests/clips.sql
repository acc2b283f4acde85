-- One row per clip scene cut produced (kept or not), joined with its source video and every clip-level stage.
-- `status` / `reason` come from the first stage (in pipeline order) that did not say ok; `shard` is set once the
-- clip is in a WebDataset shard. The joins and the status expressions are generated from the registered stages.
SELECT
    sc.*,
    i.uri,
    i.given_caption,
    i.given_caption_source,
    $probe_columns
    $stage_columns
    sh.shard,
    $status_case AS status,
    $reason_case AS reason
FROM (SELECT * FROM scenecut WHERE clip_id IS NOT NULL) sc
LEFT JOIN ingest i USING (video_id)
LEFT JOIN probe p USING (video_id)
$joins
LEFT JOIN (SELECT clip_id, shard FROM shards) sh USING (clip_id)
