-- One row per input video: what ingest found, what each video-level stage measured, how many clips the split stage
-- made and kept, how many the whole pipeline kept, and a status: the first video-level stage that did not say ok,
-- else the split stage's video-level error, else `reject` when no clip was usable (`<split>:no_usable_clips`) or
-- none survived the pipeline (`no_clip_kept`). Generated from the installed stages' declarations.
SELECT
    i.*,
    $video_columns
    coalesce(s.n_clips, 0) AS n_clips,
    coalesce(s.n_clips_ok, 0) AS n_clips_ok,
    coalesce(k.n_kept, 0) AS n_clips_kept,
    s.video_status AS ${split}_video_status,
    s.video_reason AS ${split}_video_reason,
    s.video_error AS ${split}_video_error,
    $status_case AS status,
    $reason_case AS reason
FROM ingest i
$video_joins
LEFT JOIN (
    SELECT
        video_id,
        count(clip_id) AS n_clips,
        count(clip_id) FILTER (WHERE ${split}_status = 'ok') AS n_clips_ok,
        max(${split}_status) FILTER (WHERE clip_id IS NULL) AS video_status,
        max(${split}_reason) FILTER (WHERE clip_id IS NULL) AS video_reason,
        max(${split}_error) FILTER (WHERE clip_id IS NULL) AS video_error
    FROM "$split"
    GROUP BY video_id
) s USING (video_id)
LEFT JOIN (
    SELECT
        video_id,
        count(*) FILTER (WHERE status = 'ok') AS n_kept,
        count(*) FILTER (WHERE status = 'pending') AS n_pending
    FROM clips
    GROUP BY video_id
) k USING (video_id)
