"""Pipeline configuration: a YAML file validated by pydantic, with CLI overrides applied on top."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from curation.errors import ConfigError
from curation.stage import Kind, Stage, StageConfig, registry

# The built-in pipeline, the one place it is written: video-level checks, the split, then clip filters cheapest
# first (each stage only sees the clips every earlier stage kept), annotation, and packaging.
DEFAULT_STAGES = [
    "probe",
    "scenecut",
    "motion",
    "aesthetics",
    "ocr",
    "watermark",
    "nsfw",
    "dedup",
    "caption",
    "subjects",
    "identity",
    "crops",
    "package",
]


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="Ray cluster address; null starts a local cluster")
    num_cpus: float | None = Field(None, description="CPUs of the local cluster (null: all cores)")
    streaming: bool | Literal["auto"] = Field(
        "auto",
        description="stream consecutive ungrouped stages through one Ray Data pipeline (false: one stage at a "
        "time, each over the whole corpus; auto: stream on a cluster with GPUs or several nodes, where it keeps "
        "resources busy that would otherwise wait, and on one CPU-only machine only with `fuse`, since separate "
        "pools there compete for the same cores and gain nothing)",
    )
    fuse: bool | Literal["auto"] = Field(
        "auto",
        description="in a streaming chain, run consecutive stages that ask for no GPU in one actor pool, a batch "
        "through each in turn (auto: on one machine without GPUs, where a pool per stage costs seconds a stage "
        "whatever its input; on a cluster separate pools let each stage scale on its own)",
    )


class PipelineConfig(BaseModel):
    """Top level of a config file. Every other top-level key is a stage section named after the stage."""

    model_config = ConfigDict(extra="forbid")
    runner: Literal["local", "ray"] = "ray"
    ray: RayConfig = RayConfig()
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    input: str | None = None
    out: str | None = None
    progress: bool = True
    stage_configs: dict[str, StageConfig] = Field(default_factory=dict, exclude=True)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        known = registry()
        for name in v:
            if name not in known:
                raise ValueError(f"unknown stage {name!r}{_did_you_mean(name, known)}; known: {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError("a stage is listed twice in `stages`")
        kinds = [known[n].kind for n in v]
        splits = [n for n in v if known[n].kind == Kind.SPLIT]
        if len(splits) > 1:
            raise ValueError(f"only one stage may split videos into clips; `stages` has {', '.join(splits)}")
        first_clip = next((i for i, k in enumerate(kinds) if k == Kind.CLIP), None)
        if first_clip is not None and (not splits or v.index(splits[0]) > first_clip):
            raise ValueError(
                f"clip stage {v[first_clip]!r} needs a split stage (such as scenecut) before it in `stages`"
            )
        late = [n for n in v[v.index(splits[0]) :] if known[n].kind == Kind.VIDEO] if splits else []
        if late:
            raise ValueError(f"video stage(s) {', '.join(late)} must come before the split stage {splits[0]!r}")
        return v

    def stage_config(self, name: str) -> StageConfig:
        if name not in self.stage_configs:
            self.stage_configs[name] = registry()[name].config_class()
        return self.stage_configs[name]

    def dump(self) -> dict[str, Any]:
        """The full effective config, stage sections included (what `curation run` saves next to the manifests)."""
        out = self.model_dump(mode="json")
        for name in registry():
            out[name] = self.stage_config(name).portable_dump()
        return out


def _did_you_mean(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML: `30`, `true`, `[a, b]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. scenecut.threshold=30")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def _format_validation(section: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{section}.{loc}: {err['msg']}" if loc else f"{section}: {err['msg']}")
    return "; ".join(parts)


def build_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a config dict; raises ConfigError with every problem and how to fix it."""
    data = dict(data or {})
    known = registry()
    top_fields = set(PipelineConfig.model_fields) - {"stage_configs"}
    sections: dict[str, Any] = {}
    for key in list(data):
        if key in top_fields:
            continue
        if key in known:
            sections[key] = data.pop(key)
            continue
        raise ConfigError(
            f"unknown config section {key!r}{_did_you_mean(key, list(known) + sorted(top_fields))}; "
            f"top-level keys are {', '.join(sorted(top_fields))} and one section per stage ({', '.join(known)})"
        )
    try:
        cfg = PipelineConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation("config", exc)) from None
    for name, section in sections.items():
        try:
            cfg.stage_configs[name] = known[name].config_class(**(section or {}))
        except ValidationError as exc:
            raise ConfigError(_format_validation(name, exc)) from None
    return cfg


def read_yaml_mapping(path: str | Path, what: str, example: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every problem is a ConfigError that says what to pass instead."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} not found; pass a YAML file such as {example}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of sections")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    data = read_yaml_mapping(path, "config file", "configs/local.yaml") if path is not None else {}
    return build_config(apply_overrides(data, list(overrides or [])))


def run_stages(run_dir: str | Path) -> list[Stage[Any]]:
    """The run's stages in pipeline order, each built with the run's saved config (shards and the report call their
    hooks with the settings the rows were made with)."""
    from curation.manifest import pipeline_order

    saved = Path(run_dir) / "config.yaml"
    reg = registry()
    names = pipeline_order(Path(run_dir))
    try:
        cfg = load_config(saved) if saved.is_file() else build_config({})
        return [reg[n](cfg.stage_config(n)) for n in names]
    except ConfigError:  # e.g. a reference backend whose weights are not on this machine: read the run as it was
        data = read_yaml_mapping(saved, "config file", "RUN/config.yaml")
        return [reg[n](reg[n].config_class.model_construct(**(data.get(n) or {}))) for n in names]
