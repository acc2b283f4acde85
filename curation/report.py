"""`curation report RUN`: one self-contained HTML page (no scripts, images inlined) about a run.

Counts per stage and reason, the funnel of every video (clips cut, usable, kept), a histogram of every filter score
(kept vs rejected at that stage, with the stage's threshold drawn: `Stage.thresholds`), a grid of kept sample clips
and a few rejected clips per reason (a frame from the clip's samples with what each stage found drawn on it:
`Stage.draw`; each stage's line about it: `Stage.describe`; its images such as reference crops: `Stage.gallery`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from curation.config import run_stages
from curation.manifest import Manifests, atomic_write_bytes
from curation.runstore import local
from curation.samples import SAMPLES_COLUMN, read_samples
from curation.stage import Row, Stage

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:300px;border:1px solid #ddd;padding:6px;font-size:12px}
.card img{width:100%}
.card img.crop{width:auto;height:64px;margin:2px;border:1px solid #ccc}
.ok{color:#197a19}.reject{color:#a35a00}.error{color:#b00020}.hist{display:inline-block}
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _histograms(m: Manifests, stages: list[Stage[Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for st in stages:
        stage = st.name
        if st.score_column is None or not m.has(stage):
            continue
        # the headline score, then any other score the stage decides on (watermark's stay score), where recorded
        lines = st.thresholds()
        have = {r["column_name"] for r in m.rows(f'DESCRIBE "{stage}"')}
        for col in [st.score_column, *(c for c in lines if c != st.score_column)]:
            if col not in have:
                continue
            rows = m.rows(f'SELECT {col} AS v, {stage}_status AS s FROM "{stage}" WHERE {col} IS NOT NULL')
            if not rows:
                continue
            fig = histogram(col, [(r["v"], r["s"]) for r in rows], lines.get(col, []))
            out.append((col, _png(fig)))
            plt.close(fig)
    return out


def histogram(col: str, values: list[tuple[float, str]], lines: list[tuple[float, str]]) -> Any:
    """A score's histogram, kept vs rejected stacked, with the stage's threshold lines drawn."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6))
    kept = [v for v, s in values if s == "ok"]
    rejected = [v for v, s in values if s != "ok"]
    ax.hist([kept, rejected], bins=20, stacked=True, label=["kept", "rejected"], color=["#3a8f3a", "#d08a2e"])
    for value, kind in lines:
        ax.axvline(value, color="#b00020", linestyle="--", linewidth=1.2, label=f"{kind} {value:g}")
    ax.set_title(f"{col} (n={len(values)})", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _thumb(row: Row, stages: list[Stage[Any]]) -> str | None:
    """The clip's middle sample, with every stage's findings drawn on it."""
    path = row.get(SAMPLES_COLUMN)
    if not path or not local(path).is_file():  # recorded on another machine: this one's copy
        return None
    samples = read_samples(path)
    k = len(samples["frames"]) // 2
    img = np.ascontiguousarray(samples["frames"][k][..., ::-1])  # RGB -> BGR for OpenCV
    for stage in stages:
        if row.get(f"{stage.name}_status") is not None:
            stage.draw(row, int(samples["indices"][k]), img)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf).decode() if ok else None


def _gallery(stage: Stage[Any], row: Row) -> list[tuple[str, str, bytes]]:
    """A stage's images for the card; none when its files are gone (a run directory moved or cleaned)."""
    try:
        return stage.gallery(row)
    except OSError as exc:
        log.warning("report: %s images of clip %s unavailable: %s", stage.name, row.get("clip_id"), exc)
        return []


def _card(r: Row, stages: list[Stage[Any]], kind: str) -> str:
    """A clip: its frame with the stages' findings, status and reason, each stage's line, images, scores."""
    src = _thumb(r, stages)
    cols = [c.score_column for c in stages if c.score_column]
    lines = [d for st in stages if r.get(f"{st.name}_status") is not None and (d := st.describe(r))]
    images = [g for st in stages if r.get(f"{st.name}_status") is not None for g in _gallery(st, r)]
    scores = ", ".join(f"{k}={r[k]:.3g}" for k in cols if isinstance(r.get(k), float))
    status = r.get("status") or "pending"
    crops = "".join(
        f'<img class="crop" alt="{html.escape(label)}" title="{html.escape(label)}" '
        f'src="data:{mime};base64,{base64.b64encode(data).decode()}">'
        for label, mime, data in images
    )
    return (
        f'<div class="card {kind}">{f"<img alt=clip src={src}>" if src else ""}'
        f'<div class="{html.escape(status)}"><b>{html.escape(status)}</b> '
        f"{html.escape(r.get('reason') or '')}</div>"
        f"<div>{html.escape(Path(r['uri']).name)} [{r['clip_start_frame']}, {r['clip_end_frame']})</div>"
        + "".join(f"<div><i>{html.escape(line)}</i></div>" for line in lines)
        + (f'<div class="crops">{crops}</div>' if crops else "")
        + f"<div>{html.escape(scores)}</div></div>"
    )


def _table(rows: list[Row], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if r.get(c) is None else str(r[c]))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def build_report(
    run_dir: str | Path, out: str | Path | None = None, samples: int = 12, rejected_per_reason: int = 2
) -> Path:
    run_dir = Path(run_dir)
    m = Manifests(run_dir)
    parts = [f"<h1>musa-curation run: {html.escape(str(run_dir))}</h1>"]
    videos = m.rows("SELECT status, count(*) AS n FROM videos GROUP BY 1 ORDER BY 1")
    clips = m.rows("SELECT status, reason, count(*) AS n FROM clips GROUP BY ALL ORDER BY n DESC")
    funnel = m.rows(
        "SELECT regexp_extract(uri, '[^/]*$') AS file, status, reason, n_clips, n_clips_ok, n_clips_kept "
        "FROM videos ORDER BY file"
    )
    parts += [
        "<h2>Videos</h2>",
        _table(videos, ["status", "n"]),
        "<h2>Per video: clips cut, usable, kept</h2>",
        _table(funnel, ["file", "status", "reason", "n_clips", "n_clips_ok", "n_clips_kept"]),
        "<h2>Clips by status and reason</h2>",
        _table(clips, ["status", "reason", "n"]),
    ]
    stages = run_stages(run_dir)
    per_stage = []
    for name in (st.name for st in stages):
        if m.has(name):
            per_stage += m.rows(
                f"SELECT '{name}' AS stage, {name}_status AS status, {name}_reason AS reason, "
                f'count(*) AS n FROM "{name}" GROUP BY ALL ORDER BY n DESC'
            )
    parts += ["<h2>Per stage</h2>", _table(per_stage, ["stage", "status", "reason", "n"])]
    runs = m.rows("SELECT * FROM stage_runs ORDER BY stage_runs_ts") if m.has("stage_runs") else []
    if runs:
        parts += [
            "<h2>Stage runs</h2>",
            _table(
                runs, ["stage", "runner", "inputs", "ok", "reject", "error", "seconds", "workers", "peak_worker_rss_mb"]
            ),
        ]
    hists = _histograms(m, stages)
    if hists:
        parts.append("<h2>Scores</h2>")
        parts += [f'<div class="hist"><img alt="{html.escape(c)}" src="{src}"></div>' for c, src in hists]
    rows = m.rows(
        f"SELECT * FROM clips WHERE {SAMPLES_COLUMN} IS NOT NULL ORDER BY (status = 'ok') DESC, clip_id LIMIT ?",
        [samples],
    )
    parts += ["<h2>Sample clips</h2>", f'<div class="grid">{"".join(_card(r, stages, "sample") for r in rows)}</div>']
    rejected = m.rows(
        f"SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY reason ORDER BY clip_id) AS _k FROM clips "
        f"WHERE status = 'reject' AND {SAMPLES_COLUMN} IS NOT NULL) WHERE _k <= ? ORDER BY reason, clip_id",
        [rejected_per_reason],
    )
    if rejected:
        parts += [
            "<h2>Rejected clips, by reason</h2>",
            f'<div class="grid">{"".join(_card(r, stages, "rejected") for r in rejected)}</div>',
        ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>musa-curation report</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    target = Path(out) if out else run_dir / "report.html"
    atomic_write_bytes(target, page.encode("utf-8"))
    return target
