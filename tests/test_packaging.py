"""Docker images and the cluster example stay consistent with the project's own files (Docker cannot run here)."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerfile(name: str) -> str:
    return (REPO / "docker" / name).read_text()


def test_default_install_never_pulls_torchvision() -> None:
    deps = " ".join(PYPROJECT["project"]["dependencies"]).lower()
    assert "torch" not in deps and "vllm" not in deps and "sam2" not in deps
    gpu = " ".join(PYPROJECT["project"]["optional-dependencies"]["gpu"]).lower()
    for lib in ("vllm", "sam2", "open_clip_torch", "insightface", "paddleocr", "torchvision"):
        assert lib in gpu
    train = " ".join(PYPROJECT["project"]["optional-dependencies"]["train"]).lower()
    assert "torch" in train and "diffusers" in train and "torchvision" not in train


def test_images_copy_what_the_package_reads_at_run_time() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = _dockerfile(name)
        for folder in ("curation", "configs"):  # SQL views and prompts ship inside the package
            assert re.search(rf"^COPY {folder} \./{folder}$", text, flags=re.M), (name, folder)
        assert re.search(r"^RUN .*apt-get install .*ffmpeg", text, flags=re.M | re.S), name
        assert 'ENTRYPOINT ["curation"]' in text
        base = re.search(r"^FROM (\S+)", text, flags=re.M).group(1)
        assert ":" in base and not base.endswith(":latest"), f"{name}: pin the base image"
    assert re.search(r'pip install "\.\[gpu,train\]"', _dockerfile("Dockerfile.gpu"))
    assert "[gpu]" not in _dockerfile("Dockerfile.cpu")
    assert PYPROJECT["project"]["scripts"]["curation"] == "curation.cli:main"


def test_dockerfiles_pass_hadolint() -> None:
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    proc = subprocess.run(
        [
            exe,
            "--no-color",
            "--config",
            str(REPO / ".hadolint.yaml"),
            str(REPO / "docker" / "Dockerfile.cpu"),
            str(REPO / "docker" / "Dockerfile.gpu"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_raycluster_example_matches_the_images_and_ray() -> None:
    rc = yaml.safe_load((REPO / "docker" / "kuberay-raycluster.yaml").read_text())
    assert rc["kind"] == "RayCluster" and rc["apiVersion"].startswith("ray.io/")
    import ray

    assert rc["spec"]["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["image"] == "musa-curation:gpu" and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == "musa-curation:cpu"
    cluster = yaml.safe_load((REPO / "configs" / "cluster.yaml").read_text())
    assert cluster["ray"]["address"] == "auto"
    # a run directory on S3 is staged on each pod's own disk (workers push and fetch through the bucket), at the
    # default staging path, the same in every pod; /data stays the shared volume for local run directories
    from curation.runstore import DEFAULT_STAGING

    pods = [rc["spec"]["headGroupSpec"]] + rc["spec"]["workerGroupSpecs"]
    for pod in pods:
        spec = pod["template"]["spec"]
        c = spec["containers"][0]
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        assert "CURATION_STAGING" not in env, c["name"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/data" in mounts, c["name"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts[DEFAULT_STAGING]], c["name"]
