"""The per-clip frame samples format: what a SPLIT stage stores in its one decode pass, and what every frame-based
filter reads instead of reopening the video.

One `.npz` per clip with `frames` (uint8 [n, h, w, 3] RGB, display orientation), `indices` (their source frame
numbers), `pairs` (uint8 [n, 2, dh, dw]: grey frame before + sample frame at detection size, for optical flow) and
`pair_valid` (bool [n]). The clips of one cut of a video share a folder, `frames/<video_id>/<cut>/`, where `<cut>`
names the splitter's settings: a rerun that cuts differently writes a new folder, so a filter that compares a clip
with the rest of its video (watermarks persist across cuts) sees only the clips of the current cut.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from curation.manifest import atomic_write_bytes
from curation.runstore import local
from curation.stage import Row

SAMPLES_COLUMN = "clip_samples_path"  # the clips view's name for the SPLIT stage's `<name>_samples_path`


def cut_dir(run_dir: Path, video_id: str, cut: str) -> Path:
    return run_dir / "frames" / video_id / cut


def save_samples(path: Path, frames: np.ndarray, indices: list[int], pairs: np.ndarray, pair_valid: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, frames=frames, indices=np.asarray(indices, np.int64), pairs=pairs, pair_valid=pair_valid)
    atomic_write_bytes(path, buf.getvalue())


def read_samples(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(local(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_samples(row: Row) -> dict[str, np.ndarray]:
    """A clip's frame samples: frames, indices, pairs, pair_valid."""
    path = row.get(SAMPLES_COLUMN)
    if not path:
        raise FileNotFoundError(f"clip has no frame samples ({SAMPLES_COLUMN} is empty)")
    return read_samples(path)


def cut_sample_paths(row: Row) -> list[Path]:
    """The sample files of every clip of this clip's cut of its video, in clip-id order (this clip's included)."""
    path = Path(row[SAMPLES_COLUMN])
    folder = local(path.parent, tree=True)  # a run on object storage: the cut's other clips may come from elsewhere
    return sorted(set(folder.glob("*.npz")) | {folder / path.name})


def _transposition_sort(s: list[np.ndarray]) -> None:
    """Sort same-shape arrays elementwise across the list, in place (odd-even transposition sort): elementwise
    min/max on contiguous arrays is several times faster than numpy's per-pixel partition of a stacked axis."""
    n = len(s)
    for r in range(n):
        for a in range(r % 2, n - 1, 2):
            lo = np.minimum(s[a], s[a + 1])
            np.maximum(s[a], s[a + 1], out=s[a + 1])
            s[a] = lo


def median_of(images: list[np.ndarray]) -> np.ndarray:
    """Per-pixel median of same-shape uint8 images (as np.median over the stack, float for an even count)."""
    s = [im.copy() for im in images]
    n = len(s)
    _transposition_sort(s)
    if n % 2:
        return s[n // 2].astype(np.float64)
    return (s[n // 2 - 1].astype(np.float64) + s[n // 2]) / 2


def masked_median_of(images: list[np.ndarray], valid: list[np.ndarray]) -> np.ndarray:
    """Per-pixel median of same-shape uint8 images over the images where `valid` (bool, the images' shape without
    the channel axis) holds: float32, NaN where none does; as np.nanmedian with the invalid values NaN, but an
    invalid value is 256 in uint16, so the same sort puts it last and each pixel's median is read at its own count."""
    s = [
        np.where(v[..., None] if im.ndim > v.ndim else v, im.astype(np.uint16), np.uint16(256))
        for im, v in zip(images, valid, strict=True)
    ]
    _transposition_sort(s)
    count = np.sum(np.stack(valid), axis=0)
    if images[0].ndim > valid[0].ndim:
        count = count[..., None]
    stack = np.stack(s)
    last = len(s) - 1
    lo = np.take_along_axis(stack, np.minimum(np.maximum(count - 1, 0) // 2, last)[None], 0)[0]
    hi = np.take_along_axis(stack, np.minimum(count // 2, last)[None], 0)[0]
    out = (lo.astype(np.float32) + hi.astype(np.float32)) / 2
    out[np.broadcast_to(count == 0, out.shape)] = np.nan
    return out
