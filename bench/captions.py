"""Caption analysis speed on one core: long MLLM-style captions per second through `parse_captions`, beside the spaCy
pipeline alone (the floor the rules add to). Each is timed three times, interleaved; the best time counts.

    python bench/captions.py [--repeat 5]

Also times the model as `spacy.load` gives it (thinc's bundled BLIS for matrix products; `parse_captions` runs
them through numpy), on the same texts in the same run.

Pins the process to one CPU and one BLAS/OpenMP thread before importing anything numeric. Target (issue: relations
you can trust): >= 200 long captions/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
sys.path.insert(0, str(REPO))

import spacy  # noqa: E402

from curation.stages.caption.parser import MODELS, _pipelines, parse_captions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="passes over the long captions of both sets")
    args = ap.parse_args()
    rows = []
    for name in ("caption_dev.jsonl", "caption_test.jsonl"):
        rows += [json.loads(x) for x in (REPO / "tests" / "data" / name).read_text().splitlines()]
    long = [r["caption"] for r in rows if r.get("style") == "long"]
    texts = long * args.repeat
    list(parse_captions(long[:8]))  # load the model, warm the lemma cache
    pipe = _pipelines()[0]
    name = next(n for n in MODELS if spacy.util.is_package(n))  # the model parse_captions loaded, as shipped
    stock = spacy.load(name, exclude=["ner", "attribute_ruler", "lemmatizer"])
    stock_s = spacy_s = full_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        n_stock = sum(1 for _ in stock.pipe(texts, batch_size=256))
        stock_s = min(stock_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_spacy = sum(1 for _ in pipe.pipe(texts, batch_size=256))
        spacy_s = min(spacy_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_full = sum(1 for _ in parse_captions(texts, batch_size=256))
        full_s = min(full_s, time.perf_counter() - t0)
    words = sum(len(t.split()) for t in long) / len(long)
    result = {
        "captions": n_full,
        "mean_words": round(words, 1),
        "cpus": len(os.sched_getaffinity(0)),
        "spacy_stock_per_s": round(n_stock / stock_s, 1),  # as spacy.load gives it (thinc's BLIS matmul)
        "spacy_pipeline_per_s": round(n_spacy / spacy_s, 1),  # as parse_captions runs it (numpy's matmul)
        "parse_captions_per_s": round(n_full / full_s, 1),
        "rules_share_of_time": round(max(0.0, 1 - spacy_s / full_s), 3),
        "target_per_s": 200,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
