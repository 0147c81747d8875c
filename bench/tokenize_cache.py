"""Tokenisation cache: build_datasets on a config's data, first run (empty cache) vs second run.

    python bench/tokenize_cache.py                                   # SmolLM2, commonsense_train
    python bench/tokenize_cache.py --config configs/tiny-debug.yaml  # small, byte tokenizer

Each run is a fresh process sharing one cache directory (a new temporary one unless
--cache-dir), timing build_datasets only (not imports or the tokenizer load). The first run
also times the pre-`datasets` path (json.load + data.tokenize, no cache) and checks that the
cached rows equal it token for token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(config: str, reference: bool) -> dict:
    import numpy as np

    from moka_jax import data as D
    from moka_jax.config import load_config, resolve_path

    cfg = load_config(config)
    tok = D.load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    t = time.perf_counter()
    import moka_jax.data.sources  # noqa: F401 - imports datasets, timed apart

    out = {"import_datasets_s": time.perf_counter() - t}
    t = time.perf_counter()
    train, val = D.build_datasets(cfg.data, tok)
    out.update(build_datasets_s=time.perf_counter() - t, examples=len(train) + len(val or []))
    if reference:
        t = time.perf_counter()
        ids, labels = [], []
        for f in cfg.data.train:
            recs = [r for r in json.loads(resolve_path(f.path).read_text())][:f.limit]
            recs = [{"instruction": r["instruction"], "input": r.get("input") or "",
                     "output": r["output"]} for r in recs]
            i, lab = D.tokenize(recs, tok, template=cfg.data.template,
                                cutoff_len=cfg.data.cutoff_len,
                                train_on_inputs=cfg.data.train_on_inputs, add_eos=cfg.data.add_eos)
            ids += i
            labels += lab
        out["reference_tokenize_s"] = time.perf_counter() - t
        got = D.TokenizedData.concat([train] + ([val] if val is not None else []))
        # build_datasets moved val_size examples out of train; compare as multisets of rows
        key = sorted((a.tobytes(), b.tobytes()) for a, b in zip(got.input_ids, got.labels))
        ref = sorted((a.tobytes(), b.tobytes()) for a, b in zip(ids, labels)
                     if (b != D.IGNORE).any())
        out["identical_to_reference"] = key == ref and all(
            x.dtype == np.int32 for x in got.input_ids)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/smollm2-135m-commonsense-moka.yaml"))
    ap.add_argument("--cache-dir", help="shared cache directory (default: a new temporary one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.reference)))
        return
    cache = args.cache_dir or tempfile.mkdtemp(prefix="moka_data_cache_")
    env = {**__import__("os").environ, "MOKA_DATA_CACHE": cache, "PYTHONPATH": str(REPO)}
    runs = []
    for n, extra in enumerate((["--reference"], [])):
        res = subprocess.run([sys.executable, __file__, "--child", "--config", args.config, *extra],
                             env=env, capture_output=True, text=True, check=False)
        if res.returncode:
            sys.exit(f"run {n + 1} failed:\n{res.stderr[-4000:]}")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    first, second = runs
    print(json.dumps({"config": args.config, "cache_dir": cache, "first_run": first,
                      "second_run": second,
                      "speedup": first["build_datasets_s"] / second["build_datasets_s"]}, indent=1))


if __name__ == "__main__":
    main()
