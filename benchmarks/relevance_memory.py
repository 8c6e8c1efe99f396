"""Peak memory of relevance for 1 image x 1000 class prompts on ViT-B-32 (random init, CPU), chunked over prompts.

    python benchmarks/relevance_memory.py                 # text tower (CoOp / NTLB) and image tower
    python benchmarks/relevance_memory.py --tower text --chunk-size 128

Each tower runs in its own subprocess so its peak RSS is its own; printed as growth over the built model and as a
ratio to the model's footprint measured in the same process.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time



def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(tower: str, texts: int, chunk: int, model: str) -> None:
    import torch

    from xclip.models.clip_backbone import build_clip
    from xclip.models.relevance import image_relevance, text_relevance

    torch.manual_seed(0)
    b = build_clip(model, None).freeze()
    tokens = b.tokenize([f"a photo of a thing number {i}." for i in range(texts)])     # [C, 77]
    x = torch.randn(1, 3, b.image_size, b.image_size)                                   # [1, 3, H, W]
    base = _rss_mb()
    t0 = time.time()
    if tower == "text":
        r = text_relevance(b, x, tokens, chunk_size=chunk)    # [1, C, 77]
    else:
        r = image_relevance(b, x, tokens)                      # [1, C, N]
    dt = time.time() - t0
    peak = _rss_mb()
    print(f"{tower:5s} relevance 1 x {texts}: {tuple(r.shape)} in {dt:.1f} s; peak RSS {peak:.0f} MB, "
          f"growth {peak - base:+.0f} MB = x{(peak - base) / base:.2f} the built model ({base:.0f} MB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--tower", choices=["text", "image", "both"], default="both")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.tower, a.texts, a.chunk_size, a.model)
        return
    for tower in (["text", "image"] if a.tower == "both" else [a.tower]):
        subprocess.run([sys.executable, __file__, "--worker", "--tower", tower, "--texts", str(a.texts),
                        "--chunk-size", str(a.chunk_size), "--model", a.model], check=True)


if __name__ == "__main__":
    main()
