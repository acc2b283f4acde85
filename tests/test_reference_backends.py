"""Reference backends, the parts that run without their libraries or weights: checkpoint layouts and the
config-load checks that name what is missing (issue 17). The libraries themselves (open_clip, sam2, insightface,
PaddleOCR, vLLM) are not installed in this environment; what these tests cover is marked per test."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from curation.stages.aesthetics import AestheticsConfig, is_torchscript, laion_mlp  # noqa: E402

# The improved-aesthetic-predictor's published state dict: `layers.N` of its nn.Sequential, Linear layers at
# 0, 2, 4, 6, 7 (dropouts at 1, 3, 5), shapes 768 -> 1024 -> 128 -> 64 -> 16 -> 1.
LAION_KEYS = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}


def _laion_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, (o, n) in LAION_KEYS.items():
        sd[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) * 0.05
        sd[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.05
    return sd


def test_laion_mlp_loads_the_published_state_dict_and_scores_as_written() -> None:
    sd = _laion_state_dict()
    mlp = laion_mlp(torch)
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in sd.items()})  # strict: every key, every shape
    mlp.eval()
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(1))
    want = x
    for i in sorted(LAION_KEYS):  # the head is affine layers only, dropouts off at eval
        want = want @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    with torch.no_grad():
        assert torch.allclose(mlp(x), want, atol=1e-5)


def test_a_torchscript_clip_file_fails_at_config_load_naming_the_state_dict(tmp_path: Path) -> None:
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "ViT-L-14.pt"))
    torch.save(_laion_state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save({"w": torch.zeros(1)}, tmp_path / "open_clip_model.safetensors")  # stands in: only its kind matters
    assert is_torchscript(tmp_path / "ViT-L-14.pt") and not is_torchscript(tmp_path / "open_clip_model.safetensors")
    with pytest.raises(ValueError, match=r"TorchScript.*timm/vit_large_patch14_clip_224\.openai"):
        AestheticsConfig(backend="reference", models_dir=str(tmp_path), clip_pretrained_file="ViT-L-14.pt")
    cfg = AestheticsConfig(backend="reference", models_dir=str(tmp_path))
    assert cfg.clip_model.endswith("-quickgelu")  # OpenAI's weights were trained with QuickGELU
    with pytest.raises(ValueError, match=r"sac\+logos.*improved-aesthetic-predictor"):
        AestheticsConfig(backend="reference", models_dir=str(tmp_path / "empty"))


def test_a_gpu_backend_without_a_gpu_fails_in_one_line_unless_asked_for_the_cpu() -> None:
    """This machine's torch is a CPU build: what a Ray actor sees when no accelerator was handed to it."""
    from curation.errors import ConfigError, torch_device
    from curation.stages.aesthetics import Aesthetics
    from curation.stages.subjects import Subjects
    from curation.stages.watermark import Watermark

    assert not torch.cuda.is_available()
    for cls in (Aesthetics, Watermark, Subjects):
        # config built without its weights check (none here): only the declared resources are looked at
        ref = cls(cls.config_class.model_construct(backend="reference"))
        assert ref.resources().gpus > 0, cls.name  # Ray is asked for a GPU (fraction) for the reference backend
        assert cls(cls.config_class()).resources().gpus == 0  # embedded: CPU
    with pytest.raises(ConfigError, match=r"aesthetics: the reference backend asked for 0.25 GPU but torch sees") as e:
        torch_device(torch, 0.25, "aesthetics")
    assert "\n" not in str(e.value) and "aesthetics.resources.gpus: 0" in str(e.value)
    assert torch_device(torch, 0, "aesthetics") == "cpu"  # resources.gpus: 0 runs it on the CPU on purpose


def test_the_sam2_checkpoint_follows_the_sam2_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from curation.cli import main
    from curation.stages.subjects import SubjectsConfig, sam2_checkpoint

    assert sam2_checkpoint("configs/sam2.1/sam2.1_hiera_t.yaml") == "sam2.1_hiera_tiny.pt"
    assert sam2_checkpoint("configs/sam2.1/sam2.1_hiera_b+.yaml") == "sam2.1_hiera_base_plus.pt"
    assert sam2_checkpoint("configs/sam2/sam2_hiera_l.yaml") == "sam2_hiera_large.pt"
    with pytest.raises(ValueError, match="_t, _s, _b\\+ or _l"):
        SubjectsConfig(sam2_config="configs/sam2.1/mystery.yaml")
    (tmp_path / "sam2").mkdir()
    (tmp_path / "sam2" / "sam2.1_hiera_large.pt").write_bytes(b"x")
    (tmp_path / "insightface" / "models" / "buffalo_l").mkdir(parents=True)
    (tmp_path / "grounding-dino-tiny").mkdir()
    SubjectsConfig(backend="reference", models_dir=str(tmp_path))  # the default (large) is there
    tiny = {"backend": "reference", "models_dir": str(tmp_path), "sam2_config": "configs/sam2.1/sam2.1_hiera_t.yaml"}
    with pytest.raises(ValueError, match=r"sam2/sam2\.1_hiera_tiny\.pt \(get it from .*facebookresearch/sam2"):
        SubjectsConfig(**tiny)
    assert (
        main(
            [
                "models",
                "--models-dir",
                str(tmp_path),
                "--set",
                "subjects.sam2_config=configs/sam2.1/sam2.1_hiera_t.yaml",
            ]
        )
        == 0
    )
    out = "\n".join(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("subjects "))
    assert "sam2/sam2.1_hiera_tiny.pt" in out and "sam2.1_hiera_large.pt" not in out  # (crops has its own setting)


def test_paddleocr3_results_become_boxes_and_the_models_are_named_per_folder(tmp_path: Path) -> None:
    """PaddleOCR (and paddlepaddle) are not installed here: the result below is written in the shape PaddleOCR 3
    documents for `predict` (one mapping per image: rec_polys as 4x2 int arrays, rec_texts, rec_scores)."""
    import numpy as np

    from curation.stages.ocr import OcrConfig, paddle_boxes

    result = [
        {
            "rec_polys": [np.array([[10, 20], [90, 20], [90, 40], [10, 40]], np.int16)],
            "rec_texts": ["NEWS 24"],
            "rec_scores": [0.97],
            "dt_polys": [np.zeros((4, 2))],
        }
    ]
    assert paddle_boxes(result) == [([[10.0, 20.0], [90.0, 20.0], [90.0, 40.0], [10.0, 40.0]], "NEWS 24", 0.97)]
    assert paddle_boxes([]) == [] and paddle_boxes(None) == []
    (tmp_path / "paddleocr" / "PP-OCRv5_server_det").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"paddleocr/PP-OCRv5_server_rec \(get it from huggingface\.co/PaddlePaddle"):
        OcrConfig(backend="reference", models_dir=str(tmp_path))
    (tmp_path / "paddleocr" / "PP-OCRv5_server_rec").mkdir()
    assert OcrConfig(backend="reference", models_dir=str(tmp_path)).weights()[1][0] == "paddleocr/PP-OCRv5_server_rec"


def test_ray_workers_resolve_models_dir_themselves_unless_the_config_names_it() -> None:
    """The driver's default models_dir (its own $CURATION_MODELS or ./models) is not what a GPU worker should read:
    workers rebuild stage configs from what the runner sends them."""
    from curation.stages.aesthetics import AestheticsConfig

    assert "models_dir" not in AestheticsConfig().portable_dump()
    assert AestheticsConfig(models_dir="/named").portable_dump()["models_dir"] == "/named"
    assert AestheticsConfig(**AestheticsConfig(min_score=5).portable_dump()).min_score == 5
