"""Data-parallel training: two CPU processes under torch.distributed (gloo) see different samples and end with
equal weights; the same run under torchrun through the CLI writes one set of metrics and checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.conftest import REPO  # noqa: E402

TINY = REPO / "configs" / "train_tiny.yaml"
SETTINGS = ["data.batch_size=2", "data.prefetch=0", "checkpoint_every=2", "threads=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, shards: str, out: str, result: str, steps: int = 4) -> None:
    """One rank (run by torch.multiprocessing.spawn): train to `steps`, save its weights and the keys it trained on."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from curation.train.config import load_train_config
    from curation.train.loop import Trainer

    tr = Trainer(load_train_config(TINY, SETTINGS), shards, out)
    keys: list[str] = []
    step = tr.train_step

    def recording(batch: dict) -> dict:
        keys.extend(batch["keys"])
        return step(batch)

    tr.train_step = recording  # type: ignore[method-assign]
    try:
        tr.fit(steps)
        torch.save({"state": tr.model.state_dict(), "keys": keys}, Path(result) / f"rank{rank}.pt")
    finally:
        tr.close()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_ends_with_equal_weights(overfit_run: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from curation.train.config import load_train_config
    from curation.train.model import build

    out = tmp_path / "out"
    mp.spawn(_worker, args=(2, _free_port(), str(overfit_run / "shards"), str(out), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["keys"] and r1["keys"] and not set(r0["keys"]) & set(r1["keys"])  # each rank its own samples
    init = build(load_train_config(TINY, SETTINGS).model, 0)[0].state_dict()
    assert any(not torch.equal(init[k], r0["state"][k]) for k in init)  # it trained
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # and stayed in sync
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["loaders"]) == 2
    saved = torch.load(out / "checkpoints" / "step-00000004" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], r0["state"][k]) for k in saved)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ddp_run_stopped_at_a_checkpoint_resumes_to_the_same_weights(overfit_run: Path, tmp_path: Path) -> None:
    """Two ranks stop at step 2 (a checkpoint with both ranks' loader positions); a new pair of processes resumes to
    step 4 and ends with the weights of a pair that never stopped."""
    import torch.multiprocessing as mp

    shards = str(overfit_run / "shards")
    for name, plan in (("straight", [4]), ("resumed", [2, 4])):
        for steps in plan:
            args = (2, _free_port(), shards, str(tmp_path / name), str(tmp_path / name), steps)
            mp.spawn(_worker, args=args, nprocs=2, join=True)
    a = torch.load(tmp_path / "straight" / "rank0.pt", weights_only=False)["state"]
    b = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=False)["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_runs_the_cli_on_two_processes(overfit_run: Path, tmp_path: Path) -> None:
    """What a user types for several GPUs (here two gloo processes on the CPU): `torchrun --no-python
    --nproc_per_node N curation train ...`."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "--no-python", str(Path(sys.executable).parent / "curation"), "train", str(TINY),
        "--shards", str(overfit_run / "shards"), "--out", str(out), "--steps", "2",
    ]  # fmt: skip
    for opt in SETTINGS:
        cmd += ["--set", opt]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 2 step(s) to step 2") == 1  # rank 0 reports, once
    assert (out / "checkpoints" / "step-00000002" / "model.pt").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_gpu_bench_script_runs_its_train_part_at_tiny_shapes(tmp_path: Path) -> None:
    """bench/gpu.py is run once on a lent GPU: the same code at tiny shapes on the CPU keeps it from rotting."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--dims", "tiny", "--device", "cpu", "--steps", "2",
         "--warmup", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu-train.json").read_text())
    assert res["steps"] == 2 and len(res["losses"]) == 2 and res["shape"]["subjects"] == 4
    assert all(v["mask"] > 0 and v["flow"] > 0 for v in res["losses"])


@pytest.mark.gpu
def test_gpu_bench_train_part_at_wan13b_shapes(tmp_path: Path) -> None:
    """On a GPU machine: 2 steps at the real shapes fit and finish (the full 20-step figure is bench/gpu.py's)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--steps", "2", "--warmup", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "gpu-train.json").read_text())["peak_memory_gib"] > 1
