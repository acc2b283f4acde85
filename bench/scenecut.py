"""Scene cut: our `scenecut` stage vs PySceneDetect, side by side in one run, reported as ratios.

    python bench/scenecut.py [--media DIR] [--repeat N] [--no-memory]

(a) Speed at equal cuts, over every decodable video in the media folder (default ../shared/media/video):
    - ours:  the `scenecut` stage's process_batch (one decode pass, detection + frame samples written to disk)
    - CLI:   `scenedetect -i X detect-content -t 27 -m 15 list-scenes -n`, once per video (how it is used from a shell)
    - API:   PySceneDetect's `detect()` in-process (same detector settings), for context
    Cuts must agree within one frame for every video, or the run fails.
(b) Peak memory of the scan on generated 1-minute and 10-minute videos (flat means the ratio stays near 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curation.stage import registry  # noqa: E402
from curation.stages.scenecut import Scenecut, ScenecutConfig  # noqa: E402
from curation.synthetic import concat_sources  # noqa: E402

THRESHOLD, MIN_LEN = 27.0, 15


def ours(videos: list[Path], workdir: Path) -> tuple[float, dict[str, list[int]]]:
    cfg = ScenecutConfig(threshold=THRESHOLD, min_scene_len=MIN_LEN, max_clip_s=None)
    stage = Scenecut(cfg)
    stage.bind(workdir)
    t0 = time.perf_counter()
    rows = stage.run_batch([{"video_id": f"v{i}", "uri": str(v)} for i, v in enumerate(videos)])
    wall = time.perf_counter() - t0
    cuts: dict[str, list[int]] = {str(v): [] for v in videos}
    for r in rows:
        if r["scenecut_start_reason"] == "cut":
            cuts[str(videos[int(r["video_id"][1:])])].append(r["scenecut_start_frame"])
    return wall, {k: sorted(v) for k, v in cuts.items()}


def cli(videos: list[Path]) -> tuple[float, dict[str, list[int]]]:
    exe = Path(sys.executable).with_name("scenedetect")
    cuts: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for v in videos:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                [
                    str(exe),
                    "-q",
                    "-i",
                    str(v),
                    "-o",
                    out,
                    "detect-content",
                    "-t",
                    str(THRESHOLD),
                    "-m",
                    str(MIN_LEN),
                    "list-scenes",
                    "-s",
                    "-q",
                    "-f",
                    "scenes.csv",
                ],
                check=True,
                capture_output=True,
            )
            lines = (Path(out) / "scenes.csv").read_text().splitlines()
            # header row, then one row per scene; "Start Frame" is 1-based
            rows = list(csv.DictReader(lines))
            cuts[str(v)] = [int(r["Start Frame"]) - 1 for r in rows][1:]
    wall = time.perf_counter() - t0
    return wall, cuts


def api(videos: list[Path]) -> tuple[float, dict[str, list[int]]]:
    from scenedetect import ContentDetector, detect

    cuts: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for v in videos:
        scenes = detect(str(v), ContentDetector(threshold=THRESHOLD, min_scene_len=MIN_LEN))
        cuts[str(v)] = [s[0].frame_num for s in scenes][1:]
    return time.perf_counter() - t0, cuts


def _peak_rss_child(video: Path) -> tuple[float, float]:
    """Scan `video` in a fresh process; returns (peak RSS MiB, seconds)."""
    code = (
        f"import sys,time,resource;sys.path.insert(0,{str(REPO)!r});"
        "from curation.video import scan_video, FastContentDetector;"
        f"t=time.perf_counter();scan_video({str(video)!r},"
        " FastContentDetector(threshold=27, min_scene_len=15), lambda s: None, max_len_frames=375);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def memory(tmp: Path) -> dict[str, float]:
    res: dict[str, float] = {}
    for minutes in (1, 10):
        path = tmp / f"gen_{minutes}min.mp4"
        concat_sources(
            path,
            ["testsrc2"],
            60.0 * minutes,
            size="640x360",
            fps=25,
            codec_args=["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
        )
        rss, secs = _peak_rss_child(path)
        res[f"peak_rss_mib_{minutes}min"], res[f"scan_s_{minutes}min"] = rss, secs
    res["peak_rss_ratio_10min_vs_1min"] = res["peak_rss_mib_10min"] / res["peak_rss_mib_1min"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--media", type=Path, default=REPO.parent / "shared" / "media" / "video")
    ap.add_argument("--repeat", type=int, default=2, help="best of N timings for each side")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "scenecut.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    registry()
    videos = sorted(p for p in args.media.iterdir() if p.is_file() and "truncated" not in p.name and p.suffix != ".md")
    frames = 0
    import av

    for v in videos:
        with av.open(str(v)) as c:
            frames += sum(1 for _ in c.decode(video=0))
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        t_ours, cuts_ours = min((ours(videos, tmp / f"o{i}") for i in range(args.repeat)), key=lambda x: x[0])
        t_api, cuts_api = min((api(videos) for _ in range(args.repeat)), key=lambda x: x[0])
        t_cli, cuts_cli = min((cli(videos) for _ in range(args.repeat)), key=lambda x: x[0])
        mismatched = [
            f"{Path(k).name} ({side})"
            for side, ref in (("cli", cuts_cli), ("api", cuts_api))
            for k in ref
            if len(ref[k]) != len(cuts_ours[k])
            or any(abs(a - b) > 1 for a, b in zip(ref[k], cuts_ours[k], strict=True))
        ]
        report: dict[str, object] = {
            "videos": len(videos),
            "frames": frames,
            "ours_s": round(t_ours, 3),
            "scenedetect_cli_s": round(t_cli, 3),
            "scenedetect_api_s": round(t_api, 3),
            "speedup_vs_cli": round(t_cli / t_ours, 2),
            "speedup_vs_api": round(t_api / t_ours, 2),
            "ours_fps": round(frames / t_ours, 1),
            "cuts_equal_within_1_frame": not mismatched,
            "mismatched": mismatched,
        }
        if not args.no_memory:
            report.update({k: round(v, 2) for k, v in memory(tmp).items()})
    print(f"{'':24s}{'seconds':>10s}{'ratio':>10s}")
    print(f"{'ours (scenecut stage)':24s}{t_ours:10.2f}{1.0:10.2f}")
    print(f"{'scenedetect CLI':24s}{t_cli:10.2f}{t_cli / t_ours:10.2f}")
    print(f"{'scenedetect API':24s}{t_api:10.2f}{t_api / t_ours:10.2f}")
    print(json.dumps(report, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
