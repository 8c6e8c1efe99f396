"""Peak memory of relevance on ViT-B-32 shapes (random init, CPU): one pair vs the anchor, and 1 image x 1000 prompts.

    python benchmarks/relevance_memory.py                  # pair (ours joint vs anchor) and 1 x 1000 at chunk 256 / 64
    python benchmarks/relevance_memory.py --only pair

Each measurement runs in its own subprocess (1 thread), so its peak RSS is its own; printed as the growth of the
process's max RSS over the built model.  The anchor is the notebook formulation of benchmarks/relevance.py
(``anchor_interpret``: both towers on the full 77-token text, all probabilities kept, one grad per layer).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _anchor_module():
    spec = importlib.util.spec_from_file_location("_bench_relevance", Path(__file__).with_name("relevance.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker(kind: str, texts: int, chunk: int, model: str, start_text: int, start_image: int) -> dict:
    import torch

    from xclip.models.clip_backbone import build_clip
    from xclip.models.relevance import relevance

    torch.set_num_threads(1)
    torch.manual_seed(0)
    b = build_clip(model, None).freeze()
    tokens = b.tokenize([f"a photo of a thing number {i}." for i in range(texts)])  # [C, 77]
    x = torch.randn(1, 3, b.image_size, b.image_size)  # [1, 3, H, W]
    anchor = _anchor_module().anchor_interpret if kind == "anchor" else None
    base = _rss_mb()
    t0 = time.time()
    if kind == "anchor":
        anchor(b.model, x[0], tokens[0], start_text, start_image)
    else:
        relevance(b, x, tokens, start_layer_text=start_text, start_layer_image=start_image, chunk_size=chunk)
    return {"kind": kind, "texts": texts, "chunk": chunk, "seconds": time.time() - t0, "model_mb": base,
            "growth_mb": _rss_mb() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--only", choices=["pair", "many", "all"], default="all")
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--start_layer_text", type=int, default=0)
    ap.add_argument("--start_layer_image", type=int, default=-1)
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)  # kind texts chunk
    a = ap.parse_args()
    if a.worker:
        kind, texts, chunk = a.worker
        print(json.dumps(worker(kind, int(texts), int(chunk), a.model, a.start_layer_text, a.start_layer_image)))
        return
    jobs = []
    if a.only in ("pair", "all"):
        jobs += [("anchor", 1, 256), ("ours", 1, 256)]
    if a.only in ("many", "all"):
        jobs += [("ours", a.texts, 256), ("ours", a.texts, 64)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = []
    for kind, texts, chunk in jobs:
        cmd = [sys.executable, __file__, "--model", a.model, "--start_layer_text", str(a.start_layer_text),
               "--start_layer_image", str(a.start_layer_image), "--worker", kind, str(texts), str(chunk)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res.append(r)
        print(f"{kind:6s} 1 image x {texts:4d} texts, chunk {chunk:3d}, start layers {a.start_layer_text}/"
              f"{a.start_layer_image}: {r['seconds']:.1f} s, peak RSS growth {r['growth_mb']:+.0f} MB over the built "
              f"model ({r['model_mb']:.0f} MB)", flush=True)
    pair = {r["kind"]: r for r in res if r["texts"] == 1}
    if len(pair) == 2:
        print(f"one pair: ours / anchor peak RSS growth = {pair['ours']['growth_mb'] / pair['anchor']['growth_mb']:.2f} "
              f"(goal <= 2)")


if __name__ == "__main__":
    main()
