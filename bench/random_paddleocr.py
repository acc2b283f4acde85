"""Random PP-OCRv5 server models in PaddleOCR 3's inference format (`inference.json` + `inference.pdiparams` +
`inference.yml`, one folder per model, as PaddleOCR downloads them into ~/.paddlex/official_models), for the PaddleOCR
lane (`tests/test_paddle_lane.py`) where the real files cannot be downloaded. The networks are PaddleX's own
PP-OCRv5 server detection and recognition architectures, randomly initialised and exported with `paddle.jit.save`;
the recogniser's character set is printable ASCII instead of the real 18,383-character dictionary. Kept apart from
`random_weights.py` because it needs paddlepaddle, which lives in its own venv (its OpenMP and OpenCV builds clash
with torch's and ours)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

DET, REC = "PP-OCRv5_server_det", "PP-OCRv5_server_rec"


def _export(net: Any, folder: Path, shape: list[int | None], config: dict[str, Any]) -> None:
    """Save `net` (PaddleX's model: a `model` trunk and a `head`) as a static inference graph with its config."""
    import paddle
    import yaml
    from paddle.static import InputSpec

    class Graph(paddle.nn.Layer):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner.head(self.inner.model(x))

    graph = Graph(net)
    graph.eval()
    folder.mkdir(parents=True, exist_ok=True)
    paddle.jit.save(graph, str(folder / "inference"), input_spec=[InputSpec(shape, "float32", "x")])
    (folder / "inference.yml").write_text(yaml.safe_dump(config, sort_keys=False))


def paddleocr_models(models: Path, seed: int = 0) -> Path:
    """Write `models/paddleocr/PP-OCRv5_server_det` and `..._rec` (random); returns `models/paddleocr`."""
    import paddle
    from paddlex.inference.models.text_detection.modeling.pp_ocrv5_server_det import (
        PPOCRV5ServerDet,
        PPOCRV5ServerDetConfig,
    )
    from paddlex.inference.models.text_recognition.modeling.pp_ocrv5_server_rec import (
        PPOCRV5ServerRec,
        PPOCRV5ServerRecConfig,
    )

    root = models / "paddleocr"
    paddle.seed(seed)
    det = {
        "Global": {"model_name": DET},
        "PreProcess": {
            "transform_ops": [
                {"DecodeImage": {"channel_first": False, "img_mode": "BGR"}},
                {"DetLabelEncode": None},
                {"DetResizeForTest": {"resize_long": 960}},
                {
                    "NormalizeImage": {
                        "mean": [0.485, 0.456, 0.406],
                        "std": [0.229, 0.224, 0.225],
                        "scale": "1./255.",
                        "order": "hwc",
                    }
                },
                {"ToCHWImage": None},
                {"KeepKeys": {"keep_keys": ["image", "shape", "polys", "ignore_tags"]}},
            ]
        },
        "PostProcess": {
            "name": "DBPostProcess",
            "thresh": 0.3,
            "box_thresh": 0.6,
            "max_candidates": 1000,
            "unclip_ratio": 1.5,
        },
    }
    _export(PPOCRV5ServerDet(PPOCRV5ServerDetConfig()), root / DET, [None, 3, None, None], det)
    chars = [c for c in string.printable if not c.isspace()]
    rec = {
        "Global": {"model_name": REC},
        "PreProcess": {
            "transform_ops": [
                {"DecodeImage": {"channel_first": False, "img_mode": "BGR"}},
                {"MultiLabelEncode": {"gtc_encode": "NRTRLabelEncode"}},
                {"RecResizeImg": {"image_shape": [3, 48, 320]}},
                {"KeepKeys": {"keep_keys": ["image", "label_ctc", "label_gtc", "length", "valid_ratio"]}},
            ]
        },
        "PostProcess": {"name": "CTCLabelDecode", "character_dict": chars},
    }
    # CTC classes: a blank, the characters, a space
    _export(PPOCRV5ServerRec(PPOCRV5ServerRecConfig(head_out_channels=len(chars) + 2)), root / REC,
            [None, 3, 48, None], rec)  # fmt: skip
    return root
