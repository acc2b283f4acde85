"""`curation train` on the tiny config: the loss goes down on an overfit set made by the pipeline from real media,
the mask loss pulls each subject's attention onto its mask, a resumed run equals an uninterrupted one, and bad
configs fail early with a fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from curation.cli import main  # noqa: E402
from curation.errors import ConfigError  # noqa: E402
from curation.train.config import build_train_config, load_train_config  # noqa: E402
from curation.train.loop import Trainer, mask_kl, token_masks  # noqa: E402
from tests.conftest import REPO  # noqa: E402

TINY = REPO / "configs" / "train_tiny.yaml"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_trains_and_the_loss_goes_down(overfit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "train"
    args = ["train", str(TINY), "--shards", str(overfit_run / "shards"), "--out", str(out)]
    assert main(args) == 0
    m = _metrics(out)
    assert [r["step"] for r in m] == list(range(1, 61))
    first = sum(r["loss"] for r in m[:10]) / 10
    last = sum(r["loss"] for r in m[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert sum(r["flow"] for r in m[-10:]) < 0.5 * sum(r["flow"] for r in m[:10])
    assert all("mask" in r for r in m) and max(r["subjects"] for r in m) >= 2
    assert (out / "checkpoints" / "step-00000060" / "model.pt").is_file()
    assert "step     60" in capsys.readouterr().out
    assert main(args) == 0  # rerun: already at 60 steps, nothing more is trained
    assert "trained 0 step(s) to step 60" in capsys.readouterr().out
    assert len(_metrics(out)) == 60


def test_resumed_training_equals_uninterrupted(overfit_run: Path, tmp_path: Path) -> None:
    cfg = load_train_config(TINY, ["checkpoint_every=3", "keep_checkpoints=1"])
    shards = str(overfit_run / "shards")
    straight = Trainer(cfg, shards, str(tmp_path / "a"))
    straight.fit(6)
    first = Trainer(cfg, shards, str(tmp_path / "b"))
    first.fit(3)  # stops at the step-3 checkpoint: a new process would start from here
    second = Trainer(cfg, shards, str(tmp_path / "b"))
    assert second.fit(6) and second.step == 6
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _metrics(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _metrics(tmp_path / "b")]
    assert [p.name for p in second.checkpoints()] == ["step-00000006"]  # keep_checkpoints=1


def test_mask_loss_pulls_attention_onto_the_mask(overfit_run: Path, tmp_path: Path) -> None:
    """On a fixed batch and noise, descending the mask loss alone makes it fall: gradients reach the attention."""
    cfg = load_train_config(TINY, ["optim.lr=0.003"])
    tr = Trainer(cfg, str(overfit_run / "shards"), str(tmp_path))
    batch = next(b for b, _ in tr.stream.batches() if b["mask_valid"].any())
    values = []
    for _ in range(30):
        tr.opt.zero_grad()
        mk = tr.losses(batch, step=0)["mask"]
        mk.backward()
        tr.opt.step()
        values.append(float(mk.detach()))
    assert values[-1] < 0.3 * values[0], values


def test_token_masks_follow_wans_latent_frames() -> None:
    masks = torch.zeros(1, 1, 9, 32, 32, dtype=torch.uint8)
    masks[0, 0, 0, :16, :16] = 1  # frame 0: top-left quarter -> latent frame 0
    masks[0, 0, 1:5, 16:, 16:] = 1  # frames 1-4: bottom-right -> latent frame 1
    valid = torch.ones(1, 1, 9, dtype=torch.bool)
    valid[0, 0, 5:] = False  # frames 5-8 have no mask -> latent frame 2 invalid
    target, ok = token_masks(masks, valid, (3, 2, 2), t_factor=4)
    assert target.shape == ok.shape == (1, 1, 12)
    assert target[0, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert ok[0, 0].tolist() == [True] * 8 + [False] * 4
    mass = torch.tensor([[[0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.5, 0.5, 0.5, 0.5]]])
    good = mask_kl(mass, target, ok)
    bad = mask_kl(mass.flip(-1), target, ok)
    assert good is not None and bad is not None and good < bad
    assert mask_kl(mass, torch.zeros_like(target), ok) is None


def test_bad_train_configs_fail_early_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"huggingface\.co/Wan-AI"):
        build_train_config({"model": {"kind": "pretrained"}})
    (tmp_path / "wan" / "vae").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"lacks transformer/, text_encoder/, tokenizer/.*Wan2.1-T2V-1.3B"):
        build_train_config({"model": {"kind": "pretrained", "path": str(tmp_path / "wan")}})
    with pytest.raises(ConfigError, match=r"4n\+1"):
        build_train_config({"data": {"frames": [8]}})
    with pytest.raises(ConfigError, match="multiples of 16"):
        build_train_config({"data": {"buckets": [[50, 64]]}})
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        build_train_config({"stepz": 3})
    cfg = load_train_config(TINY)
    with pytest.raises(ConfigError, match=r"no shard-\*\.tar"):
        Trainer(cfg, str(tmp_path), str(tmp_path / "out"))
    assert main(["train", str(TINY), "--shards", str(tmp_path), "--out", str(tmp_path / "o")]) == 1


def test_gradient_checkpointing_and_bf16_train_the_same_model(overfit_run: Path, tmp_path: Path) -> None:
    """The full config's memory options: checkpointed blocks give the same loss and gradients (the mask-loss capture
    survives recomputation), and a bf16 autocast step is finite and close."""
    shards = str(overfit_run / "shards")
    plain = Trainer(load_train_config(TINY), shards, str(tmp_path / "p"))
    batch = next(b for b, _ in plain.stream.batches() if b["mask_valid"].any())
    grads = []
    for opts in ([], ["model.gradient_checkpointing=true"]):
        tr = Trainer(load_train_config(TINY, opts), shards, str(tmp_path / str(len(opts))))
        ls = tr.losses(batch, step=0)
        ls["loss"].backward()
        grads.append((float(ls["loss"].detach()), float(ls["mask"].detach()), [p.grad.clone() for p in tr.params]))
    (l0, m0, g0), (l1, m1, g1) = grads
    assert abs(l0 - l1) < 1e-6 and abs(m0 - m1) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1, strict=True))
    bf = Trainer(load_train_config(TINY, ["model.mixed_precision=bf16"]), shards, str(tmp_path / "bf"))
    lb = float(bf.losses(batch, step=0)["loss"].detach())
    assert abs(lb - l0) < 0.1 * l0, (lb, l0)


def test_pretrained_tokenizer_maps_caption_spans_through_offsets(tmp_path: Path) -> None:
    """The pretrained config's tokenizer path (a transformers fast tokenizer from a folder), with a word-level
    tokenizer built here standing in for umT5's, whose vocabulary cannot be downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from curation.train.text import HFTokenizer, span_tokens

    caption = "A woman in a white top plays with a dog."
    words = sorted({w.strip(".") for w in caption.split()} | {"."})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "tok")
    enc = HFTokenizer(str(tmp_path / "tok")).encode(caption, 16)
    assert len(enc.ids) == 16 and enc.valid.count(True) == 11
    woman = (caption.index("woman"), caption.index("woman") + 5)
    top = (caption.index("white top"), caption.index("white top") + 9)
    sel = span_tokens(enc, [woman, top])
    assert [caption[a:b] for (a, b), on in zip(enc.offsets, sel.tolist(), strict=True) if on] == [
        "woman",
        "white",
        "top",
    ]
