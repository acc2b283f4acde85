"""Random weights in the reference backends' upstream checkpoint formats, for the reference lane
(`tests/test_reference_lane.py`) and `bench/gpu.py` where the real files are absent (nothing can be downloaded on the
machines this project is tested on). Same files, names and layouts as the downloads; the numbers are random, so
they show that a path runs and what it costs, never how good it is."""

from __future__ import annotations

from pathlib import Path

import torch


def clip_weights(models: Path) -> None:
    """OpenAI ViT-L/14 in open_clip's state-dict format (what timm/vit_large_patch14_clip_224.openai ships as
    open_clip_model.safetensors), random, plus the LAION head in its published `layers.N` layout."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(models / "open_clip_model.safetensors"))
    head = {}
    for i, (o, n) in {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items():
        head[f"layers.{i}.weight"] = torch.randn(o, n) * 0.02
        head[f"layers.{i}.bias"] = torch.zeros(o) + (5.0 if i == 7 else 0.0)
    torch.save(head, models / "sac+logos+ava1-l14-linearMSE.pth")


def watermark_weights(models: Path) -> None:
    """LAION's watermark detector layout: timm efficientnet_b3 (their b3a: the same network) with its 1536 -> 625 ->
    256 -> 2 classifier."""
    import timm

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


class ScrfdShaped(torch.nn.Module):
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


def grounding_dino(folder: Path) -> None:
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


def subjects_weights(models: Path, sam2_config: str = "configs/sam2.1/sam2.1_hiera_t.yaml") -> None:
    """SAM2.1 hiera-tiny in SAM2's checkpoint format ({"model": state_dict}), insightface's buffalo_l folder with
    a detection model of det_10g.onnx's shape and a Grounding DINO folder, all random."""
    from sam2.build_sam import build_sam2_video_predictor

    from curation.stages.subjects import sam2_checkpoint

    grounding_dino(models / "grounding-dino-tiny")

    torch.manual_seed(2)
    sam = build_sam2_video_predictor(sam2_config, ckpt_path=None, device="cpu")
    (models / "sam2").mkdir()
    torch.save({"model": sam.state_dict()}, models / "sam2" / sam2_checkpoint(sam2_config))
    det = models / "insightface" / "models" / "buffalo_l"
    det.mkdir(parents=True)
    torch.onnx.export(
        ScrfdShaped().eval(),
        (torch.zeros(1, 3, 640, 640),),
        str(det / "det_10g.onnx"),
        input_names=["input.1"],
        dynamic_axes={"input.1": {2: "h", 3: "w"}},
        opset_version=17,
        dynamo=False,
    )


class _PaintShaped(torch.nn.Module):
    """LaMa's TorchScript interface (image, mask) -> image in [0, 1], with one random convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        painted = torch.sigmoid(self.conv(torch.cat([image * (1 - mask), mask], dim=1)))
        return image * (1 - mask) + painted * mask


def crops_weights(models: Path) -> None:
    """The crops reference backend's LaMa file (`lama/big-lama.pt`, TorchScript), random; it shares subjects'
    SAM2 checkpoint and Grounding DINO folder (`subjects_weights`)."""
    (models / "lama").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(4)
    torch.jit.script(_PaintShaped().eval()).save(str(models / "lama" / "big-lama.pt"))


def tiny_qwen25_vl(folder: Path) -> None:
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
