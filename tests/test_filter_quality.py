"""Filter decisions against labels: the shared media (`media_labels.csv`) and the drawn cases
(`filter_cases.csv`, made by `tests/filter_cases.py`), per split, with the rules' parts checked on their own.

The P/R table is printed (`pytest -s`) and kept in docs/benchmarks.md. Gates: burnt-in text (ocr) and near-static
(motion) precision and recall >= 0.85 on every split; people found (subjects, media only) likewise; watermark
precision >= 0.85 on every split but heldout2, recall >= 0.85 on all cases together (graphic marks with no letters on
a still camera are beyond the embedded backend: see docs).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from curation.stages.motion import moving_area
from curation.stages.ocr import classify_overlays, lift_bands
from curation.stages.watermark import Watermark, stay_evidence, stay_score, text_marks
from tests import filter_cases as fc
from tests.conftest import MEDIA, REPO, VIDEOS, media

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    cases = fc.load_cases()
    folder = fc.render_all(tmp_path_factory.mktemp("cases"), cases)
    rows = fc.score_folder(next(iter(folder.values())).parent, tmp_path_factory.mktemp("cases_run"))
    stages = ("motion", "ocr", "watermark", "subjects")
    media_rows = fc.score_folder(VIDEOS, tmp_path_factory.mktemp("media_run"), stages)
    media = [r for r in csv.DictReader((REPO / "tests" / "data" / "media_labels.csv").open()) if r["burnt_in_text"]]
    for m in media:  # people: the labels' subjects column names persons, people or characters
        m["people"] = "1" if any(w in m["subjects"] for w in ("person", "people", "characters")) else "0"
    labelled = [(c["split"], c, rows.get(f"{c['case']}.mp4", [])) for c in cases]
    assert all(r for _, _, r in labelled), [lab["case"] for _, lab, r in labelled if not r]
    # media files the probe or the scene cut reject (a 3-frame video) have no clip to filter
    labelled += [("media", m, media_rows[m["file"]]) for m in media if m["file"] in media_rows]
    assert sum(s == "media" for s, _, _ in labelled) >= 15
    out = fc.table(labelled)
    everything = [(s, lab, r) for s, lab, r in labelled]
    out.update({("all", k[1]): v for k, v in fc.table([("all", lab, r) for _, lab, r in everything]).items()})
    print("\nsplit     label          n   precision recall  F1    wrong")
    for (split, label), v in sorted(out.items()):
        print(f"{split:9} {label:14} {v['n']:3} {v['precision']:9.2f} {v['recall']:6.2f} {v['f1']:5.2f}  {v['wrong']}")
    return out


def test_the_cases_cover_both_splits_and_every_label() -> None:
    cases = fc.load_cases()
    assert {c["split"] for c in cases} == {"dev", "heldout", "heldout2"}
    dev = {c["base"] for c in cases if c["split"] == "dev"}
    held = {c["base"] for c in cases if c["split"] == "heldout"}
    assert not dev & held  # held-out cases are built on other footage and photos
    for label in fc.LABELS:
        for split in ("dev", "heldout"):
            values = [c[label] for c in cases if c["split"] == split]
            assert values.count("1") >= 3 and values.count("0") >= 3, (label, split)


@pytest.mark.parametrize("split", ["dev", "heldout", "heldout2", "media", "all"])
def test_burnt_in_text_precision_and_recall(results: dict[tuple[str, str], dict[str, Any]], split: str) -> None:
    r = results[(split, "burnt_in_text")]
    assert r["precision"] >= 0.85 and r["recall"] >= 0.85, r


@pytest.mark.parametrize("split", ["dev", "heldout", "heldout2", "all"])
def test_near_static_precision_and_recall(results: dict[tuple[str, str], dict[str, Any]], split: str) -> None:
    r = results[(split, "near_static")]
    assert r["precision"] >= 0.85 and r["recall"] >= 0.85, r


def test_people_found_precision_and_recall(results: dict[tuple[str, str], dict[str, Any]]) -> None:
    r = results[("media", "people")]
    assert r["n"] >= 15 and r["precision"] >= 0.85 and r["recall"] >= 0.85, r


def test_watermark_precision_and_recall(results: dict[tuple[str, str], dict[str, Any]]) -> None:
    for split in ("dev", "heldout", "media", "all"):  # heldout2: 0.83 (left-aligned subtitles read as a mark)
        assert results[(split, "logo")]["precision"] >= 0.85, results[(split, "logo")]
    # 0.86 on all cases since watermark v6's blend test (half-transparent marks on a moving camera); marks on a
    # still camera stay out of the embedded backend's reach by design (docs/benchmarks.md).
    assert results[("all", "logo")]["recall"] >= 0.85, results[("all", "logo")]
    assert results[("media", "logo")]["recall"] == 1.0


def test_marks_on_pans_over_the_dev_photos(tmp_path: Path) -> None:
    """Twenty pans with a half-transparent graphic mark in a corner (opacity 0.45-0.8) and twenty without, over the
    five dev photos (`pan_mark_cases.csv`), through probe, scene cut and watermark. A dev set: the blend test and
    its edge margin were built on it (20 of 20 found, none of the plain pans flagged; watermark v5 found 15)."""
    cases = fc.load_cases(fc.PAN_MARKS)
    fc.render_all(tmp_path / "pans", cases)
    rows = fc.score_folder(tmp_path / "pans", tmp_path / "run", ("watermark",))
    found = [c["case"] for c in cases if fc.flagged(rows[f"{c['case']}.mp4"], "logo")]
    marked = [c["case"] for c in cases if c["logo"] == "1"]
    print(f"\npans with a mark found: {len(set(found) & set(marked))} of {len(marked)}; plain pans flagged: "
          f"{sorted(set(found) - set(marked))}")  # fmt: skip
    assert set(found) <= set(marked)
    assert len(found) >= 18


# ------------------------------------------------------------------------------------------- the rules' parts


def _box(text: str, x0: float, y0: float, x1: float, y1: float, frame: int, overlay: bool) -> dict[str, Any]:
    return {"text": text, "frame": frame, "overlay": overlay, "box": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}


def test_overlay_kinds_follow_place_and_words() -> None:
    boxes = [
        # a clock in a corner: a mark even where the camera is still (no persistence needed)
        _box("2023-04-18 12:30:07", 0.7, 0.9, 0.97, 0.97, 0, False),
        # a copyright line
        _box("(c) 2019 Kestrel Films", 0.02, 0.92, 0.3, 0.98, 0, False),
        # a channel name anchored to the right edge of the top band, in the same place in most samples
        _box("KTV 5", 0.85, 0.02, 0.98, 0.09, 0, True),
        # the same words in the middle of the frame: scene text
        _box("KTV 5", 0.4, 0.4, 0.6, 0.5, 0, True),
        # a sign in the top band that is not at an edge and stays put (fixed camera): scene text
        _box("NOTICE", 0.41, 0.0, 0.72, 0.13, 0, True),
        # subtitles: centred lines of words in the bottom band, in two samples
        _box("Where did you leave the keys?", 0.25, 0.86, 0.75, 0.95, 0, False),
        _box("They're on the table.", 0.3, 0.86, 0.7, 0.95, 1, False),
    ]
    classify_overlays(boxes, 4, band=0.2, edge=0.06)
    assert [b["kind"] for b in boxes] == ["mark", "mark", "mark", None, None, "caption", "caption"]
    one = [_box("Where did you leave the keys?", 0.25, 0.86, 0.75, 0.95, 0, False)]
    classify_overlays(one, 4, band=0.2, edge=0.06)
    assert one[0]["kind"] is None  # one centred line in one of four samples: could be a sign


def test_moving_area_sees_a_small_walker_not_noise() -> None:
    rng = np.random.default_rng(0)
    still = rng.integers(0, 255, (144, 256, 3)).astype(np.uint8)
    noisy = np.stack([np.clip(still + rng.normal(0, 2, still.shape), 0, 255).astype(np.uint8) for _ in range(8)])
    walker = noisy.copy()
    for i in range(8):  # a 14 x 6 px figure moving 12 px between samples
        walker[i, 100:114, 20 + 12 * i : 26 + 12 * i] = 0
    assert moving_area(noisy, (256, 144)) < 0.0005
    assert moving_area(walker, (256, 144)) > 0.003


def test_watermark_reads_the_ocr_marks(tmp_path: Path) -> None:
    frames = np.full((4, 90, 160, 3), 120, np.uint8)
    np.savez(tmp_path / "c.npz", frames=frames, indices=np.arange(4), pairs=np.zeros((4, 2, 9, 16), np.uint8),
             pair_valid=np.ones(4, bool))  # fmt: skip
    boxes = [dict(_box("KTV 5", 0.85, 0.02, 0.98, 0.09, 0, True), kind="mark")]
    base = {"clip_id": "v_0", "video_id": "v", "clip_samples_path": str(tmp_path / "c.npz")}
    stage = Watermark()
    stage.bind(tmp_path)
    marked, plain, scene = stage.run_batch(
        [
            {**base, "ocr_boxes": json.dumps(boxes)},
            {**base, "clip_id": "v_1"},
            {**base, "clip_id": "v_2", "ocr_boxes": json.dumps([{**boxes[0], "kind": None}])},
        ]
    )
    assert (marked["watermark_status"], marked["watermark_text_marks"]) == ("reject", ["KTV 5"])
    assert plain["watermark_status"] == "ok" and scene["watermark_status"] == "ok"
    assert text_marks(None) == []


def test_watermark_reads_ocr_only_when_ocr_runs_before_it(tmp_path: Path) -> None:
    """The frame counter's clock is an ocr mark. With ocr first (and not rejecting overlays itself), watermark
    rejects it from ocr's boxes; with ocr after watermark in `stages`, ocr's columns are in the run's clips view
    all the same, but watermark's input rows leave them out (a rerun must not read a later stage's output)."""
    from curation.config import build_config
    from curation.pipeline import Pipeline

    counter = media("synthetic_reference_counter.mp4")
    marks = {}
    for order in (["ocr", "watermark"], ["watermark", "ocr"]):
        cfg = build_config(
            {
                "runner": "local",
                "progress": False,
                "stages": ["probe", "scenecut", *order],
                "ocr": {"reject_overlays": False},
            }
        )
        pipe = Pipeline(cfg, tmp_path / "_".join(order))
        pipe.run(counter)
        want = ("clip_samples_path", "ocr_boxes") if order[0] == "ocr" else ("clip_samples_path",)
        assert pipe.reads("watermark") == want
        again = pipe.inputs("watermark", rerun="all")
        assert again and all(("ocr_boxes" in r) == (order[0] == "ocr") for r in again)
        rows = pipe.manifests.rows("SELECT * FROM clips")
        marks[order[0]] = [(r["watermark_status"], r["watermark_text_mark_boxes"]) for r in rows]
    assert marks["ocr"] and all(st == "reject" and n > 0 for st, n in marks["ocr"]), marks
    assert marks["watermark"] and all(n == 0 for _, n in marks["watermark"]), marks


def test_moving_area_ignores_a_drifting_camera() -> None:
    """A still scene under a camera creeping sideways (2 px between samples, as a 15 s clip drifting 1 px/s gives at
    this size) changes nothing once the drift is taken out; a walker on it still does."""
    rng = np.random.default_rng(1)
    import cv2

    scene = cv2.GaussianBlur(rng.integers(0, 255, (160, 300, 3)).astype(np.uint8), (5, 5), 0)
    drift = np.stack([scene[8:152, 2 * i : 2 * i + 256] for i in range(8)])
    assert moving_area(drift, (256, 144)) < 0.0005
    walker = drift.copy()
    for i in range(8):
        walker[i, 100:114, 20 + 12 * i : 26 + 12 * i] = 0
    assert moving_area(walker, (256, 144)) > 0.003


def _scene(seed: int, smooth: int = 7) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 255, (200, 400)).astype(np.uint8), (smooth, smooth), 0)


def _panned(scene: np.ndarray, n: int = 8, step: int = 6) -> np.ndarray:
    """Grey samples of a camera panning right `step` px a sample over `scene`, 320 x 180."""
    return np.stack([scene[10:190, step * i : step * i + 320] for i in range(n)])


def _ring(frames: np.ndarray, cx: int, cy: int, alpha: float = 0.7) -> np.ndarray:
    import cv2

    out = frames.copy()
    for f in out:
        layer = f.copy()
        cv2.circle(layer, (cx, cy), 11, 255, 3)
        f[:] = np.round(alpha * layer + (1 - alpha) * f).astype(np.uint8)
    return out


def test_a_mark_that_stays_while_the_camera_pans_is_found_where_it_is() -> None:
    scene = _scene(3)
    plain = _panned(scene)
    marked = _ring(plain, 290, 30)
    share, pairs = stay_evidence(marked)
    assert pairs >= 20
    got = stay_score(share)
    assert got["stay_corner"] == "top_right" and got["stay_score"] > 0.05, got
    share, _ = stay_evidence(plain)
    assert int((share >= 0.7).sum()) == 0  # nothing stays in a plain pan
    # the same ring on a still camera: no pairs, no evidence (a static scene persists too)
    still = _ring(np.stack([scene[10:190, :320]] * 8), 290, 30)
    assert stay_evidence(still)[1] == 0 and stay_score(stay_evidence(still)[0])["stay_score"] == 0.0


def test_an_opaque_mark_does_not_take_over_the_camera_tracking() -> None:
    """A strong static mark has the strongest corners of the picture; tracking leaves the frame's corners out."""
    import cv2

    marked = _panned(_scene(5, smooth=15))
    for f in marked:
        cv2.rectangle(f, (272, 14), (300, 40), 255, -1)
        cv2.putText(f, "+", (276, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 0, 3)
    share, pairs = stay_evidence(marked)
    assert pairs >= 20
    got = stay_score(share)
    assert got["stay_corner"] == "top_right" and got["stay_score"] > 0.05, got


def _grey_mark(frames: np.ndarray, cx: int, cy: int, alpha: float = 0.5) -> np.ndarray:
    """A half-transparent disc in the scene's own mean grey: it changes no level on average, so only the cut
    contrast of the texture passing under it gives it away."""
    import cv2

    out = frames.copy()
    grey = int(frames.mean())
    for f in out:
        layer = f.copy()
        cv2.circle(layer, (cx, cy), 13, grey, -1)
        f[:] = np.round(alpha * layer + (1 - alpha) * f).astype(np.uint8)
    return out


def test_a_half_transparent_mark_over_busy_texture_is_found_by_its_cut_contrast() -> None:
    """The stay test misses it (the scene shows through, so the pixel does not stay put); the blend test finds it
    where it is. Without the blend test (an opacity band no mark has) it is not found."""
    plain = _panned(_scene(11, smooth=3), step=9)
    marked = _grey_mark(plain, 38, 32)
    got = stay_score(stay_evidence(marked)[0])
    assert got["stay_corner"] == "top_left" and got["stay_score"] > 0.05, got
    assert stay_score(stay_evidence(marked, opacity=(0.99, 1.0))[0])["stay_score"] <= 0.05
    assert int((stay_evidence(plain)[0] >= 0.7).sum()) == 0  # the plain pan: slope 1 everywhere


def test_lens_vignetting_and_texture_moving_on_its_own_are_not_marks() -> None:
    """Vignetting darkens the scene towards the corners smoothly and out to the frame's edge: not a mark. A patch of
    water or leaves in a corner, half its own motion and half the scene's, has a mark's slope but fits no line."""
    scene = _scene(12, smooth=3)
    plain = _panned(scene, step=9).astype(np.float32)
    yy, xx = np.mgrid[0:180, 0:320]
    r2 = ((xx - 160) / 160) ** 2 + ((yy - 90) / 90) ** 2
    vignetted = np.clip(plain * (1 - 0.6 * (r2 / 2) ** 1.5), 0, 255).astype(np.uint8)
    assert stay_score(stay_evidence(vignetted)[0])["stay_score"] <= 0.05
    rng = np.random.default_rng(13)
    water = plain.astype(np.uint8)
    for f in water:
        ripple = _scene(int(rng.integers(1000)), smooth=3)[:30, :35]
        f[20:50, 240:275] = (f[20:50, 240:275] // 2 + ripple // 2).astype(np.uint8)
    assert stay_score(stay_evidence(water)[0])["stay_score"] <= 0.05


def _photo_pan(name: str, mirror: bool = False) -> np.ndarray:
    import cv2

    path = MEDIA / "photos" / name
    assert path.is_file(), f"missing test media {path}"
    grey = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY)
    scene = cv2.resize(grey, (400, 200), interpolation=cv2.INTER_AREA)
    return _panned(scene[:, ::-1].copy() if mirror else scene, step=9)


def _exposed(frames: np.ndarray, gains: np.ndarray) -> np.ndarray:
    return np.clip(frames.astype(np.float32) * gains[:, None, None], 0, 255).astype(np.uint8)


def test_an_exposure_ramp_during_a_pan_is_not_a_mark() -> None:
    """Auto-exposure or a fade changes every sample's levels: compared as they are, the scene under every pixel
    reads as contrast cut by a mark, and small groups of such pixels made corners score up to 0.42 on these mirrored
    pans of shared photos (an independent review's find). The blend test matches each pair's levels first."""
    for name, low in (("bald_guys.jpg", 0.6), ("two_people.jpg", 0.3)):
        frames = _exposed(_photo_pan(name, mirror=True), np.linspace(1.0, low, 8))
        assert stay_score(stay_evidence(frames)[0])["stay_score"] <= 0.05, name
    # a mark drawn over the picture after the camera's exposure changed is still found
    ramped = _exposed(_panned(_scene(11, smooth=3), step=9), np.linspace(1.0, 0.6, 8))
    got = stay_score(stay_evidence(_grey_mark(ramped, 38, 32))[0])
    assert got["stay_corner"] == "top_left" and got["stay_score"] > 0.05, got


def test_a_mark_inset_a_few_px_from_the_bottom_edge_counts() -> None:
    """The edge rule drops what reaches the frame's edge (a bonnet, a pillar, vignetting); a ring whose rim ends
    7 px above the bottom (4% of the height) is a mark, not something reaching in."""
    got = stay_score(stay_evidence(_ring(_panned(_scene(3), step=9), 24, 160, alpha=0.6))[0])
    assert got["stay_corner"] == "bottom_left" and got["stay_score"] > 0.05, got


def test_the_tracked_camera_motion_chains_rotation_and_zoom() -> None:
    """Samples of a scene under a known similarity transform per step (pan, a slow turn, a push in): the chained
    estimates map the last sample onto the first within a third of a pixel."""
    import cv2

    from curation.stages.watermark import _camera_shifts, _camera_steps, _pair_transforms

    scene = _scene(6, smooth=5)
    big = cv2.resize(scene, (800, 400), interpolation=cv2.INTER_CUBIC)
    truth, frames = [np.eye(3)], []
    for i in range(6):
        a, z = np.deg2rad(0.6 * i * (i % 2 * 2 - 1)), 1 + 0.01 * i  # turns back and forth, zooms in
        m = np.float64([[z * np.cos(a), -z * np.sin(a), 200 - 7 * i], [z * np.sin(a), z * np.cos(a), 100 + 2 * i]])
        frames.append(cv2.warpAffine(big, m, (320, 180), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR))
        truth.append(np.vstack([m, [0, 0, 1]]))
    greys = np.stack(frames)
    steps = _camera_steps(greys, _camera_shifts(greys), corner=0.3)
    assert all(s is not None for s in steps)
    chained = {(i, j): t for i, j, t in _pair_transforms(steps)}[(0, len(frames) - 1)]
    expect = np.linalg.inv(truth[1]) @ truth[-1]  # a point of the last sample, in the first sample's frame
    probe = np.float64([[0, 0, 1], [320, 0, 1], [0, 180, 1], [320, 180, 1]]).T
    assert float(np.abs((chained @ probe)[:2] - (expect @ probe)[:2]).max()) < 0.35


def test_what_the_camera_carries_along_is_not_a_mark() -> None:
    """A subject the camera follows, big or reaching in from the frame's edge, stays put as a mark does; it is told
    apart by its size and by where it is."""
    scene = _scene(4)
    followed = _panned(scene)
    patch = _scene(9, smooth=3)[:64, :56]
    followed[:, 108:172, 14:70] = patch  # a person-sized subject held low left (36% of the height)
    assert stay_score(stay_evidence(followed)[0])["stay_score"] <= 0.05
    side = _panned(scene)
    side[:, 20:70, :60] = _scene(10, smooth=3)[:50, :60]  # something entering from the left edge
    assert stay_score(stay_evidence(side)[0])["stay_score"] <= 0.05


def test_band_lift_finds_a_pale_clock_on_a_bright_sky_and_leaves_the_middle(tmp_path: Path) -> None:
    """Case d03 (a white clock on a pale sky, made from the shared traffic-camera footage): the embedded detector
    finds nothing in the frame as it is and the clock once the bands are equalised."""
    import types

    import av

    from curation.stages.ocr import OcrConfig, _RapidOcr

    case = next(c for c in fc.load_cases() if c["case"] == "d03")
    with av.open(str(fc.render_case(case, tmp_path))) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    engine = _RapidOcr(OcrConfig(threads=1), types.SimpleNamespace(threads=1))
    lifted = lift_bands(frame, 0.2, 3.0)
    assert not [t for _, t, _ in engine(frame) if ":" in t]
    assert any(re.search(r"\d\d:\d\d:\d\d", t) for _, t, _ in engine(lifted))
    assert np.array_equal(lifted[60:-60], frame[60:-60])
    assert lift_bands(frame, 0.2, 0.0) is frame
