"""Spatial (bbox) conditioning losses on image-relevance maps (NTLB, spec ntlb_coop.md 4.3).

Pipeline per (cutout, pair): CLS-row relevance over the patch grid [g, g] -> bicubic upsample to the mask size ->
divide by its sum, then by its max -> soft-binarise ``sigmoid((map - t) * tau)`` (t 0.1, tau 20) -> overlap score
with the (augmented) binary mask M.

Scores (``kind``):
- ``"anchor"``: the NTLB notebook's "Dice" ``2*sum(bM) / (2*sum(bM) + sum(b(1-M)))`` = 2I / (I + |b|). Its denominator
  has the false positives only, so it is a *soft precision*: relevance outside the box is penalised, but a box that
  the relevance covers only partly is not (a single hot patch inside the box scores 1).
- ``"dice"``: the real soft Dice ``2*sum(bM) / (sum(b) + sum(M))`` (penalises uncovered box area too).
- ``"iou"``: the soft IoU / Jaccard ``sum(bM) / (sum(b) + sum(M) - sum(bM))``.
The loss per pair is ``-score`` (as in the anchor, where the term enters as ``-lambda_k * Dice_k``).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

SpatialKind = Literal["anchor", "dice", "iou"]
SPATIAL_KINDS: tuple[str, ...] = ("anchor", "dice", "iou")
_EPS = 1e-8


def relevance_to_grid(relevance: torch.Tensor) -> torch.Tensor:
    """[..., N] patch relevance -> [..., g, g] (N must be a square number of patches)."""
    n = relevance.shape[-1]
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"relevance has {n} patch entries, not a square grid (expected g*g patches, CLS excluded)")
    return relevance.reshape(*relevance.shape[:-1], g, g)


def normalise_relevance_map(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, K, g, g] -> bicubic upsample to ``size`` -> / sum -> / max, each map separately: [B, K, *size]."""
    up = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    up = up / up.sum((-2, -1), keepdim=True).clamp_min(_EPS)
    return up / up.amax((-2, -1), keepdim=True).clamp_min(_EPS)


def soft_binarize(maps: torch.Tensor, threshold: float = 0.1, temperature: float = 20.0) -> torch.Tensor:
    """sigmoid((map - threshold) * temperature), differentiable stand-in for ``map > threshold``."""
    return torch.sigmoid((maps - threshold) * temperature)


def overlap_score(b: torch.Tensor, mask: torch.Tensor, kind: SpatialKind = "anchor") -> torch.Tensor:
    """Soft overlap of maps b [..., H, W] in [0, 1] with masks [..., H, W] in [0, 1] -> [...]."""
    if kind not in SPATIAL_KINDS:
        raise ValueError(f"spatial loss kind must be one of {SPATIAL_KINDS}, got {kind!r}")
    inter = (b * mask).sum((-2, -1))
    if kind == "anchor":
        fp = (b * (1 - mask)).sum((-2, -1))
        return 2 * inter / (2 * inter + fp).clamp_min(_EPS)
    total_b, total_m = b.sum((-2, -1)), mask.sum((-2, -1))
    if kind == "dice":
        return 2 * inter / (total_b + total_m).clamp_min(_EPS)
    return inter / (total_b + total_m - inter).clamp_min(_EPS)


def spatial_relevance_loss(relevance: torch.Tensor, masks: torch.Tensor, kind: SpatialKind = "anchor",
                           threshold: float = 0.1, temperature: float = 20.0) -> torch.Tensor:
    """Per-pair loss ``-score`` averaged over cutouts.

    relevance: [B, K, N] CLS-row patch relevance (B cutouts, K texts, N = g*g patches);
    masks: [B, K, H, W] target masks seen through the same cutouts/augmentations -> loss [K]."""
    if relevance.dim() != 3 or masks.dim() != 4 or relevance.shape[:2] != masks.shape[:2]:
        raise ValueError(f"expected relevance [B, K, N] and masks [B, K, H, W] with equal B, K; got "
                         f"{tuple(relevance.shape)} and {tuple(masks.shape)}")
    maps = normalise_relevance_map(relevance_to_grid(relevance), tuple(masks.shape[-2:]))  # [B, K, H, W]
    b = soft_binarize(maps, threshold, temperature)
    return -overlap_score(b, masks.to(b), kind).mean(0)                                    # [K]


def box_mask(bbox: tuple[float, float, float, float], height: int, width: int,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Binary mask [height, width] of a box (left, top, box_width, box_height) in pixels of that image.

    Raises ValueError when the box is empty or not inside the image."""
    left, top, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0:
        raise ValueError(f"bbox {tuple(bbox)} (left, top, width, height) has a non-positive width/height")
    if left < 0 or top < 0 or left + bw > width + 1e-6 or top + bh > height + 1e-6:
        raise ValueError(f"bbox {tuple(bbox)} (left, top, width, height) is not inside the {width}x{height} image")
    x0, y0 = int(round(left)), int(round(top))
    x1, y1 = max(x0 + 1, int(round(left + bw))), max(y0 + 1, int(round(top + bh)))
    m = torch.zeros(height, width, device=device)
    m[y0:min(y1, height), x0:min(x1, width)] = 1
    return m
