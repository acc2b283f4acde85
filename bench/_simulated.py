"""Stages for `bench/scale.py`: the real pipeline code (runners, manifests, streaming) with each model's compute
replaced by a sleep, so a 2-core machine can stand in for a GPU cluster. Registered in the driver and, through
Ray's `worker_process_setup_hook`, in every worker."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from curation.stage import Kind, Resources, Row, Stage, StageConfig

CLIPS_PER_VIDEO = 5


class SimConfig(StageConfig):
    seconds: float = 0.0  # sleep per row (the model's compute)


class _Sim(Stage[SimConfig]):
    config_class = SimConfig
    version = "1"
    columns: ClassVar[dict[str, str]] = {}

    def _work(self) -> tuple[float, float]:
        t0 = time.time()
        time.sleep(self.config.seconds)
        return t0, time.time()


class SimProbe(_Sim):
    """Container probe: CPU, milliseconds."""

    name = "simprobe"
    kind = Kind.VIDEO
    default_resources = Resources(cpus=0.25, batch_size=8, pool_max=8)

    def process(self, row: Row) -> Row:
        self._work()
        return self.row(row, "ok")


class SimCut(_Sim):
    """Scene cut: CPU; every video gives CLIPS_PER_VIDEO clips of 81 frames at 16 fps."""

    name = "simcut"
    kind = Kind.SPLIT
    default_resources = Resources(cpus=0.25, batch_size=1, pool_max=8)  # a video at a time, as scenecut

    def process(self, row: Row) -> list[Row]:
        self._work()
        vid = row["video_id"]
        out = []
        for k in range(CLIPS_PER_VIDEO):
            geo: dict[str, Any] = {"start_frame": 81 * k, "end_frame": 81 * (k + 1), "num_frames": 81, "fps": 16.0}
            geo.update(start_s=geo["start_frame"] / 16, end_s=geo["end_frame"] / 16, duration_s=81 / 16)
            geo.update(rotation=0, ts_regular=True, samples_path=None)
            out.append(self.row({"video_id": vid, "clip_id": f"{vid}-{k}"}, "ok", **geo))
        return out


class SimFilter(_Sim):
    """The CPU filters (motion, aesthetics proxy, OCR), one stage."""

    name = "simfilter"
    kind = Kind.CLIP
    default_resources = Resources(cpus=0.25, batch_size=4, pool_max=8)

    def process(self, row: Row) -> Row:
        self._work()
        return self.row(row, "ok")


class _SimGpu(_Sim):
    """A GPU stage: records when each batch held its GPU, for the busy fraction."""

    def process(self, row: Row) -> Row:
        return self.process_batch([row])[0]

    def process_batch(self, batch: list[Row]) -> list[Row]:
        t0 = time.time()
        time.sleep(self.config.seconds * len(batch))
        t1 = time.time()
        return [self.row(r, "ok", t0=t0, t1=t1, n=len(batch)) for r in batch]


class SimCaption(_SimGpu):
    """MLLM captioning on vLLM: one GPU per engine."""

    name = "simcaption"
    kind = Kind.CLIP
    columns: ClassVar[dict[str, str]] = {"simcaption_t0": "DOUBLE", "simcaption_t1": "DOUBLE", "simcaption_n": "BIGINT"}
    default_resources = Resources(cpus=0.1, gpus=1.0, batch_size=4, pool_max=8)


class SimMasks(_SimGpu):
    """Subject mask tracks with SAM2.1 (video predictor over the clip's frames): one GPU per worker."""

    name = "simmasks"
    kind = Kind.CLIP
    columns: ClassVar[dict[str, str]] = {"simmasks_t0": "DOUBLE", "simmasks_t1": "DOUBLE", "simmasks_n": "BIGINT"}
    default_resources = Resources(cpus=0.1, gpus=1.0, batch_size=4, pool_max=8)


SIMULATED: dict[str, type[Stage[Any]]] = {c.name: c for c in (SimProbe, SimCut, SimFilter, SimCaption, SimMasks)}


def register() -> None:
    """Add the simulated stages to this process's registry (the driver, and each Ray worker as it starts)."""
    import curation.stage as stage_mod

    stage_mod._REGISTRY = {**stage_mod.registry(), **SIMULATED}
