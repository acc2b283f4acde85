"""`curation report RUN`: one self-contained HTML page (no scripts, images inlined) about a run.

Counts per stage and reason, a histogram of every filter score (kept vs rejected at that stage), and a grid of
sample clips (a frame from the scene-cut samples, with OCR boxes and subject masks drawn) with their caption,
subjects and status.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from curation.manifest import Manifests, atomic_write_bytes
from curation.masks import rle_decode
from curation.stage import Row, registry

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:300px;border:1px solid #ddd;padding:6px;font-size:12px}
.card img{width:100%}.ok{color:#197a19}.reject{color:#a35a00}.error{color:#b00020}.hist{display:inline-block}
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _histograms(m: Manifests) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for stage, cls in registry().items():
        col = cls.score_column
        if col is None or not m.has(stage):
            continue
        rows = m.rows(f'SELECT {col} AS v, {stage}_status AS s FROM "{stage}" WHERE {col} IS NOT NULL')
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(4, 2.6))
        kept = [r["v"] for r in rows if r["s"] == "ok"]
        rejected = [r["v"] for r in rows if r["s"] != "ok"]
        ax.hist([kept, rejected], bins=20, stacked=True, label=["kept", "rejected"], color=["#3a8f3a", "#d08a2e"])
        ax.set_title(f"{col} (n={len(rows)})", fontsize=10)
        ax.legend(fontsize=8)
        out.append((col, _png(fig)))
        plt.close(fig)
    return out


_COLOURS = [(60, 180, 75), (230, 50, 240), (255, 225, 25), (0, 130, 200), (245, 130, 48), (70, 240, 240)]


def _mask_doc(row: Row) -> dict[str, Any] | None:
    d = row.get("subjects_dir")
    path = Path(d) / "masks.json" if d else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def _thumb(row: Row) -> str | None:
    path = row.get("scenecut_samples_path")
    if not path or not Path(path).is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        frames, indices = z["frames"], z["indices"]
    doc = _mask_doc(row)
    start = int(row.get("scenecut_start_frame") or 0)
    if doc and doc["frames"]:  # the sample nearest to a masked frame, so the overlay matches what is shown
        k = min(range(len(indices)), key=lambda i: min(abs(int(indices[i]) - start - p) for p in doc["frames"]))
    else:
        k = len(frames) // 2
    img = np.ascontiguousarray(frames[k][..., ::-1])  # RGB -> BGR for OpenCV
    h, w = img.shape[:2]
    if doc and doc["frames"]:
        t = min(range(len(doc["frames"])), key=lambda i: abs(doc["frames"][i] - (int(indices[k]) - start)))
        for n, (key, rles) in enumerate(sorted(doc["tracks"].items())):
            m = cv2.resize(rle_decode(rles[t]), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            colour = np.array(_COLOURS[n % len(_COLOURS)], np.float32)
            img[m] = (0.5 * img[m] + 0.5 * colour).astype(np.uint8)
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, contours, -1, _COLOURS[n % len(_COLOURS)], 1)
            ys, xs = np.nonzero(m)
            if len(xs):
                cv2.putText(img, key, (int(xs.min()), max(10, int(ys.min()) - 2)), 0, 0.4, (255, 255, 255), 1)
    for box in json.loads(row.get("ocr_boxes") or "[]"):
        if box.get("frame") == int(indices[k]):
            pts = np.array([[x * w, y * h] for x, y in box["box"]], np.int32)
            cv2.polylines(img, [pts], True, (0, 0, 255), 2)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf).decode() if ok else None


def _table(rows: list[Row], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if r.get(c) is None else str(r[c]))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def build_report(run_dir: str | Path, out: str | Path | None = None, samples: int = 12) -> Path:
    run_dir = Path(run_dir)
    m = Manifests(run_dir)
    parts = [f"<h1>musa-curation run: {html.escape(str(run_dir))}</h1>"]
    videos = m.rows("SELECT status, count(*) AS n FROM videos GROUP BY 1 ORDER BY 1")
    clips = m.rows("SELECT status, reason, count(*) AS n FROM clips GROUP BY ALL ORDER BY n DESC")
    parts += [
        "<h2>Videos</h2>",
        _table(videos, ["status", "n"]),
        "<h2>Clips by status and reason</h2>",
        _table(clips, ["status", "reason", "n"]),
    ]
    per_stage = []
    for name in registry():
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
    hists = _histograms(m)
    if hists:
        parts.append("<h2>Scores</h2>")
        parts += [f'<div class="hist"><img alt="{html.escape(c)}" src="{src}"></div>' for c, src in hists]
    rows = m.rows(
        "SELECT * FROM clips WHERE scenecut_samples_path IS NOT NULL ORDER BY (status = 'ok') DESC, clip_id LIMIT ?",
        [samples],
    )
    cards = []
    for r in rows:
        src = _thumb(r)
        subjects = json.loads(r.get("caption_subjects") or "[]")
        names = ", ".join(
            f"{s['name']} ({', '.join(a['text'] for a in s['attributes'])})" if s["attributes"] else s["name"]
            for s in subjects
        )
        cols = [c.score_column for c in registry().values() if c.score_column]
        scores = ", ".join(f"{k}={r[k]:.3g}" for k in cols if isinstance(r.get(k), float))
        status = r.get("status") or "pending"
        cards.append(
            f'<div class="card">{f"<img alt=clip src={src}>" if src else ""}'
            f'<div class="{html.escape(status)}"><b>{html.escape(status)}</b> '
            f"{html.escape(r.get('reason') or '')}</div>"
            f"<div>{html.escape(Path(r['uri']).name)} [{r['scenecut_start_frame']}, {r['scenecut_end_frame']})</div>"
            f"<div><i>{html.escape(r.get('caption_text') or r.get('given_caption') or '')}</i></div>"
            f"<div>subjects: {html.escape(names or '-')}</div><div>{html.escape(scores)}</div></div>"
        )
    parts += ["<h2>Sample clips</h2>", f'<div class="grid">{"".join(cards)}</div>']
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>musa-curation report</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    target = Path(out) if out else run_dir / "report.html"
    atomic_write_bytes(target, page.encode("utf-8"))
    return target
