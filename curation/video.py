"""The one decode pass per video: scene detection and the frame samples every later filter reads.

Frames are decoded once with PyAV (codec threads on) and scaled by swscale straight to the small detection size, so
no full-resolution BGR copy is ever made. While a scene is open, a bounded set of candidate frames (at sample size)
is kept; when the detector closes the scene, evenly spaced samples are picked from the candidates and handed to the
caller. Memory is bounded by the candidate buffer, not by video length.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import Interpolation
from scenedetect import FrameTimecode, SceneDetector

log = logging.getLogger(__name__)

DETECT_MIN_SIDE = 256  # PySceneDetect's auto-downscale target (long side), kept so our cuts match its CLI


@dataclass
class Segment:
    """A closed scene segment `[start, end)` in decoded-frame indices, with its frame samples."""

    start: int
    end: int
    start_reason: str  # "start" (first frame), "cut" (detected), "split" (max length reached)
    sample_frames: list[int]
    samples: np.ndarray  # uint8 [n, h, w, 3] RGB, display orientation

    @property
    def num_frames(self) -> int:
        return self.end - self.start


@dataclass
class ScanResult:
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    rotation: int = 0
    decode_errors: int = 0
    cuts: list[int] = field(default_factory=list)


def detect_size(width: int, height: int) -> tuple[int, int]:
    """Detection resolution: PySceneDetect's auto-downscale rule (long side ~256)."""
    long_side = max(width, height)
    if long_side < DETECT_MIN_SIDE:
        return width, height
    f = long_side / DETECT_MIN_SIDE
    return max(1, round(width / f)), max(1, round(height / f))


def sample_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """Sample resolution: long side at most `long_side`, even dimensions."""
    f = min(1.0, long_side / max(width, height))
    return max(2, int(width * f) // 2 * 2), max(2, int(height * f) // 2 * 2)


class _CandidateBuffer:
    """Frames of the open scene at a growing stride: at most `2 * n` are ever held, whatever the scene length."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self.stride = 1
        self.items: list[tuple[int, np.ndarray]] = []

    def wants(self, idx: int) -> bool:
        return not self.items or idx - self.items[-1][0] >= self.stride

    def add(self, idx: int, frame: np.ndarray) -> None:
        self.items.append((idx, frame))
        if len(self.items) > 2 * self.n:
            self.items = self.items[::2]
            self.stride *= 2

    def take_before(self, end: int) -> list[tuple[int, np.ndarray]]:
        """Remove and return the candidates of frames < end; the rest start the next scene."""
        taken = [it for it in self.items if it[0] < end]
        self.items = [it for it in self.items if it[0] >= end]
        self.stride = 1
        return taken


def pick_evenly(cands: list[tuple[int, np.ndarray]], n: int) -> list[tuple[int, np.ndarray]]:
    if len(cands) <= n:
        return cands
    pos = np.linspace(0, len(cands) - 1, n).round().astype(int)
    return [cands[i] for i in sorted(set(pos.tolist()))]


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def scan_video(
    path: str,
    detector: SceneDetector,
    on_segment: Callable[[Segment], None],
    *,
    samples_per_clip: int = 8,
    sample_long_side: int = 512,
    max_len_frames: int | None = None,
    threads: int = 0,
) -> ScanResult:
    """Decode `path` once; call `on_segment` for every scene as soon as it is final.

    Raises only when the file cannot be opened or yields no frame at all; corrupt packets are counted and skipped.
    """
    res = ScanResult()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = Fraction(rate) if rate else Fraction(25)
        res.fps = float(fps)
        lag = int(getattr(detector, "event_buffer_length", 0) or 0)
        buf = _CandidateBuffer(samples_per_clip)
        seg_start, seg_reason = 0, "start"
        sizes: tuple[tuple[int, int], tuple[int, int]] | None = None
        idx = -1

        def close(end: int, next_reason: str) -> None:
            nonlocal seg_start, seg_reason
            if end <= seg_start:
                return
            picked = pick_evenly(buf.take_before(end), samples_per_clip)
            frames = np.stack([f for _, f in picked]) if picked else np.zeros((0, 2, 2, 3), np.uint8)
            on_segment(Segment(seg_start, end, seg_reason, [i for i, _ in picked], frames))
            seg_start, seg_reason = end, next_reason

        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as exc:  # corrupt packet: count, skip, keep going
                res.decode_errors += 1
                log.debug("%s: packet decode error: %s", path, exc)
                continue
            for frame in decoded:
                idx += 1
                if sizes is None:
                    res.width, res.height = frame.width, frame.height
                    res.rotation = int(getattr(frame, "rotation", 0) or 0)
                    sizes = (detect_size(frame.width, frame.height), sample_size(frame.width, frame.height, sample_long_side))
                elif (frame.width, frame.height) != (res.width, res.height):
                    res.decode_errors += 1  # a frame of another size: the stream is damaged here
                    continue
                (dw, dh), (sw, sh) = sizes
                small = frame.reformat(width=dw, height=dh, format="bgr24", interpolation=Interpolation.BILINEAR)
                for cut in detector.process_frame(FrameTimecode(idx, fps), small.to_ndarray()):
                    c = int(cut.frame_num if hasattr(cut, "frame_num") else cut)
                    if c > seg_start:
                        res.cuts.append(c)
                        close(c, "cut")
                if buf.wants(idx):
                    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation=Interpolation.AREA)
                    buf.add(idx, _rotate(rgb.to_ndarray(), res.rotation))
                # Force a split only once no detected cut can still land before it (the detector's lag).
                if max_len_frames and idx - lag >= seg_start + max_len_frames:
                    close(seg_start + max_len_frames, "split")
        if idx < 0:
            raise ValueError("no decodable video frame")
        res.frames = idx + 1
        for cut in detector.post_process(FrameTimecode(idx, fps)):
            c = int(cut.frame_num if hasattr(cut, "frame_num") else cut)
            if seg_start < c < res.frames:
                res.cuts.append(c)
                close(c, "cut")
        while max_len_frames and res.frames - seg_start > max_len_frames:
            close(seg_start + max_len_frames, "split")
        close(res.frames, "end")
    return res


def seconds(frame: int, fps: float) -> float:
    return frame / fps if fps and not math.isnan(fps) else 0.0
