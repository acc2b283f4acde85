"""`curation` command line: run, stage, select, inspect, report, models, export, samples, train, sample,
export-model.

Bad configuration exits 1 with a one-line message; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from curation.errors import ConfigError, CurationError
from curation.logs import logging_to, native_stderr_to_file
from curation.runstore import MANIFESTS_ONLY, open_run
from curation.storage import is_remote

log = logging.getLogger("curation")


def _echo(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _progress_factory(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    def make(name: str, total: int) -> Any:
        return tqdm(total=total, desc=f"{name:>10}", unit="row", file=sys.stderr, dynamic_ncols=True, leave=True)

    return make


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set scenecut.threshold=30 (repeatable)",
    )
    p.add_argument("--runner", choices=["local", "ray"], help="local: in-process; ray: Ray Data actor pools")
    p.add_argument("--address", help="Ray cluster address (implies --runner ray); default starts a local cluster")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _apply_common(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    out = list(overrides) + list(args.overrides)
    if args.runner:
        out.append(f"runner={args.runner}")
    if args.address:
        out += ["runner=ray", f"ray.address={args.address}"]
    if args.no_progress:
        out.append("progress=false")
    return out


def _print_reports(reports: list[Any]) -> None:
    for r in reports:
        s = r.stats
        _echo(
            f"{r.name:>10}: {r.inputs:5d} in  ok={int(s.get('ok', 0))} reject={int(s.get('reject', 0))} "
            f"error={int(s.get('error', 0))}  {r.seconds:.1f}s"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from curation.config import load_config
    from curation.pipeline import Pipeline

    extra = []
    if args.input:
        extra.append(f"input={args.input}")
    if args.out:
        extra.append(f"out={args.out}")
    cfg = load_config(args.config, _apply_common(args, extra))
    if not cfg.out:
        raise CurationError("no output directory: pass --out RUN_DIR (or set `out:` in the config)")
    pipe = Pipeline(cfg, cfg.out)
    if cfg.input:
        pipe.check_input(cfg.input)  # before the run directory exists: a storage error leaves nothing behind
    pipe.prepare()
    native_stderr_to_file(pipe.run_dir)
    t0 = time.perf_counter()
    reports = pipe.run(cfg.input, args.rerun, _progress_factory(cfg.progress))
    _print_reports(reports)
    summary = pipe.manifests.rows(
        "SELECT (SELECT count(*) FROM videos) AS videos, (SELECT count(*) FROM clips) AS clips, "
        "(SELECT count(*) FROM clips WHERE status = 'ok') AS kept, (SELECT count(DISTINCT shard) FROM shards) AS shards"
    )[0]
    _echo(
        f"run {cfg.out}: {summary['videos']} videos, {summary['clips']} clips, {summary['kept']} kept in "
        f"{summary['shards']} shard(s), {time.perf_counter() - t0:.1f}s"
    )
    return 0


def _run_config(run: str, config: str | None, overrides: list[str]) -> Any:
    from curation.config import load_config

    saved = Path(run) / "config.yaml"
    path = config or (str(saved) if saved.is_file() else None)
    if path is None:
        raise CurationError(f"{run!r} has no config.yaml: is it a run directory? Pass --config to use another config")
    return load_config(path, overrides)


def cmd_stage(args: argparse.Namespace) -> int:
    from curation.pipeline import Pipeline
    from curation.stage import get_stage

    get_stage(args.name)
    # a run on object storage: its committed manifests pulled into the staging folder (the stage's workers fetch the
    # artifacts they read on a miss)
    local, _ = open_run(args.run, (*MANIFESTS_ONLY, "logs/"))
    cfg = _run_config(local, args.config, _apply_common(args, []))
    pipe = Pipeline(cfg, args.run)
    if pipe.store is not None:
        pipe.store.check_writable()  # read-only credentials: one line now, not after the stage's work
    native_stderr_to_file(pipe.run_dir)
    selection = None
    if args.selection:
        selection = pipe.run_dir / "selections" / f"{args.selection}.parquet"
        if not selection.is_file():
            raise CurationError(f"no selection {args.selection!r} in {args.run}: make it with `curation select`")
    with logging_to(pipe.run_dir), pipe.pushing():
        report = pipe.run_stage(args.name, pipe.runner(), args.rerun, selection, _progress_factory(cfg.progress))
    if pipe.store is not None:
        pipe.store.compact_records()
    _print_reports([report])
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    import duckdb

    from curation.manifest import Manifests, atomic_write_table

    local, store = open_run(args.run, MANIFESTS_ONLY)  # a selection reads the manifests alone
    if store is not None:
        store.check_writable()
    m = Manifests(local)
    split = m.split_stage()
    if split is None or not m.has(split):
        raise CurationError(f"{args.run!r} has no clips yet: run `curation run` first")
    try:
        table = m.query(f"SELECT clip_id FROM clips WHERE {split}_status = 'ok' AND ({args.where}) ORDER BY clip_id")
        total = m.rows(f"SELECT count(*) AS n FROM clips WHERE {split}_status = 'ok'")[0]["n"]
    except duckdb.Error as exc:
        raise CurationError(f"--where is not valid over the clips view: {str(exc).splitlines()[0]}") from None
    path = Path(local) / "selections" / f"{args.name}.parquet"
    atomic_write_table(table, path)
    if store is not None:
        store.push()
    _echo(
        f"selection {args.name!r}: {table.num_rows} of {total} clips match ({path}); package them with "
        f"`curation stage package --run {args.run} --selection {args.name}`"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import duckdb

    from curation.manifest import Manifests

    if not is_remote(args.run) and not (Path(args.run) / "manifests").is_dir():
        raise CurationError(f"{args.run!r} has no manifests: is it a run directory?")
    manifests = Manifests(args.run)  # on object storage: DuckDB reads the committed parts where they are
    if manifests.store is not None and not manifests.remote_parts:
        raise CurationError(f"{args.run!r} has no committed manifests: is it a run directory?")
    try:
        table = manifests.query(args.sql)
    except duckdb.Error as exc:
        raise CurationError(f"query failed: {str(exc).splitlines()[0]}") from None
    if args.format == "json":
        for row in table.to_pylist():
            _echo(json.dumps(row, default=str))
    elif args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    else:
        import pandas as pd

        with pd.option_context(
            "display.max_rows", args.limit, "display.max_columns", 50, "display.width", 200, "display.max_colwidth", 60
        ):
            _echo(table.to_pandas().to_string(max_rows=args.limit))
    return 0


def _config_without_weights(cls: Any, name: str, section: dict[str, Any]) -> Any:
    """A stage's config validated as usual, except that missing reference weights (what `curation models` is there
    to list) do not stop it."""
    from pydantic import ValidationError

    from curation.config import _format_validation

    try:
        return cls.config_class.model_validate(section, context={"weights": False})
    except ValidationError as exc:
        raise ConfigError(_format_validation(name, exc)) from None


def cmd_models(args: argparse.Namespace) -> int:
    """Which weights each reference backend needs, where it looks, which are present, where to get them."""
    from curation.config import apply_overrides, read_yaml_mapping
    from curation.stage import registry

    data = read_yaml_mapping(args.config, "config file", "configs/gpu.yaml") if args.config else {}
    data = apply_overrides(data, list(args.overrides))
    rows = []
    for name, cls in registry().items():
        needs = getattr(cls.config_class, "reference_weights", ())
        if not needs:
            continue
        stage_cfg = _config_without_weights(cls, name, data.get(name) or {})
        root = Path(args.models_dir or getattr(stage_cfg, "models_dir", "models")).expanduser()
        files = stage_cfg.weights() if hasattr(stage_cfg, "weights") else needs
        for file, source in files:
            present = (root / file).exists()
            rows.append((name, file, str(root / file), "yes" if present else "MISSING", source))
    width = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    _echo(f"{'stage':<{width[0]}}  {'file':<{width[1]}}  {'looked for at':<{width[2]}}  {'present':<7}  source")
    for r in rows:
        _echo(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:<{width[2]}}  {r[3]:<7}  {r[4]}")
    if "caption" in registry():
        _echo(
            "caption: backend openai/vllm takes a served model name or a model path (caption.model), e.g. "
            "Qwen/Qwen2.5-VL-7B-Instruct; fetch it with `huggingface-cli download` where a network exists."
        )
    _echo('Reference backends also need `pip install -e ".[gpu]"`. Embedded backends need no weights.')
    missing = sum(r[3] == "MISSING" for r in rows)
    return 0 if not args.check or not missing else 1


def cmd_report(args: argparse.Namespace) -> int:
    from curation.report import build_report

    local, store = open_run(args.run)
    if not (Path(local) / "manifests").is_dir():
        raise CurationError(f"{args.run!r} has no manifests: is it a run directory?")
    out = build_report(local, args.out, args.samples)
    if store is not None and args.out is None:
        store.push()
        out = store.url(Path(out).relative_to(local).as_posix())
    _echo(str(out))
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from curation.synthetic import make_samples

    paths = make_samples(Path(args.out), seconds=args.seconds)
    for p in paths:
        _echo(str(p))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the relational Wan on a run's shards; rerunning the same command resumes from the newest checkpoint."""
    _train_extra("train")
    from curation.train.config import load_train_config
    from curation.train.loop import Trainer

    cfg = load_train_config(args.config, list(args.overrides))
    trainer = Trainer(cfg, args.shards, args.out)

    def show(rec: dict[str, Any]) -> None:
        mask = f" mask={rec['mask']:.4f}" if "mask" in rec else ""
        _echo(f"step {rec['step']:6d}  loss={rec['loss']:.4f} flow={rec['flow']:.4f}{mask}  epoch={rec['epoch']}")

    try:
        history = trainer.fit(args.steps, show)
    finally:
        trainer.close()
    if trainer.rank != 0:
        return 0
    ck = trainer.checkpoints()
    _echo(
        f"trained {len(history)} step(s) to step {trainer.step}; checkpoint {ck[-1] if ck else None}; "
        f"metrics {trainer.out / 'metrics.jsonl'}"
    )
    return 0


def _train_extra(cmd: str) -> None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise CurationError(f"curation {cmd} needs the train extra ({exc}): pip install -e '.[train]'") from None


def cmd_sample(args: argparse.Namespace) -> int:
    """Generate a video from a trained checkpoint, a caption and reference images."""
    _train_extra("sample")
    from curation.train.sample import generate, load_trained, parse_reference, write_mp4

    refs = [parse_reference(r) for r in args.ref]
    model, enc, cfg, src = load_trained(args.checkpoint, args.device)
    if args.size:
        h, _, w = args.size.lower().partition("x")
        if not (h.isdigit() and w.isdigit()):
            raise CurationError(f"--size {args.size}: write HEIGHTxWIDTH, e.g. 480x832")
        height, width = int(h), int(w)
    else:
        height, width = cfg.data.buckets[0]
    frames = args.frames or cfg.data.frames[0]
    video = generate(
        model,
        enc,
        cfg,
        args.caption,
        refs,
        frames,
        height,
        width,
        args.steps,
        args.guidance,
        args.shift,
        args.negative,
        args.seed,
        args.device,
    )
    out = write_mp4(video, args.out, args.fps)
    _echo(f"wrote {out}: {len(video)} frames {width}x{height} at {args.fps} fps from {src}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    """The trained transformer in diffusers format, without optimizer state."""
    _train_extra("export-model")
    from curation.train.sample import export_model

    out = export_model(args.checkpoint, args.out, args.dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    _echo(f"exported {out} ({size / 1e6:.1f} MB): transformer/ (diffusers), relational.safetensors, relational.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from curation.export import export

    run, _ = open_run(args.run)  # exports read a run on object storage from its staging folder
    if not (Path(run) / "manifests").is_dir():
        raise CurationError(f"{args.run!r} has no manifests: is it a run directory?")
    if args.selection and not (Path(run) / "selections" / f"{args.selection}.parquet").is_file():
        raise CurationError(f"no selection {args.selection!r} in {args.run}: make it with `curation select`")
    bar = None if args.no_progress else _progress_factory(True)(args.format, 0)
    try:
        rep = export(args.format, run, args.out, args.selection, args.tokenizer, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(rep.skipped.items())) or "none"
    _echo(
        f"export {rep.format} -> {args.out}: {rep.ok} ok, skipped {sum(rep.skipped.values())} ({skipped}), "
        f"{rep.errors} error(s); {rep.already} already done; {rep.seconds:.1f}s"
    )
    for path in rep.index:
        _echo(f"  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from curation.export import FORMATS as EXPORT_FORMATS
    from curation.pipeline import RERUN_CHOICES

    p = argparse.ArgumentParser(prog="curation", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-v", "--verbose", action="store_true", help="info logs")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="the whole pipeline: ingest, every stage, shards")
    r.add_argument(
        "config", nargs="?", help="YAML config, e.g. configs/local.yaml (default: the built-in embedded profile)"
    )
    r.add_argument("--input", help="folder, glob, video file or list file (.csv/.jsonl/.txt)")
    r.add_argument("--out", help="run directory (manifests, shards)")
    r.add_argument("--rerun", choices=RERUN_CHOICES, default="missing", help="which rows each stage redoes")
    _common(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("stage", help="run one stage again over a run's manifests")
    s.add_argument("name", help="stage name, e.g. scenecut")
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("--rerun", choices=RERUN_CHOICES, default="missing")
    s.add_argument("--config", help="config to use instead of the run's saved config.yaml")
    s.add_argument("--selection", help="(package) use a selection made by `curation select` instead of statuses")
    _common(s)
    s.set_defaults(func=cmd_stage)

    sel = sub.add_parser("select", help="re-threshold from recorded scores, without recomputing")
    sel.add_argument("--run", required=True)
    sel.add_argument("--where", required=True, help='SQL condition over the clips view, e.g. "probe_fps >= 24"')
    sel.add_argument("--name", default="default", help="selection name")
    sel.set_defaults(func=cmd_select)

    i = sub.add_parser("inspect", help="DuckDB SQL over the manifests (views: videos, clips, ingest, <stage>, shards)")
    i.add_argument("run")
    i.add_argument("sql")
    i.add_argument("--format", choices=["table", "csv", "json"], default="table")
    i.add_argument("--limit", type=int, default=200)
    i.set_defaults(func=cmd_inspect)

    rp = sub.add_parser("report", help="a self-contained HTML page: counts, score histograms, sample clips")
    rp.add_argument("run")
    rp.add_argument("--out", help="where to write it (default RUN/report.html)")
    rp.add_argument("--samples", type=int, default=12, help="sample clips shown")
    rp.set_defaults(func=cmd_report)

    mo = sub.add_parser("models", help="weights the reference backends need: where looked for, present or not")
    mo.add_argument("--config", help="config whose models_dir settings to use")
    mo.add_argument("--models-dir", help="look in this folder (default: each stage's models_dir / $CURATION_MODELS)")
    mo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    mo.add_argument("--check", action="store_true", help="exit 1 if any file is missing")
    mo.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train the relational Wan2.1 on a run's shards (needs the train extra)")
    t.add_argument("config", help="train config, e.g. configs/train_tiny.yaml")
    t.add_argument("--shards", help="folder of shard-*.tar (a run's shards/) or a brace pattern")
    t.add_argument("--out", help="checkpoints and metrics.jsonl (rerun resumes from here)")
    t.add_argument("--steps", type=int, help="train until this many steps in all (default: the config's steps)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.set_defaults(func=cmd_train)

    sa = sub.add_parser("sample", help="generate a video from a trained checkpoint, a caption and reference images")
    sa.add_argument("checkpoint", help="training --out folder (newest checkpoint), a step-* folder or an export")
    sa.add_argument("--caption", required=True)
    sa.add_argument(
        "--ref",
        action="append",
        default=[],
        metavar="PHRASE=IMAGE[,FACE]",
        help="a subject: its phrase as written in the caption, its crop and optionally its face crop (repeatable)",
    )
    sa.add_argument("--out", required=True, help="mp4 to write")
    sa.add_argument("--frames", type=int, help="4n+1 (default: the config's longest frame bucket)")
    sa.add_argument("--size", help="HEIGHTxWIDTH, multiples of 16 (default: the config's first bucket)")
    sa.add_argument("--steps", type=int, default=50, help="sampler steps (Wan: 50)")
    sa.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (Wan: 5.0)")
    sa.add_argument("--shift", type=float, default=3.0, help="flow shift (Wan: 3.0 at 480p, 5.0 at 720p)")
    sa.add_argument("--negative", default="", help="negative prompt")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--fps", type=int, default=16, help="frame rate written (Wan2.1: 16)")
    sa.add_argument("--device", default="cpu")
    sa.set_defaults(func=cmd_sample)

    ex = sub.add_parser("export-model", help="a trained checkpoint's transformer in diffusers format")
    ex.add_argument("checkpoint", help="training --out folder (newest checkpoint) or a step-* folder")
    ex.add_argument("--out", required=True, help="folder to write")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ex.set_defaults(func=cmd_export_model)

    e = sub.add_parser("export", help="a run's shards in a layout other trainers and benchmarks read")
    e.add_argument("format", choices=EXPORT_FORMATS, help="target layout (docs/export.md)")
    e.add_argument("--run", required=True, help="run directory with shards")
    e.add_argument("--out", required=True, help="export directory (a rerun resumes there)")
    e.add_argument("--selection", help="only the clips of a selection made by `curation select`")
    e.add_argument(
        "--tokenizer", help="lumosx: also check every phrase with this tokenizer folder (e.g. Wan2.1's umt5-xxl)"
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_export)
    g = sub.add_parser("samples", help="generate small sample videos (cuts, text, motion) to try the pipeline on")
    g.add_argument("out", help="folder to write them to")
    g.add_argument("--seconds", type=float, default=4.0)
    g.set_defaults(func=cmd_samples)
    return p


def main(argv: list[str] | None = None) -> int:
    from curation.logs import setup_console

    args = build_parser().parse_args(argv)
    setup_console(logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except CurationError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"curation: error: {exc}\n")
        return 1
    except OSError as exc:
        from curation.stage import STORAGE_ERRNOS

        if exc.errno not in STORAGE_ERRNOS or args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        sys.stderr.write(
            f"curation: error: cannot write{where}: {exc.strerror}; free space or fix permissions and "
            "run the same command again: finished work is kept\n"
        )
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("curation: interrupted; run the same command again to resume\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
