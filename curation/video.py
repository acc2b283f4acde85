"""The one decode pass per video: scene detection and the frame samples every later filter reads.

Frames are decoded once with PyAV (codec threads on) and scaled by swscale straight to the small detection size, so
no full-resolution BGR copy is ever made. While a scene is open, a bounded set of candidate frames (at sample size)
is kept; when the detector closes the scene, evenly spaced samples are picked from the candidates and handed to the
caller. Memory is bounded by the candidate buffer, not by video length.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import IO, Any

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from scenedetect import ContentDetector, FrameTimecode, SceneDetector

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
    pairs: np.ndarray | None = None  # uint8 [n, 2, dh, dw] grey (frame before, sample frame) at detection size
    pair_valid: np.ndarray | None = None  # bool [n]: False where the frame before lies in another scene

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
    ts_regular: bool = True  # every frame's timestamp is at idx / fps: time-based seeking lands on exact frames
    cuts: list[int] = field(default_factory=list)
    # decoded presentation time of every frame, seconds from the first frame (idx / fps where a frame has none)
    times: list[float] = field(default_factory=list)

    def time_of(self, idx: int) -> float:
        """When decoded frame `idx` is shown, from the first frame; `frames` (one past the last) is the end of the
        last frame (its time plus the typical frame duration)."""
        if not self.times:
            return seconds(idx, self.fps)
        if idx < len(self.times):
            return self.times[idx]
        steps = [b - a for a, b in zip(self.times[-9:], self.times[-8:], strict=False) if b > a]
        step = sorted(steps)[len(steps) // 2] if steps else (1 / self.fps if self.fps else 0.0)
        return self.times[-1] + step * (idx - len(self.times) + 1)


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
    """Frames of the open scene at a growing stride: at most `3 * n` are ever held, whatever the scene length.

    3n rather than 2n because a scene is only closed after the detector's lag, while the next one has started.
    """

    def __init__(self, n: int, base_stride: int = 1) -> None:
        self.n = max(1, n)
        self.base_stride = max(1, base_stride)
        self.stride = self.base_stride
        self.items: list[tuple[int, Any]] = []

    def wants(self, idx: int) -> bool:
        return not self.items or idx - self.items[-1][0] >= self.stride

    def add(self, idx: int, frame: Any) -> None:
        self.items.append((idx, frame))
        if len(self.items) > 3 * self.n:
            self.items = self.items[::2]
            self.stride *= 2

    def take_before(self, end: int) -> list[tuple[int, Any]]:
        """Remove and return the candidates of frames < end; the rest start the next scene."""
        taken = [it for it in self.items if it[0] < end]
        self.items = [it for it in self.items if it[0] >= end]
        self.stride = self.base_stride
        return taken


def pick_evenly(cands: list[tuple[int, Any]], n: int) -> list[tuple[int, Any]]:
    if len(cands) <= n:
        return cands
    pos = np.linspace(0, len(cands) - 1, n).round().astype(int)
    return [cands[i] for i in sorted(set(pos.tolist()))]


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


class _Decoder:
    """Producer thread: demux + decode + swscale to detection size, a few frames ahead of the detector.

    PyAV releases the GIL while decoding and scaling, so on two cores decoding overlaps detection. The queue is
    short, which keeps memory flat; the decoded frame travels along so the consumer can take a sample from it.
    """

    _END = object()

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> None:
        self.container, self.stream = container, stream
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        self.errors = 0
        self.size_errors = 0
        self.exc: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="curation-decode", daemon=True)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        rf = VideoReformatter()
        first: tuple[int, int] | None = None
        dsize = (0, 0)
        try:
            for packet in self.container.demux(self.stream):
                if self.stop.is_set():
                    return
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as exc:  # corrupt packet: count, skip, keep going
                    self.errors += 1
                    log.debug("packet decode error: %s", exc)
                    continue
                for frame in frames:
                    if first is None:
                        first = (frame.width, frame.height)
                        dsize = detect_size(*first)
                    elif (frame.width, frame.height) != first:
                        self.size_errors += 1  # a frame of another size: the stream is damaged here
                        continue
                    # FAST_BILINEAR: like PySceneDetect's cv2 INTER_LINEAR (no antialiasing), and 2x cheaper.
                    small = rf.reformat(
                        frame,
                        width=dsize[0],
                        height=dsize[1],
                        format="bgr24",
                        interpolation=Interpolation.FAST_BILINEAR,
                    ).to_ndarray()
                    if not self._put((frame, small)):
                        return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self.exc = exc
        finally:
            self._put(self._END)

    def __iter__(self) -> Iterator[tuple[av.VideoFrame, np.ndarray]]:
        self.thread.start()
        try:
            while True:
                item = self.queue.get()
                if item is self._END:
                    break
                yield item
        finally:
            self.stop.set()
            self.thread.join()
        if self.exc is not None:
            raise self.exc


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
        # Start at ~8 candidates a second: a 1 s clip still gets its samples, a long one is decimated as it grows.
        buf = _CandidateBuffer(samples_per_clip, base_stride=round(float(fps) / 8))
        seg_start, seg_reason = 0, "start"
        sample_rf = VideoReformatter()
        ssize = (0, 0)
        idx = -1
        t0: float | None = None
        t_first: float | None = None
        half_frame = 0.5 / res.fps
        prev_small: np.ndarray | None = None

        def close(end: int, next_reason: str) -> None:
            nonlocal seg_start, seg_reason
            if end <= seg_start:
                return
            picked = pick_evenly(buf.take_before(end), samples_per_clip)
            if picked:
                frames = np.stack([rgb for _, (rgb, _) in picked])
                pairs = np.stack([pair for _, (_, pair) in picked])
            else:
                frames, pairs = np.zeros((0, 2, 2, 3), np.uint8), np.zeros((0, 2, 2, 2), np.uint8)
            valid = np.array([i > seg_start for i, _ in picked], dtype=bool)  # the frame before is in this scene
            on_segment(Segment(seg_start, end, seg_reason, [i for i, _ in picked], frames, pairs, valid))
            seg_start, seg_reason = end, next_reason

        decoder = _Decoder(container, stream)
        for frame, small in decoder:
            idx += 1
            t = frame.time
            if idx == 0:
                t_first = t
            res.times.append(t - t_first if t is not None and t_first is not None else idx / res.fps)
            if idx == 0:
                res.width, res.height = frame.width, frame.height
                res.rotation = int(getattr(frame, "rotation", 0) or 0)
                ssize = sample_size(frame.width, frame.height, sample_long_side)
                t0 = t
                start = (container.start_time or 0) / 1_000_000
                res.ts_regular = t is not None and abs(t - start) < half_frame
            elif res.ts_regular and (t is None or t0 is None or abs(t - t0 - idx / res.fps) > half_frame):
                res.ts_regular = False
            for cut in detector.process_frame(FrameTimecode(idx, fps), small):
                c = int(cut.frame_num if hasattr(cut, "frame_num") else cut)
                if c > seg_start:
                    res.cuts.append(c)
                    close(c, "cut")
            if buf.wants(idx):
                rgb = sample_rf.reformat(
                    frame, width=ssize[0], height=ssize[1], format="rgb24", interpolation=Interpolation.BILINEAR
                )
                grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
                before = cv2.cvtColor(prev_small, cv2.COLOR_BGR2GRAY) if prev_small is not None else grey
                pair = np.stack([_rotate(before, res.rotation), _rotate(grey, res.rotation)])
                buf.add(idx, (_rotate(rgb.to_ndarray(), res.rotation), pair))
            prev_small = small
            # Force a split only once no detected cut can still land before it (the detector's lag).
            if max_len_frames and idx - lag >= seg_start + max_len_frames:
                close(seg_start + max_len_frames, "split")
        res.decode_errors = decoder.errors + decoder.size_errors
        if idx < 0:
            raise ValueError("no decodable video frame")
        res.frames = idx + 1
        if any(b < a for a, b in zip(res.times, res.times[1:], strict=False)):
            # times out of order (AVI with packed B-frames reports decode times): they identify no frame; count
            res.times = [i / res.fps for i in range(res.frames)]
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


class FastContentDetector(ContentDetector):
    """PySceneDetect's ContentDetector computing the same frame scores with OpenCV kernels.

    The parent takes int32 copies of each HSV channel for every frame; `cv2.absdiff` + `cv2.sumElems` give the
    same integer sums (so the same float scores, checked against the parent in the tests) in a fraction of the
    time. Cut decisions stay in the parent's flash filter. Pinned to scenedetect 0.7.2's private hook.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prev: tuple[np.ndarray, np.ndarray | None] | None = None

    def _calculate_frame_score(self, timecode: FrameTimecode, frame_img: np.ndarray) -> float:
        if getattr(self, "stats_manager", None) is not None:  # stats files need the parent's bookkeeping
            return super()._calculate_frame_score(timecode, frame_img)
        hsv = cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)
        weights = self._weights
        edges = self._detect_edges(cv2.extractChannel(hsv, 2)) if weights.delta_edges > 0.0 else None
        prev, self._prev = self._prev, (hsv, edges)
        if prev is None:
            return 0.0
        n = float(hsv.shape[0] * hsv.shape[1])
        sums = cv2.sumElems(cv2.absdiff(hsv, prev[0]))
        d_edges = 0.0 if edges is None or prev[1] is None else cv2.sumElems(cv2.absdiff(edges, prev[1]))[0] / n
        components = (sums[0] / n, sums[1] / n, sums[2] / n, d_edges)
        return sum(c * w for c, w in zip(components, weights, strict=True)) / sum(abs(w) for w in weights)


def decoded_frames(container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
    """The first video stream's frames in decode order, as the scene-cut pass numbers them: damaged packets and
    frames of another size than the first are skipped."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    first: tuple[int, int] | None = None
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            continue
        for frame in frames:
            if first is None:
                first = (frame.width, frame.height)
            elif (frame.width, frame.height) != first:
                continue
            yield frame


def read_clip_frames(
    path: str | IO[bytes],
    start: int,
    positions: list[int],
    rotation: int = 0,
    long_side: int | None = None,
    seek: bool = False,
) -> dict[int, np.ndarray]:
    """BGR frames at clip-relative `positions` of the clip starting at decoded frame `start`, display-oriented.
    `path` may also be an open binary file (e.g. an mp4 read from a shard).

    Frames are numbered by `decoded_frames` (like the scene-cut pass), so packed-B-frame AVIs and VFR files agree
    with the manifest. With `seek` (only for files whose timestamps are regular: frame i at start + i / fps, which
    the scene-cut pass records as `ts_regular`), decoding starts at the keyframe before the clip instead of at the
    file's start, and frames are identified by their timestamps; if that does not find every wanted frame, it falls
    back to decoding from the start.
    """
    want = {start + p: p for p in positions}
    if not want:
        return {}
    if seek and start > 0:
        got = _read_by_seeking(path, want, rotation, long_side)
        if got is not None:
            return got
        if not isinstance(path, str):
            path.seek(0)
    last = max(want)
    out: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        for idx, frame in enumerate(decoded_frames(container)):
            if idx in want:
                out[want[idx]] = _to_bgr(frame, rotation, long_side)
            if idx >= last:
                break
    return out


def _to_bgr(frame: av.VideoFrame, rotation: int, long_side: int | None) -> np.ndarray:
    w, h = frame.width, frame.height
    if long_side and max(w, h) > long_side:
        s = long_side / max(w, h)
        w, h = max(2, round(w * s)), max(2, round(h * s))
    return _rotate(frame.to_ndarray(format="bgr24", width=w, height=h), rotation)


def _read_by_seeking(
    path: str | IO[bytes], want: dict[int, int], rotation: int, long_side: int | None
) -> dict[int, np.ndarray] | None:
    """`want` (decoded index -> key) by seeking to the keyframe before the first and numbering frames by their
    timestamps; None when a wanted frame was not seen (the caller decodes from the start instead)."""
    first, last = min(want), max(want)
    out: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if fps <= 0 or stream.time_base is None:
            return None
        # frame i is at t0 + i / fps, t0 the stream's first timestamp (audio may start the container earlier)
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        target = t0 + max(0.0, (first - 1) / fps)  # a frame early: the keyframe search is by timestamp
        container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in decoded_frames(container):
            if frame.time is None:
                return None
            idx = round((frame.time - t0) * fps)
            if idx > first and not out:  # landed past the first wanted frame
                return None
            if idx in want:
                out[want[idx]] = _to_bgr(frame, rotation, long_side)
            if idx >= last:
                break
    return out if len(out) == len(want) else None
