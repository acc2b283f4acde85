"""Run a benchmark script as an earlier commit's code, in the same invocation: the commit's tree is exported with
`git archive` and its script runs in a subprocess, importing that tree's `curation` (stage entry points whose modules
that tree lacks are hidden, since the installed package's metadata lists today's stages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

_SHIM = """
import importlib.metadata as _md
import os as _os

_orig = _md.entry_points


def _exists(module):
    base = _os.path.join(_os.environ["CURATION_BASELINE_ROOT"], *module.split("."))
    return _os.path.isdir(base) or _os.path.isfile(base + ".py")


def entry_points(**kw):
    eps = _orig(**kw)
    if kw.get("group") != "curation.stages":
        return eps
    return _md.EntryPoints([e for e in eps if _exists(e.module)])


_md.entry_points = entry_points
"""


def run_script_at(rev: str, script: str, args: list[str], tmpd: Path, check: bool = True) -> dict[str, Any]:
    """`bench/<script>` of commit `rev` with `args` plus `--json OUT`; returns what it wrote."""
    root = tmpd / f"baseline-{rev}"
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    shim = tmpd / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_SHIM)
    env = dict(os.environ, PYTHONPATH=f"{shim}:{root}", CURATION_BASELINE_ROOT=str(root))
    out = tmpd / f"baseline-{rev}.json"
    subprocess.run([sys.executable, str(root / "bench" / script), *args, "--json", str(out)], check=check, env=env,
                   cwd=root)  # fmt: skip
    return json.loads(out.read_text())
