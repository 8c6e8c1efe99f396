"""Batched relevance engine vs one-pair-at-a-time relevance, ViT-B-32-shaped random model on CPU.

    nice -n 15 .venv/bin/python benchmarks/relevance.py [--images 8] [--texts 100] [--pairs 4] [--model ViT-B-32]

Baselines (measured in the same run, on ``--pairs`` pairs and extrapolated to B x C pairs, since the per-pair cost
does not depend on the pair):
  * per-pair naive: for each (image, text): encode the image, encode the full-length text with attention capture,
    y = logit_scale * cos, one autograd.grad over all layers, full R matrix products (A's / T's code path, but with
    the image encoded once per pair instead of repeated K times);
  * per-pair truncated: the same but with the text cut after its EOT (the engine's exact shortcut), so the ratio
    against it is the gain from batching alone.
Peak memory is the peak resident set size above the phase's starting RSS, sampled every 2 ms from /proc.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F


from xclip.models.clip_backbone import build_clip  # noqa: E402
from xclip.models.relevance import capture_attention, encode_text_from_embeddings, image_relevance, text_relevance  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: peak RSS growth (bytes) during the block."""

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.delta_mb = (self.peak - self.start) / 2 ** 20


def per_pair(backbone, image, token_row, tower: str, start_layer: int, truncate: bool) -> torch.Tensor:
    """Relevance for one pair, written plainly (full R matrix)."""
    model = backbone.model
    eot = int(token_row.argmax())
    row = token_row[: eot + 1] if truncate else token_row
    with capture_attention(model, (tower,)) as store:
        x = image.unsqueeze(0).requires_grad_(tower == "visual")
        emb = model.token_embedding(row.unsqueeze(0)).detach().requires_grad_(tower == "text")
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(encode_text_from_embeddings(model, emb, torch.tensor([eot])), dim=-1)
        y = model.logit_scale.exp() * (img * txt).sum()
    probs = store[tower]
    start = start_layer + len(probs) if start_layer < 0 else start_layer
    grads = torch.autograd.grad(y, probs[start:])
    N = probs[0].shape[-1]
    R = torch.eye(N)
    for A, G in zip(probs[start:], grads):
        R = R + (G * A).clamp(min=0).mean(dim=1)[0] @ R
    return R[eot] if tower == "text" else R[0, 1:]


def timed(fn):
    """(output, wall seconds, process CPU seconds, peak RSS growth MB).  CPU time is the fairer measure on a
    shared machine (it counts this process's work only); both are printed."""
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return out, dt, dc, mem.delta_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--texts", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=4, help="pairs timed for the per-pair baselines")
    ap.add_argument("--chunk-size", type=int, default=256)
    args = ap.parse_args()

    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    torch.manual_seed(0)
    bb = build_clip(args.model).freeze()
    B, C = args.images, args.texts
    size = bb.image_size
    images = torch.randn(B, 3, size, size)
    prompts = [f"a photo of a {IMAGENET_CLASSNAMES[i % len(IMAGENET_CLASSNAMES)]}." for i in range(C)]
    tokens = bb.tokenize(prompts)
    print(f"model {args.model} (random init), B={B} images x C={C} ImageNet-class prompts "
          f"(max {int(tokens.argmax(-1).max()) + 1} of {tokens.shape[1]} tokens used), torch threads "
          f"{torch.get_num_threads()}, per-pair baselines timed on {args.pairs} pairs and extrapolated to {B * C}")

    rows = []
    for tower, start, label in (("text", 0, "text relevance (all layers)"),
                                ("visual", -1, "image relevance (last layer)")):
        fn = text_relevance if tower == "text" else image_relevance
        fn(bb, images[:1], tokens[:2], start_layer=start)  # warm-up
        batched, t_b, c_b, m_b = timed(lambda: fn(bb, images, tokens, start_layer=start, chunk_size=args.chunk_size))
        pairs = [(i % B, (7 * i) % C) for i in range(args.pairs)]
        res = {}
        for truncate in (False, True):
            per_pair(bb, images[0], tokens[0], tower, start, truncate)  # warm-up
            outs, t_p, c_p, m_p = timed(lambda: [per_pair(bb, images[b], tokens[c], tower, start, truncate)
                                            for b, c in pairs])
            scale = B * C / len(pairs)
            res[truncate] = (t_p * scale, c_p * scale, m_p)
            for (b, c), o in zip(pairs, outs):  # same numbers
                ref = batched[b, c, : o.shape[0]]
                assert torch.allclose(ref, o, atol=1e-4, rtol=1e-3), (tower, b, c, (ref - o).abs().max())
        rows.append((label, (t_b, c_b), m_b, res))

    print(f"\n{'':38s} {'batched':>10s} {'per-pair naive':>16s} {'ratio':>7s} {'per-pair trunc':>16s} {'ratio':>7s}")
    for label, tb, m_b, res in rows:
        for k, kind in enumerate(("wall", "cpu")):
            n, t = res[False][k], res[True][k]
            print(f"{label + ' ' + kind:38s} {tb[k]:9.2f}s {n:15.1f}s {n / tb[k]:6.1f}x {t:15.1f}s {t / tb[k]:6.1f}x")
    print("\npeak RSS growth (MB): " + "; ".join(
        f"{label}: batched {m_b:.0f}, per-pair naive {res[False][2]:.0f}, per-pair trunc {res[True][2]:.0f}"
        for label, tb, m_b, res in rows))
    print(f"process peak RSS {__import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
