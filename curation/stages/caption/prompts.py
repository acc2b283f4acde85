"""Versioned prompt templates (`templates/*.md`, package data): their text and a hash that goes into the manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

from curation.errors import ConfigError

PROMPT_DIR = Path(__file__).resolve().parent / "templates"


def load_prompt(name: str) -> tuple[str, str]:
    """(text, short hash) of templates/<name>.md; a changed prompt makes the rows that used it stale."""
    path = PROMPT_DIR / f"{name}.md"
    if not path.is_file() or name == "README":
        known = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.md") if p.stem != "README"))
        raise ConfigError(f"no prompt {name!r} in {PROMPT_DIR}; available: {known}")
    text = path.read_text(encoding="utf-8")
    return text, hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
