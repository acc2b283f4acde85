"""musa-curation: raw videos -> multi-subject annotated datasets (WebDataset shards + Parquet manifests)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["parse_caption"]


def __getattr__(name: str) -> Any:
    """`from curation import parse_caption`: caption text -> subjects, attributes and relations with spans. Loaded on
    first use, so importing the core does not load spaCy."""
    if name == "parse_caption":
        from curation.stages.caption.parser import parse_caption

        return parse_caption
    raise AttributeError(f"module 'curation' has no attribute {name!r}")
