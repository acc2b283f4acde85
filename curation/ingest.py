"""Turn `--input` (a folder, a glob, a video, or a CSV/JSONL/TXT list) into one row per input video."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from curation.errors import ConfigError
from curation.stage import Row
from curation.storage import access_error, is_remote, list_remote

log = logging.getLogger(__name__)

LIST_EXTENSIONS = frozenset({".csv", ".jsonl", ".txt", ".json"})
# Caption keys of OpenS2V-style metadata ({key: {"metadata": {"path": ..., "face_cap_qwen": ...}}}), in order.
OPENS2V_CAPTION_KEYS = ("cap", "caption", "face_cap_qwen", "cap_qwen", "caption_qwen")


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def video_id(uri: str) -> str:
    """Stable id of an input: lowercase hex, no dots."""
    return _hash(uri)


def clip_id(uri: str, start_frame: int, end_frame: int) -> str:
    """Stable id of a clip `[start_frame, end_frame)` of `uri`: identical across reruns with the same cuts."""
    return _hash(f"{uri}#{start_frame}-{end_frame}")


def _uri(path: str | Path, base: Path | None = None) -> str:
    text = str(path)
    if "://" in text:
        return text
    p = Path(text).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return str(p.resolve())


def _sidecar_caption(uri: str) -> str | None:
    if "://" in uri:
        return None
    p = Path(uri)
    for cand in (p.with_suffix(".txt"), p.with_name(p.name + ".txt")):
        if cand.is_file() and cand.suffix == ".txt" and cand != p:
            text = cand.read_text(encoding="utf-8", errors="replace").strip()
            return text or None
    return None


def _from_list(path: Path) -> Iterator[tuple[str, str | None]]:
    """(uri, caption) of every entry of a list file, read as it goes (a CSV, JSONL or text list of millions of
    videos is never held whole)."""
    base = path.parent
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ConfigError(
                    f"{path}: a CSV input list needs a header with a `path` column (and optional `caption`)"
                )
            for rec in reader:
                if rec.get("path"):
                    yield (_uri(rec["path"], base), (rec.get("caption") or None))
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        entries = data.values() if isinstance(data, dict) else data if isinstance(data, list) else None
        if entries is None:
            raise ConfigError(f"{path}: expected OpenS2V-style metadata: an object of entries with metadata.path")
        for n, entry in enumerate(entries):
            meta = entry.get("metadata", entry) if isinstance(entry, dict) else None
            if not isinstance(meta, dict) or "path" not in meta:
                raise ConfigError(f"{path}: entry {n} has no metadata.path (OpenS2V-style metadata expected)")
            cap = next(
                (meta[k] for k in OPENS2V_CAPTION_KEYS if isinstance(meta.get(k), str) and meta[k].strip()), None
            )
            yield (_uri(meta["path"], base), cap.strip() if cap else None)
    elif path.suffix == ".jsonl":
        for n, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{n}: not valid JSON ({exc}); each line must be an object with `path`"
                ) from None
            if not isinstance(rec, dict) or "path" not in rec:
                raise ConfigError(f"{path}:{n}: each JSONL line needs a `path` key (and optional `caption`)")
            yield (_uri(rec["path"], base), rec.get("caption") or None)
    else:
        for line in _lines(path):
            if line.strip() and not line.lstrip().startswith("#"):
                yield (_uri(line.strip(), base), None)


def _folder_inputs(folder: Path) -> list[Path]:
    """Every regular file of a folder, recursively, whatever its extension (probe decides what is a video: raw
    `.h264`, `.gif` and unknown extensions included), except hidden files and the `.txt` caption beside a file of the
    same name (taken as that file's caption)."""
    files = sorted(
        f for f in folder.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts)
    )
    return _without_sidecars(files)


def _without_sidecars(files: list[Path]) -> list[Path]:
    """Drop the `.txt` files that are the captions of other files in the list (`clip.txt` / `clip.mp4.txt`)."""
    others = [f for f in files if f.suffix != ".txt"]
    names = {f.with_suffix("") for f in others} | set(others)
    sidecars = {f for f in files if f.suffix == ".txt" and f.with_suffix("") in names}
    if sidecars:
        log.info("%d caption file(s) taken as the captions of the files beside them", len(sidecars))
    return [f for f in files if f not in sidecars]


def _remote_inputs(spec: str) -> list[tuple[str, str | None]]:
    """(uri, caption) for every object under a remote prefix / glob, `.txt` captions beside their videos read."""
    fs, paths = list_remote(spec)
    by_stem: dict[str, str] = {}
    for q in paths:
        if not q.endswith(".txt"):
            by_stem[str(PurePosixPath(q).with_suffix(""))] = q
            by_stem[q] = q
    captions: dict[str, str] = {}
    for q in paths:
        if q.endswith(".txt") and (owner := by_stem.get(q[: -len(".txt")])) is not None and owner != q:
            try:
                text = fs.cat_file(q).decode("utf-8", errors="replace").strip()
            except Exception as exc:
                raise access_error(fs.unstrip_protocol(q), exc) from None
            if text:
                captions[owner] = text
    kept = [q for q in paths if not (q.endswith(".txt") and by_stem.get(q[: -len(".txt")], q) != q)]
    return [(fs.unstrip_protocol(q), captions.get(q)) for q in kept]


def iter_inputs(spec: str | Path) -> Iterator[Row]:
    """Inputs: a folder, a glob, a video, or a list (.csv / .jsonl with `path` and optional `caption`, .txt with one
    path a line, or OpenS2V-style .json metadata whose caption is taken from cap / face_cap_qwen / ...).

    Rows `{video_id, uri, given_caption, given_caption_source}`, deduplicated by uri, in a stable order.

    (`given_`: the `caption_` prefix belongs to the caption stage.)

    Missing files named by a list are kept (they become probe `error` rows), so no input silently disappears.
    Rows are produced as the folder, bucket or list is read, so ingest can write them in chunks.
    """
    text = str(spec)
    p = Path(text).expanduser()
    entries: Iterable[tuple[str, str | None]]
    source = "list"
    if is_remote(text):
        entries = _remote_inputs(text)
        source = "sidecar"
    elif p.is_dir():
        entries = [(_uri(f), None) for f in _folder_inputs(p)]
    elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
        entries = _from_list(p)
    elif p.is_file():
        entries = [(_uri(p), None)]
    elif any(ch in text for ch in "*?["):
        matched = [Path(f) for f in sorted(glob.glob(text, recursive=True)) if Path(f).is_file()]
        entries = [(_uri(f), None) for f in _without_sidecars(matched)]
    else:
        raise ConfigError(f"input {text!r} is not a folder, a video, a glob or a list file (.csv/.jsonl/.txt)")
    n = 0
    seen: set[str] = set()
    for uri, caption in entries:
        if uri in seen:
            log.info("input %s is listed more than once; keeping one row", uri)
            continue
        seen.add(uri)
        cap_source = source if caption else None
        if caption is None:
            caption = _sidecar_caption(uri)
            cap_source = "sidecar" if caption else None
        n += 1
        yield {"video_id": video_id(uri), "uri": uri, "given_caption": caption, "given_caption_source": cap_source}
    if not n:
        log.warning("input %s matched no files", text)


def discover(spec: str | Path) -> list[Row]:
    """Every input row of `spec` at once (`iter_inputs` as a list)."""
    return list(iter_inputs(spec))


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            yield line.rstrip("\n")
