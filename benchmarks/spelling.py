"""Epoch time of spelling-projection training on cached features vs re-encoding the images every step.

    python benchmarks/spelling.py [--backbone tiny-vit-world --pretrained none --n 256]

Both paths run the same SpellingProjection training step (forget-to-spell, batch 128); the baseline re-encodes
x_i, x_t, x_it and y_t with the frozen CLIP for every batch (what training without the feature cache costs).
"""
from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="tiny-vit-world")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--n", type=int, default=256, help="quintuples in the epoch")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    import torch

    from xclip.datamodules.feature_cache import (
        CachedQuintupleFeatures,
        _collate,
        _Preprocessed,
        encode_quintuples,
        encode_texts,
    )
    from xclip.datamodules.quintuples import QuintupleDataset, StyleConfig, SyntheticWorldSource, WordConfig
    from xclip.lightning_modules.spelling import SpellingProjection
    from xclip.losses.contrastive import spelling_objective

    torch.manual_seed(0)
    pre = None if args.pretrained.lower() == "none" else args.pretrained
    m = SpellingProjection(args.backbone, pre, k=32, preset="forget_to_spell")
    bb = m.backbone
    opt = torch.optim.Adam([m.W], lr=1e-4)
    ds = QuintupleDataset(SyntheticWorldSource(), "train", args.n, 0, 64, WordConfig(word_list="world"),
                          StyleConfig(font_size=20))

    def step(batch):
        total, _ = spelling_objective(m._project_batch(batch), m.loss_weights, m.W)
        opt.zero_grad()
        total.backward()
        opt.step()

    t0 = time.perf_counter()
    feats = encode_quintuples(bb, ds, batch_size=args.batch_size, progress=False)   # one-time cost
    t_cache = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(CachedQuintupleFeatures(feats), batch_size=args.batch_size, shuffle=True)
    t0 = time.perf_counter()
    for batch in loader:
        step(batch)
    t_cached = time.perf_counter() - t0

    raw = torch.utils.data.DataLoader(_Preprocessed(ds, bb.preprocess), batch_size=args.batch_size,
                                      collate_fn=_collate)
    t0 = time.perf_counter()
    for imgs, words, cls, real in raw:
        with torch.no_grad():
            z = bb.encode_image(imgs.flatten(0, 1)).view(len(cls), 3, -1)
            batch = {"x_i": z[:, 0], "x_t": z[:, 1], "x_it": z[:, 2], "y_t": encode_texts(bb, words),
                     "y_i": feats["class_text"][cls]}
        step(batch)
    t_reencode = time.perf_counter() - t0
    ratio = t_reencode / max(t_cached, 1e-9)
    print(f"{args.backbone}: {args.n} quintuples, batch {args.batch_size}")
    print(f"  one-time feature caching: {t_cache:.2f} s")
    print(f"  epoch on cached features: {t_cached:.4f} s")
    print(f"  epoch re-encoding images: {t_reencode:.2f} s")
    print(f"  speed-up (re-encode / cached): {ratio:.0f}x")
    return ratio


if __name__ == "__main__":
    main()
