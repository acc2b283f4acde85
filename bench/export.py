"""Export speed: clips/s of each `curation export` format against the issue's floor (20 clips/s for the JSON formats).

    python bench/export.py [--clips 400] [--run RUN]

Without `--run` it runs the pipeline (probe .. crops, package) on the shared media with the hand-written captions of
`tests/data/media_captions.csv`, then makes a corpus of `--clips` samples by writing the run's real samples again
under new clip ids into more shards (same members, so every format has real masks, crops and references to write).
Each format is exported into one folder, in turn, from a cold start; the report gives clips/s, the ratio to the
floor, and how many media files the formats shared (written once under `media/`, hard-linked into the layouts).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curation.config import build_config  # noqa: E402
from curation.export import FORMATS, export  # noqa: E402
from curation.pipeline import Pipeline  # noqa: E402

MEDIA = REPO.parent / "shared" / "media" / "video"
FLOOR = 20.0
JSON_FORMATS = ("opens2v", "concat-id", "opens2v-eval")


def make_run(folder: Path) -> Path:
    rows = list(csv.DictReader(x for x in (REPO / "tests/data/media_captions.csv").open() if not x.startswith("#")))
    lst = folder / "list.csv"
    with lst.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        for r in rows:
            w.writerow([str(MEDIA / r["file"]), r["caption"]])
    stages = ["probe", "scenecut", "caption", "subjects", "identity", "crops", "package"]
    cfg = build_config({"runner": "local", "progress": False, "stages": stages, "identity": {"scope": "run"}})
    Pipeline(cfg, folder / "run").run(str(lst))
    return folder / "run"


def grow(run: Path, clips: int, per_shard: int = 100) -> int:
    """Write the run's samples again under new clip ids (hash of the old id and the copy number) until the shards
    hold `clips` samples; returns how many there are."""
    samples: list[list[tuple[str, bytes]]] = []
    for shard in sorted((run / "shards").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            cur: dict[str, list[tuple[str, bytes]]] = {}
            for m in tar:
                f = tar.extractfile(m)
                cur.setdefault(m.name.split(".", 1)[0], []).append((m.name, f.read() if f else b""))
            samples += list(cur.values())
    have = len(samples)
    n, copy, number = have, 0, len(list((run / "shards").glob("shard-*.tar")))
    while n < clips:
        copy += 1
        with tarfile.open(run / "shards" / f"shard-{number:06d}.tar", "w") as tar:
            for members in samples:
                if n >= clips:
                    break
                old = members[0][0].split(".", 1)[0]
                new = hashlib.sha1(f"{old}:{copy}".encode()).hexdigest()[:16]
                for name, data in members:
                    if name.endswith(".json") and name.count(".") == 1:
                        meta = json.loads(data)
                        meta["clip_id"] = new
                        data = json.dumps(meta).replace(old, new).encode()
                    info = tarfile.TarInfo(new + name[len(old) :])
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        number += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--run", help="an existing run directory (copied first: the copy's shards are grown)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.run:
            import shutil

            run = Path(tmp) / "run"
            shutil.copytree(args.run, run)
        else:
            run = make_run(Path(tmp))
        made = time.perf_counter() - t0
        n = grow(run, args.clips)
        out = Path(tmp) / "export"
        print(f"corpus: {n} clips ({'given run' if args.run else f'pipeline run {made:.0f} s'}, grown to {n})")
        print("| format | clips/s | ok | skipped | vs 20 clips/s |")
        print("|---|---|---|---|---|")
        for fmt in FORMATS:
            rep = export(fmt, run, out)
            rate = n / rep.seconds
            floor = f"{rate / FLOOR:.1f}x" if fmt in JSON_FORMATS else "(not a JSON format)"
            print(f"| {fmt} | {rate:.0f} | {rep.ok} | {sum(rep.skipped.values())} | {floor} |")
        media = [p for p in (out / "media").rglob("*") if p.is_file()]
        linked = sum(p.stat().st_nlink > 1 for p in media)
        print(f"media files written once: {len(media)}, of which hard-linked into a layout: {linked}")


if __name__ == "__main__":
    main()
