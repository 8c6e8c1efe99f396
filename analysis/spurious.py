"""Reducing spurious cues by mean-ablating named heads (TextSpan §4.3, spec A6.1): worst-group accuracy.

Waterbirds layout (Sagawa et al. ``waterbird_complete95_forest2water2``): ROOT/metadata.csv with columns
``img_filename, y, split, place`` (y: 0 landbird / 1 waterbird; place: 0 land / 1 water; split: 0 train, 1 val,
2 test) and the images at ROOT/<img_filename>. Group id = 2*y + place.

The "ablated" number follows the anchor: it mean-ablates the named heads *and* every attention layer before the
last ``keep_last`` *and* all MLP/embedding terms; ``context`` reports that context alone.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from xclip.analysis.ablation import AblationSpec, ablated_embeddings, dataset_means, layers_before_last
from xclip.analysis.datasets import LabelledImages, prompts_for

WATERBIRDS_CLASSES = ["landbird", "waterbird"]
WATERBIRDS_GROUPS = ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"]
SPLITS = {"train": 0, "val": 1, "test": 2}
# the paper's head lists (layer, head), 0-indexed (spec A6.1)
PAPER_HEADS: dict[str, list[tuple[int, int]]] = {
    "ViT-B-16": [(11, 6), (11, 0), (11, 3), (10, 11), (10, 10), (9, 8), (9, 6)],
    "ViT-L-14": [(21, 1), (22, 12), (22, 13), (21, 11), (21, 14), (23, 6), (21, 3), (21, 6), (21, 8), (21, 13),
                 (22, 2), (22, 15), (23, 1), (23, 3), (23, 5)],
    "ViT-H-14": [(31, 8), (30, 15), (30, 12), (30, 6), (29, 14), (29, 8), (31, 12), (30, 11), (29, 4)],
}


def load_waterbirds(root: str | Path, backbone, split: str = "test", templates: Sequence[str] | None = None,
                    limit: int | None = None) -> LabelledImages:
    """The Waterbirds folder layout -> LabelledImages with labels y and groups 2*y + place."""
    root = Path(root)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"Waterbirds metadata not found: {meta} (expected ROOT/metadata.csv with columns "
                                f"img_filename,y,split,place and images under ROOT)")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {list(SPLITS)}")
    with meta.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"img_filename", "y", "split", "place"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{meta}: needs columns {sorted(need)}, has {sorted(rows[0]) if rows else 'no rows'}")
    rows = [r for r in rows if int(r["split"]) == SPLITS[split]][:limit]
    if not rows:
        raise ValueError(f"{meta}: no rows with split={SPLITS[split]} ({split})")
    paths = [root / r["img_filename"] for r in rows]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{meta} lists {len(missing)} missing images, e.g. {missing[0]}")
    y = torch.tensor([int(r["y"]) for r in rows])
    place = torch.tensor([int(r["place"]) for r in rows])
    pre = backbone.preprocess
    return LabelledImages(load=lambda i: pre(Image.open(paths[i]).convert("RGB")), labels=y,
                          classnames=WATERBIRDS_CLASSES, class_prompts=prompts_for(WATERBIRDS_CLASSES, templates),
                          groups=2 * y + place, group_names=WATERBIRDS_GROUPS)


def group_accuracies(pred: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                     group_names: Sequence[str] | None = None) -> dict:
    """{"groups": {name: acc}, "worst_group": min, "mean_group": mean, "overall": acc} (empty groups skipped)."""
    correct = (pred == labels).float()
    per = {}
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        name = group_names[g] if group_names else str(g)
        per[name] = float(correct[sel].mean())
    return {"groups": per, "worst_group": min(per.values()), "mean_group": sum(per.values()) / len(per),
            "overall": float(correct.mean())}


def spurious_report(heads, mlps, classifier: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                    ablate_heads: Sequence[tuple[int, int]], group_names: Sequence[str] | None = None,
                    keep_last: int | None = 4, ablate_mlps: bool = True, random_trials: int = 5,
                    seed: int = 0) -> dict:
    """Worst-group accuracy: base, context-only, named heads ablated, and best of ``random_trials`` random head
    sets of the same size (drawn from the kept layers; spec A6.1's "top-random")."""
    L, H = heads.shape[1], heads.shape[2]
    means = dataset_means(heads, mlps)
    context_layers = layers_before_last(L, keep_last) if keep_last is not None else []

    def evaluate(spec: AblationSpec) -> dict:
        pred = (ablated_embeddings(heads, mlps, spec, means) @ classifier.float()).argmax(1)
        return group_accuracies(pred, labels, groups, group_names)

    out = {"base": evaluate(AblationSpec()),
           "context": evaluate(AblationSpec(layers=context_layers, mlps=ablate_mlps)),
           "heads_ablated": evaluate(AblationSpec(layers=context_layers, heads=list(ablate_heads), mlps=ablate_mlps)),
           "ablated_heads": [list(h) for h in ablate_heads]}
    if random_trials > 0 and ablate_heads:
        pool = [(l, h) for l in range(L) if l not in context_layers for h in range(H)]
        rng = random.Random(seed)
        trials = [evaluate(AblationSpec(layers=context_layers, heads=rng.sample(pool, min(len(ablate_heads),
                                                                                           len(pool))),
                                        mlps=ablate_mlps)) for _ in range(random_trials)]
        out["random_heads_best"] = max(trials, key=lambda r: r["worst_group"])
    return out
