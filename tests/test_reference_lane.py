"""The reference lane (issue 17): reference backends driven through the stage code by a real pipeline run, on the
CPU, with random weights written in the upstream checkpoint formats (nothing can be downloaded here). It runs in its
own virtualenv, `make test-reference` (PyPI's CUDA torch wheel, which runs on the CPU, with torchvision, open_clip,
timm, sam2 and insightface); in the default venv these tests skip, since those libraries are not installed there.

What it shows: each backend loads its files from `models_dir` in the format users download, scores real clips and
writes its manifest columns, and `curation report` reads the result. What it cannot show: the scores' quality
(random weights) and GPU speed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.reference

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

from curation.config import load_config  # noqa: E402
from curation.manifest import Manifests  # noqa: E402
from curation.pipeline import Pipeline  # noqa: E402
from tests.conftest import REPO, caption_list, media  # noqa: E402


def _clip_weights(models: Path) -> None:
    """OpenAI ViT-L/14 in open_clip's state-dict format (what timm/vit_large_patch14_clip_224.openai ships as
    open_clip_model.safetensors), random, plus the LAION head in its published `layers.N` layout."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(models / "open_clip_model.safetensors"))
    head = {}
    for i, (o, n) in {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items():
        head[f"layers.{i}.weight"] = torch.randn(o, n) * 0.02
        head[f"layers.{i}.bias"] = torch.zeros(o) + (5.0 if i == 7 else 0.0)
    torch.save(head, models / "sac+logos+ava1-l14-linearMSE.pth")


def _watermark_weights(models: Path) -> None:
    """LAION's watermark detector layout: timm efficientnet_b3 (their b3a: the same network) with its 1536 -> 625 ->
    256 -> 2 classifier."""
    torch.manual_seed(1)
    m = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    m.classifier = torch.nn.Sequential(
        torch.nn.Linear(1536, 625),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(625, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 2),
    )
    torch.save(m.state_dict(), models / "watermark_model_v1.pt")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    models = tmp / "models"
    models.mkdir()
    _clip_weights(models)
    _watermark_weights(models)
    overrides = [
        "runner=local",
        "progress=false",
        "stages=[probe,scenecut,aesthetics,watermark,package]",
        *(f"{s}.{k}" for s in ("aesthetics", "watermark") for k in ("backend=reference", f"models_dir={models}")),
        "aesthetics.resources.gpus=0",  # this torch sees no GPU: run the GPU backends on the CPU on purpose
        "watermark.resources.gpus=0",
        "aesthetics.min_score=1",
    ]
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    Pipeline(cfg, tmp / "run").run(media("sam2_01_dog.mp4"))
    return tmp / "run"


def test_aesthetics_and_watermark_reference_score_real_clips(reference_run: Path) -> None:
    m = Manifests(reference_run)
    rows = m.rows(
        "SELECT aesthetics_backend, aesthetics_score, aesthetics_status, watermark_backend, watermark_score, "
        "watermark_probability_max FROM clips WHERE aesthetics_status IS NOT NULL"
    )
    assert rows, "no clip reached the filters"
    for r in rows:
        assert r["aesthetics_backend"] == "reference:laion-aesthetic-v2"
        assert r["watermark_backend"] == "reference:laion-watermark-v1"
        assert r["aesthetics_score"] is not None and abs(r["aesthetics_score"] - 5.0) < 3  # head bias 5, small weights
        assert 0 <= r["watermark_score"] <= 1 and 0 <= r["watermark_probability_max"] <= 1


def test_report_reads_a_reference_run(reference_run: Path) -> None:
    from curation.cli import main

    assert main(["report", str(reference_run), "--out", str(reference_run / "report.html")]) == 0
    assert "aesthetics" in (reference_run / "report.html").read_text()


class _ScrfdShaped(torch.nn.Module):
    """A face detector with the input and the nine outputs of buffalo_l's det_10g.onnx (SCRFD: for strides 8, 16,
    32 and two anchors per place, scores [N, 1], then boxes [N, 4], then 5 landmarks [N, 10]), random weights."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(3, 2 * (1 + 4 + 10), s, stride=s) for s in (8, 16, 32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, boxes, kps = [], [], []
        for head in self.heads:
            y = head(x).permute(0, 2, 3, 1)  # [1, h, w, 2 * 15]: per place, per anchor
            y = y.reshape(-1, 15)
            scores.append(torch.sigmoid(y[:, :1] - 2.0))
            boxes.append(torch.nn.functional.softplus(y[:, 1:5]) + 1.0)
            kps.append(y[:, 5:])
        return (*scores, *boxes, *kps)


def _grounding_dino(folder: Path) -> None:
    """A Grounding DINO folder as transformers saves IDEA-Research/grounding-dino-tiny (config, weights, processor
    with a BERT-style WordPiece tokenizer), small and random: Swin and BERT shrunk, the same architecture."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        PreTrainedTokenizerFast,
        SwinConfig,
    )
    from transformers import GroundingDinoImageProcessor as ImageProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "brown", "dog", "runs", "on", "the", "grass"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]
        ),
        text_config=BertConfig(
            vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=30, max_text_len=32,
    )  # fmt: skip
    torch.manual_seed(3)
    GroundingDinoForObjectDetection(cfg).save_pretrained(folder)
    image_processor = ImageProcessor(size={"shortest_edge": 224, "longest_edge": 320})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _subjects_weights(models: Path) -> None:
    """SAM2.1 hiera-tiny in SAM2's checkpoint format ({"model": state_dict}), insightface's buffalo_l folder with
    a detection model of det_10g.onnx's shape and a Grounding DINO folder, all random."""
    from sam2.build_sam import build_sam2_video_predictor

    _grounding_dino(models / "grounding-dino-tiny")

    torch.manual_seed(2)
    sam = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    (models / "sam2").mkdir()
    torch.save({"model": sam.state_dict()}, models / "sam2" / "sam2.1_hiera_tiny.pt")
    det = models / "insightface" / "models" / "buffalo_l"
    det.mkdir(parents=True)
    torch.onnx.export(
        _ScrfdShaped().eval(),
        (torch.zeros(1, 3, 640, 640),),
        str(det / "det_10g.onnx"),
        input_names=["input.1"],
        dynamic_axes={"input.1": {2: "h", 3: "w"}},
        opset_version=17,
        dynamo=False,
    )


@pytest.fixture(scope="module")
def subjects_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sam2")
    pytest.importorskip("insightface")
    tmp = tmp_path_factory.mktemp("reference-subjects")
    models = tmp / "models"
    models.mkdir()
    _subjects_weights(models)
    overrides = [
        "runner=local",
        "progress=false",
        "stages=[probe,scenecut,caption,subjects,package]",
        "subjects.backend=reference",
        f"subjects.models_dir={models}",
        "subjects.sam2_config=configs/sam2.1/sam2.1_hiera_t.yaml",
        "subjects.resources.gpus=0",
        "subjects.track_frames=4",  # SAM2 on the CPU: a few frames are enough to show the path runs
        "subjects.box_threshold=0",  # random Grounding DINO: take its best box, whatever its score
        "subjects.text_threshold=0",
        "scenecut.max_clip_s=4",
    ]
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    Pipeline(cfg, tmp / "run").run(str(caption_list(tmp / "list.csv", {"sam2_01_dog.mp4": "A brown dog runs."})))
    return tmp / "run"


def test_subjects_reference_runs_sam2_and_insightface_from_their_files(subjects_run: Path) -> None:
    import json

    m = Manifests(subjects_run)
    rows = m.rows(
        "SELECT subjects_backend, subjects_status, subjects_error, subjects_count, subjects_tracks, subjects_frames "
        "FROM clips WHERE subjects_status IS NOT NULL"
    )
    assert rows and all(r["subjects_backend"] == "reference:insightface+sam2" for r in rows)
    assert all(r["subjects_status"] in ("ok", "reject") for r in rows), rows  # no error rows: the path ran
    ok = [r for r in rows if r["subjects_status"] == "ok"]
    assert ok and all(r["subjects_count"] >= 1 for r in ok)
    for r in ok:  # SAM2 propagated a mask to every tracked frame of each kept track
        frames = {str(f) for f in r["subjects_frames"]}
        assert all(set(t["boxes"]) == frames for t in json.loads(r["subjects_tracks"]))
    # Grounding DINO looked for the caption's subject: a track carries its phrase and is linked to it
    every = [t for r in rows for k in ("subjects_tracks",) for t in json.loads(r[k] or "[]")]
    dog = [t for t in every if t.get("grounded_phrase") == "dog"]
    assert dog and all(t["subject_id"] == t["grounded_subject"] and t["link_confidence"] == 0.95 for t in dog)


def _tiny_qwen25_vl(folder: Path) -> None:
    """A Qwen2.5-VL folder as transformers saves one (config, weights, processor with image and video processors,
    tokenizer with Qwen's special tokens, chat template), small and random: Qwen2.5-VL-7B's files cannot be had."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    special += ["<|image_pad|>", "<|video_pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["A woman in a red coat walks a brown dog.", "Describe the clip.", "user assistant"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    ids = {t: tok.token_to_id(t) for t in special}
    template = (  # Qwen's chat layout: image and video placeholders between vision markers
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] in ('video', 'video_url') %}"
        "<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    hf = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    budget = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**budget),
        video_processor=Qwen2VLVideoProcessor(**budget),
        tokenizer=hf,
        chat_template=template,
    ).save_pretrained(folder)
    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": 0, "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": 0, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        },
        vision_config={
            "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "fullatt_block_indexes": [0], "window_size": 112,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(4)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    # a random model would also write Qwen's special tokens, which no trained one does (and which the server would
    # then refuse inside the extraction prompt): suppressed, as a trained model's distribution would have them
    model.generation_config.suppress_tokens = [i for t, i in ids.items() if t != "<|im_end|>"]
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def chat_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`transformers serve` (a real OpenAI-compatible server) with the tiny Qwen2.5-VL preloaded."""
    import json
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    model = tmp_path_factory.mktemp("qwen") / "qwen25vl-tiny"
    _tiny_qwen25_vl(model)
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("transformers serve is not installed (transformers[serving])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (model.parent / "serve.log").open("w")
    proc = subprocess.Popen([exe, "serve", str(model), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if json.loads(r.read())["data"]:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"transformers serve did not start: {(model.parent / 'serve.log').read_text()[-2000:]}")
        yield url, str(model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_caption_openai_backend_against_a_real_server(chat_endpoint: tuple[str, str], tmp_path: Path) -> None:
    """The caption stage's OpenAI path end to end: frames as images (a non-vLLM server), the caption prompt, then the
    extraction prompt with response_format, through HTTP to `transformers serve`. A random model writes nonsense,
    so the extraction cannot validate: those rows must be `error` rows that keep the raw answer, and nothing may
    fail at the transport."""
    url, model = chat_endpoint
    overrides = [
        "runner=local",
        "progress=false",
        "stages=[probe,scenecut,caption]",
        "caption.backend=openai",
        f"caption.endpoint={url}",
        f"caption.model={model}",
        "caption.openai_server=other",
        "caption.use_supplied=false",
        "caption.max_tokens=16",
        "caption.frames=2",
        "caption.timeout_s=120",
    ]
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    Pipeline(cfg, tmp_path / "run").run(media("sam2_01_dog.mp4"))
    rows = Manifests(tmp_path / "run").rows(
        "SELECT caption_status, caption_reason, caption_error, caption_backend, caption_raw FROM caption"
    )
    assert rows
    for r in rows:
        assert r["caption_backend"] == f"openai:{model}"
        assert "attempts" not in (r["caption_error"] or ""), r  # the server answered every request
        assert r["caption_status"] == "ok" or r["caption_raw"], r  # nonsense is kept for inspection, not dropped
