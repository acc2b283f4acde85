"""`curation export FORMAT`: a run's shards in the layouts released trainers and benchmarks read.

Formats (one module each): `lumosx` (LumosX inference / benchmark folders), `lumosx-train` (LumosX's training table
and per-video info.json with masks), `opens2v` (OpenS2V-5M records), `concat-id` (Concat-ID's training list) and
`opens2v-eval` (an OpenS2V-Eval style benchmark split). All read the same samples, streamed shard by shard, so a
selection or a rerun needs no recomputation.

Every clip ends in the export manifest (`<out>/manifest/<format>/part-*.parquet`: clip_id, status ok | skip | error,
reason, notes, files, record), so a clip missing from an export says why. A rerun skips the clips the manifest holds
for the same sample (a fingerprint of its shard json), exporter version and options; errors are tried again. The index
(`<out>/<format>.json`, ...) lists the clips of this export's shards and selection. Media shared between formats
(`<out>/media/<clip_id>/`) are written when absent or changed, and a layout's own copies are hard links to them where
the filesystem allows. A clip's folder in a folder layout is built aside and renamed into place, so a reader listing
the folder never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curation.errors import CurationError

log = logging.getLogger(__name__)

FORMATS = ("lumosx", "lumosx-train", "opens2v", "concat-id", "opens2v-eval")


@dataclass
class Sample:
    """One clip as the shards hold it: the sample json, its members by suffix (`mp4`, `masks.json`, ...), and a
    fingerprint of the json (what a rerun compares to know the clip changed)."""

    clip_id: str
    meta: dict[str, Any]
    members: dict[str, bytes]
    shard: str
    fingerprint: str = ""

    @property
    def caption(self) -> str:
        return str(self.meta.get("caption") or "")

    def subject(self, sid: int | None) -> dict[str, Any] | None:
        return next((s for s in self.meta.get("subjects") or [] if s.get("id") == sid), None)

    def phrase(self, span: Any) -> str | None:
        """The caption text under a span ({start, end} or [start, end])."""
        if not span:
            return None
        a, b = (span["start"], span["end"]) if isinstance(span, dict) else span
        return self.caption[a:b]

    def member(self, name: str | None) -> bytes | None:
        """A member named in the sample json (`<clip_id>.<suffix>`) or by its suffix; None when absent or empty."""
        if not name:
            return None
        suffix = name.split(".", 1)[1] if name.startswith(self.clip_id + ".") else name
        return self.members.get(suffix) or None


@dataclass
class Result:
    """What an exporter did with a clip: `ok` with the files written and its index record, or `skip` and why."""

    status: str
    reason: str | None = None
    files: list[str] = field(default_factory=list)
    record: Any = None
    notes: list[str] = field(default_factory=list)  # parts left out of an ok clip, and why


def iter_samples(
    run: Path, keep: set[str] | None = None, wanted: Callable[[str, str], bool] | None = None
) -> Iterator[Sample]:
    """The run's samples, shard by shard, in the order they were written. `wanted(clip_id, fingerprint)` is asked
    after a sample's json is read (the shard writer puts it first); a sample it declines is yielded with no members
    read. A shard that cannot be read ends the export naming it."""
    shards = sorted((run / "shards").glob("shard-*.tar"))
    if not shards:
        raise CurationError(f"{run} has no shards: run `curation run` (or `curation stage package`) first")
    for shard in shards:
        try:
            yield from _shard_samples(shard, keep, wanted)
        except tarfile.TarError as exc:
            raise CurationError(f"shard {shard} cannot be read ({exc}): it is damaged or cut short") from None


def _shard_samples(shard: Path, keep: set[str] | None, wanted: Callable[[str, str], bool] | None) -> Iterator[Sample]:
    current: Sample | None = None
    read = False
    with tarfile.open(shard) as tar:
        for info in tar:
            if not info.isfile():
                continue
            cid, _, suffix = info.name.partition(".")
            if current is not None and cid != current.clip_id:
                yield current
                current = None
            if keep is not None and cid not in keep:
                continue
            if current is None:
                current, read = Sample(cid, {}, {}, shard.name), False
            if suffix == "json":
                fh = tar.extractfile(info)
                data = fh.read() if fh else b"{}"
                current.fingerprint = hashlib.sha1(data).hexdigest()[:16]
                try:
                    current.meta = json.loads(data)
                except ValueError as exc:  # becomes the clip's error row
                    current.meta = {"_broken": f"sample json: {exc}"}
                read = wanted is None or wanted(cid, current.fingerprint)
            elif read:
                fh = tar.extractfile(info)
                current.members[suffix] = fh.read() if fh else b""
    if current is not None:
        yield current


MAX_NAME_BYTES = 200  # file names are at most 255 bytes; room for a prefix and the extension


def phrase_problem(
    caption: str, span: Any, phrase: str | None, role: str, matcher: Callable[[str, str], bool] | None = None
) -> str | None:
    """Why `phrase` cannot name a file that a LumosX-style reader binds to the caption, or None.

    Readers tokenize the caption and the file's name and look for the name's tokens in the caption's, so the name must
    be the caption's own text at its span, start and end on word boundaries (a SentencePiece word starts after a
    space), and avoid what the readers strip or test for: a `.` (the name is cut at the first one), a path
    separator, and for attributes the word "face" (a file with "face" in its name is read as a face). `matcher(caption,
    phrase)`, when given, is the reader's own token match (e.g. with the text encoder's tokenizer)."""
    if not phrase or not span:
        return "no_span"
    a, b = (span["start"], span["end"]) if isinstance(span, dict) else span
    if caption[a:b] != phrase or phrase != phrase.strip():
        return "not_verbatim"
    if (a > 0 and not caption[a - 1].isspace()) or (b < len(caption) and caption[b].isalnum()):
        return "not_word_aligned"
    if re.search(r"[./\\\x00]", phrase):
        return "bad_character"
    if len(phrase.encode()) > MAX_NAME_BYTES:
        return "too_long"
    if role == "attribute" and ("face" in phrase.lower() or "fullfullbody" in phrase.lower()):
        return "face_in_attribute"
    if matcher is not None and not matcher(caption, phrase):
        return "no_token_match"
    return None


def token_matcher(tokenizer_dir: str) -> Callable[[str, str], bool]:
    """LumosX's binding test with a real tokenizer (e.g. the umt5-xxl folder of a Wan2.1 checkpoint)."""
    from curation.errors import require

    tok = require("transformers", "export --tokenizer").AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda caption, phrase: tokens_contain(tok(caption)["input_ids"], tok(phrase)["input_ids"], tok.eos_token_id)


def tokens_contain(caption_ids: list[int], phrase_ids: list[int], eos: int | None) -> bool:
    """Whether the phrase's token ids, cut at its end-of-sequence token, occur contiguously in the caption's: how
    LumosX binds a reference image's name to the words of its prompt."""
    if eos is not None and eos in phrase_ids:
        phrase_ids = phrase_ids[: phrase_ids.index(eos)]
    n = len(phrase_ids)
    return n > 0 and any(caption_ids[i : i + n] == phrase_ids for i in range(len(caption_ids) - n + 1))


class Writer:
    """Files of one export: atomic writes, media shared between formats, hard links for a layout's copies."""

    def __init__(self, out: Path, media_root: Path | None = None) -> None:
        self.out = out
        self.media_root = media_root or out

    def write(self, rel: str, data: bytes) -> Path:
        """`rel` under the export, replaced atomically."""
        from curation.manifest import atomic_write_bytes

        path = self.out / rel
        atomic_write_bytes(path, data, durable=False)  # the export manifest, written after, is the record
        return path

    def media(self, clip_id: str, name: str, data: bytes) -> Path:
        """`media/<clip_id>/<name>`, shared by every format: written when absent or different."""
        path = self.media_root / "media" / clip_id / name
        if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
        return Writer(self.media_root).write(f"media/{clip_id}/{name}", data)

    def place(self, rel: str, src: Path) -> Path:
        """A layout's copy of a media file: a hard link where possible."""
        dst = self.out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            self.write(rel, src.read_bytes())
        return dst

    @contextmanager
    def folder(self, rel: str) -> Iterator[Writer]:
        """Build the folder `rel` aside (a Writer rooted there) and rename it into place when the block ends
        without an error; a folder of the same name is replaced."""
        staging = self.out / ".staging" / uuid.uuid4().hex[:12]
        staging.mkdir(parents=True)
        try:
            yield Writer(staging, self.media_root)
            final = self.out / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            old = None
            if final.exists():
                old = self.out / ".staging" / f"old-{uuid.uuid4().hex[:12]}"
                os.replace(final, old)
            try:
                os.replace(staging, final)
            except OSError:
                if old is not None:  # the clip keeps its previous folder
                    os.replace(old, final)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove(self, rel: str) -> None:
        """Remove a clip's earlier output (a folder or a file) when the clip is no longer exported."""
        path = self.out / rel
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


class Exporter:
    """A format: `add` one sample (write its files, return its record), `finish` writes the index."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"  # bump when the output changes: earlier exports of a clip count as stale
    uses_tokenizer: ClassVar[bool] = False  # whether `--tokenizer` changes what this format writes

    def __init__(self, writer: Writer, options: dict[str, Any]) -> None:
        self.w = writer
        self.options = options

    def add(self, s: Sample) -> Result:
        raise NotImplementedError

    def finish(self, records: list[tuple[str, Any]]) -> list[str]:
        """Write the index from every exported clip's record (this run's and earlier ones'); returns its paths."""
        return []

    def remove(self, clip_id: str) -> None:
        """Take back a clip exported before that is now skipped or failed: for formats whose readers list folders
        (no index file to leave it out of)."""


def png(data: bytes) -> bytes:
    """Any image member as an RGB PNG (LumosX's readers want .png; face crops are stored as jpg)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("an image member could not be decoded")
    ok, enc = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("image could not be re-encoded as png")
    return enc.tobytes()


def _exporters() -> dict[str, type[Exporter]]:
    from curation.export.concat_id import ConcatId
    from curation.export.lumosx import LumosX, LumosXTrain
    from curation.export.opens2v import OpenS2V, OpenS2VEval

    return {c.name: c for c in (LumosX, LumosXTrain, OpenS2V, ConcatId, OpenS2VEval)}


@dataclass
class ExportReport:
    format: str
    ok: int
    skipped: dict[str, int]
    errors: int
    already: int
    seconds: float
    index: list[str]


def export(
    fmt: str,
    run: str | Path,
    out: str | Path,
    selection: str | None = None,
    tokenizer: str | None = None,
    progress: Callable[[int], None] | None = None,
    flush_every: int = 200,
) -> ExportReport:
    """Export a run's shards in `fmt` to `out`; resumes from the export manifest there. `tokenizer`: a tokenizer
    folder every LumosX phrase is also checked with."""
    import pyarrow as pa

    from curation.manifest import atomic_write_table
    from curation.stage import STORAGE_ERRNOS

    exporters = _exporters()
    if fmt not in exporters:
        raise CurationError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    run, out = Path(run), Path(out)
    keep = None
    if selection:
        path = run / "selections" / f"{selection}.parquet"
        if not path.is_file():
            raise CurationError(f"no selection {selection!r} in {run}: make it with `curation select`")
        import pyarrow.parquet as pq

        keep = set(pq.read_table(path, columns=["clip_id"]).column("clip_id").to_pylist())
    options = {"matcher": token_matcher(tokenizer)} if tokenizer else {}
    cls = exporters[fmt]
    key = f"{fmt}:{cls.version}:{os.path.realpath(tokenizer) if tokenizer and cls.uses_tokenizer else ''}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ".staging", ignore_errors=True)  # folders a killed export was building
    exporter = cls(Writer(out), options)
    mdir = out / "manifest" / fmt
    done: dict[str, dict[str, Any]] = {}
    for part in sorted(mdir.glob("part-*.parquet")):
        for r in _read_part(part):
            done[r["clip_id"]] = r

    def current(cid: str, fp: str) -> bool:
        r = done.get(cid)
        # rows written before fingerprints were recorded have none: they count as stale
        return r is not None and r["status"] != "error" and r.get("fingerprint") == fp and r.get("exporter") == key

    def prev_ok(cid: str) -> bool:
        r = done.get(cid)
        return r is not None and r["status"] == "ok"

    t0 = time.perf_counter()
    pending: list[dict[str, Any]] = []
    seen: list[str] = []
    already = 0

    def flush() -> None:
        if pending:
            table = pa.Table.from_pylist(pending, schema=_schema())
            atomic_write_table(table, mdir / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")
            pending.clear()

    try:
        for s in iter_samples(run, keep, lambda cid, fp: not current(cid, fp)):
            seen.append(s.clip_id)
            if current(s.clip_id, s.fingerprint):
                already += 1
                continue
            try:  # every format binds references to caption words: a clip without a real caption has none
                captioned = s.caption and s.meta.get("caption_origin") != "template"
                if "_broken" in s.meta:
                    res = Result("error", "broken_sample", notes=[s.meta["_broken"]])
                else:
                    res = exporter.add(s) if captioned else Result("skip", "no_caption")
            except CurationError:
                raise
            except Exception as exc:  # a per-clip failure is data; a full or read-only disk ends the export
                if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
                    raise
                log.warning("export %s: clip %s failed: %s: %s", fmt, s.clip_id, type(exc).__name__, exc)
                res = Result("error", type(exc).__name__, notes=[str(exc)])
            row = {
                "clip_id": s.clip_id,
                "format": fmt,
                "exporter": key,
                "fingerprint": s.fingerprint,
                "status": res.status,
                "reason": res.reason,
                "notes": json.dumps(res.notes, ensure_ascii=False),
                "files": json.dumps(res.files, ensure_ascii=False),
                "record": json.dumps(res.record, ensure_ascii=False) if res.record is not None else None,
                "shard": s.shard,
                "exported_ts": time.time(),
            }
            if res.status != "ok" and prev_ok(s.clip_id):
                exporter.remove(s.clip_id)
            pending.append(row)
            done[s.clip_id] = row
            if progress is not None:
                progress(1)
            if len(pending) >= flush_every:
                flush()
    finally:
        flush()
    rows = [done[c] for c in seen]
    records = sorted((r["clip_id"], json.loads(r["record"])) for r in rows if r["status"] == "ok" and r["record"])
    index = exporter.finish(records)
    skipped: dict[str, int] = {}
    for r in rows:
        if r["status"] == "skip":
            skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
    return ExportReport(
        fmt,
        ok=sum(r["status"] == "ok" for r in rows),
        skipped=skipped,
        errors=sum(r["status"] == "error" for r in rows),
        already=already,
        seconds=time.perf_counter() - t0,
        index=index,
    )


def _schema() -> Any:
    import pyarrow as pa

    names = ["clip_id", "format", "exporter", "fingerprint", "status", "reason", "notes", "files", "record", "shard"]
    return pa.schema([*((n, pa.string()) for n in names), ("exported_ts", pa.float64())])


def _read_part(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
