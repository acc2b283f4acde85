"""`curation sample` and `curation export-model` on the tiny config: a trained checkpoint generates a decodable mp4 of
the requested frames from a caption and reference crops; the export is a diffusers transformer folder that loads
with diffusers and generates the same video."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from curation.cli import main  # noqa: E402
from curation.errors import ConfigError  # noqa: E402
from curation.train.config import load_train_config  # noqa: E402
from curation.train.loop import Trainer  # noqa: E402
from tests.conftest import REPO  # noqa: E402

TINY = REPO / "configs" / "train_tiny.yaml"
PHOTOS = REPO.parent / "shared" / "media" / "photos"


@pytest.fixture(scope="module")
def trained(overfit_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    Trainer(load_train_config(TINY, ["checkpoint_every=3"]), str(overfit_run / "shards"), str(out)).fit(3)
    return out


def _refs(run: Path, dest: Path) -> dict[str, Path]:
    """Reference crops the pipeline wrote into the shard (member suffix -> file)."""
    dest.mkdir(parents=True, exist_ok=True)
    got: dict[str, Path] = {}
    with tarfile.open(next((run / "shards").glob("shard-*.tar"))) as tf:
        for m in tf.getmembers():
            suffix = m.name.split(".", 1)[1]
            if ("subject.png" in suffix or "face.jpg" in suffix) and suffix not in got:
                got[suffix] = dest / m.name
                got[suffix].write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
    return got


def _frames(path: Path) -> list:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_sample_writes_a_decodable_mp4_of_the_requested_frames(
    trained: Path, overfit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    refs = _refs(overfit_run, tmp_path / "refs")
    body = next(p for k, p in refs.items() if k.endswith("subject.png"))
    face = next(p for k, p in refs.items() if k.endswith("face.jpg"))
    out = tmp_path / "gen.mp4"
    args = ["sample", str(trained), "--caption", "A man in a dark suit talks to a woman beside a desk.",
            "--ref", f"man in a dark suit={body},{face}", "--ref", f"woman={PHOTOS / 'obama.jpg'}",
            "--out", str(out), "--frames", "5", "--size", "48x80", "--steps", "4"]  # fmt: skip
    assert main(args) == 0
    frames = _frames(out)
    assert len(frames) == 5 and frames[0].shape == (48, 80, 3)
    assert "wrote" in capsys.readouterr().out
    assert main(["sample", str(trained), "--caption", "A dog.", "--out", str(tmp_path / "b.mp4"), "--steps", "2"]) == 0
    assert len(_frames(tmp_path / "b.mp4")) == 9  # the config's longest frame bucket, no references at all
    bad = ["sample", str(trained), "--caption", "A dog runs.", "--ref", f"cat={body}", "--out", str(tmp_path / "c.mp4")]
    assert main(bad) == 1 and "not in the caption" in capsys.readouterr().err
    assert main([*bad[:4], "--ref", f"dog={body}", "--frames", "8", "--out", str(tmp_path / "c.mp4")]) == 1
    assert not (tmp_path / "c.mp4").exists()


def test_export_loads_in_diffusers_and_generates_the_same_video(trained: Path, tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    from curation.train.sample import Reference, export_model, generate, load_trained

    assert main(["export-model", str(trained), "--out", str(tmp_path / "exp")]) == 0
    dit = WanTransformer3DModel.from_pretrained(str(tmp_path / "exp" / "transformer"))
    model, enc, cfg, src = load_trained(trained)
    ours = model.transformer.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in dit.state_dict().items())
    ck_size = sum(f.stat().st_size for f in src.iterdir())
    ex_size = sum(f.stat().st_size for f in (tmp_path / "exp").rglob("*") if f.is_file())
    assert ex_size < 0.5 * ck_size  # no optimizer state
    refs = [Reference("woman", [str(PHOTOS / "obama.jpg")])]
    kw = {"frames": 5, "height": 64, "width": 64, "steps": 3, "seed": 7}
    a = generate(model, enc, cfg, "A woman waves.", refs, **kw)
    m2, e2, c2, _ = load_trained(tmp_path / "exp")
    b = generate(m2, e2, c2, "A woman waves.", refs, **kw)
    assert a.shape == (5, 64, 64, 3) and (a == b).all()
    other = generate(model, enc, cfg, "A woman waves.", refs, **{**kw, "seed": 8})
    assert not (a == other).all()
    export_model(trained, tmp_path / "bf16", "bfloat16")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert saved["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert saved["scale_shift_table"].dtype == torch.float32  # diffusers keeps these in fp32
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_trained(tmp_path)


def test_a_reference_binds_to_its_phrase_and_the_attributes_the_parser_gives_it() -> None:
    from curation.train.sample import caption_spans

    caption = "A man in a dark suit talks to a woman with red hair beside a desk."
    man = (caption.index("man"), caption.index("man") + 3)
    texts = {caption[a:b] for a, b in caption_spans(caption, man)}
    assert "man" in texts and any("dark suit" in t for t in texts) and not any("red hair" in t for t in texts)
    woman = (caption.index("woman"), caption.index("woman") + 5)
    assert any("red hair" in caption[a:b] for a, b in caption_spans(caption, woman))
    desk = (caption.index("beside"), caption.index("beside") + 6)  # names no subject: just the words given
    assert caption_spans(caption, desk) == [desk]
