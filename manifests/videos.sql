-- One row per input video: what ingest found, what probe measured, how many clips scene cut made, and a status.
SELECT
    i.*,
    p.* EXCLUDE (video_id),
    coalesce(s.n_clips, 0) AS n_clips,
    coalesce(s.n_clips_ok, 0) AS n_clips_ok,
    s.scenecut_video_status,
    s.scenecut_video_error,
    CASE
        WHEN p.probe_status IS NULL THEN 'pending'
        WHEN p.probe_status <> 'ok' THEN p.probe_status
        WHEN s.scenecut_video_status IS NOT NULL THEN s.scenecut_video_status
        WHEN s.n_clips IS NULL THEN 'pending'
        ELSE 'ok'
    END AS status,
    CASE
        WHEN p.probe_status IS NOT NULL AND p.probe_status <> 'ok' THEN 'probe:' || coalesce(p.probe_reason, '')
        WHEN s.scenecut_video_status IS NOT NULL THEN 'scenecut:' || coalesce(s.scenecut_video_reason, '')
    END AS reason
FROM ingest i
LEFT JOIN probe p USING (video_id)
LEFT JOIN (
    SELECT
        video_id,
        count(clip_id) AS n_clips,
        count(clip_id) FILTER (WHERE scenecut_status = 'ok') AS n_clips_ok,
        max(scenecut_status) FILTER (WHERE clip_id IS NULL) AS scenecut_video_status,
        max(scenecut_reason) FILTER (WHERE clip_id IS NULL) AS scenecut_video_reason,
        max(scenecut_error) FILTER (WHERE clip_id IS NULL) AS scenecut_video_error
    FROM scenecut
    GROUP BY video_id
) s USING (video_id)
