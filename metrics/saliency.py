"""Otsu-binarised relevance maps against ground-truth regions: precision, recall, F1 (ntlb_coop.md 4.4).

For each (map, region) pair: P = map > otsu(map) (batched Otsu, same histogram rule as
skimage.filters.threshold_otsu with 256 bins over [min, max]); precision = |P n B| / |P|, recall = |P n B| / |B|,
F1 = 2PR / (P + R) (0 when both are 0). The metric averages each over pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def otsu_threshold(maps: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """maps [B, ...] (each item one map) -> thresholds [B], in float64 arithmetic.

    Histogram: ``nbins`` equal bins spanning each map's [min, max] (right edge in the last bin); the threshold is
    the centre of the bin maximising the between-class variance w1 * w2 * (mu1 - mu2)^2 of the split after that
    bin (first maximum on ties). A constant map returns its value (nothing is above it).
    """
    if maps.dim() < 2:
        raise ValueError(f"otsu_threshold: expected [B, ...] maps, got shape {tuple(maps.shape)}")
    x = maps.reshape(maps.shape[0], -1).double()  # [B, P]
    lo, hi = x.min(dim=1).values, x.max(dim=1).values  # [B]
    constant = hi <= lo
    width = torch.where(constant, torch.ones_like(hi), hi - lo)  # [B]
    steps = torch.arange(nbins + 1, dtype=torch.float64, device=x.device) / nbins  # [nbins + 1]
    edges = lo[:, None] + width[:, None] * steps[None, :]  # [B, nbins + 1]
    edges[:, -1] = torch.where(constant, edges[:, -1], hi)
    idx = ((x - lo[:, None]) * (nbins / width[:, None])).floor().long().clamp(0, nbins - 1)  # [B, P]
    # Correct floating-point misplacements at bin edges (numpy.histogram's rule).
    idx = idx - (x < edges.gather(1, idx)).long()
    idx = idx + ((x >= edges.gather(1, (idx + 1).clamp(max=nbins))) & (idx != nbins - 1)).long()
    idx = idx.clamp(0, nbins - 1)
    counts = torch.zeros(x.shape[0], nbins, dtype=torch.float64, device=x.device).scatter_add_(
        1, idx, torch.ones_like(x))  # [B, nbins]
    centres = (edges[:, :-1] + edges[:, 1:]) / 2  # [B, nbins]
    w1 = counts.cumsum(1)  # [B, nbins]
    w2 = counts.flip(1).cumsum(1).flip(1)
    m1 = (counts * centres).cumsum(1) / w1.clamp(min=1e-12)
    m2 = (counts * centres).flip(1).cumsum(1).flip(1) / w2.clamp(min=1e-12)
    var12 = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2  # [B, nbins - 1]
    best = var12.argmax(dim=1, keepdim=True)  # [B, 1]
    thr = centres.gather(1, best).squeeze(1)  # [B]
    return torch.where(constant, lo, thr)


def otsu_binarize(maps: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """maps [B, H, W] -> bool masks [B, H, W]: map > its own Otsu threshold."""
    thr = otsu_threshold(maps, nbins).view(-1, *([1] * (maps.dim() - 1)))
    return maps.double() > thr


def boxes_to_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """boxes [N, 4] pixel x0, y0, x1, y1 (continuous coordinates) -> bool masks [N, H, W].

    A pixel belongs to a box when its centre (j + 0.5, i + 0.5) lies inside [x0, x1) x [y0, y1).
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes_to_masks: expected [N, 4] x0,y0,x1,y1 boxes, got {tuple(boxes.shape)}")
    cx = torch.arange(width, dtype=torch.float64, device=boxes.device) + 0.5  # [W]
    cy = torch.arange(height, dtype=torch.float64, device=boxes.device) + 0.5  # [H]
    b = boxes.double()
    in_x = (cx[None, :] >= b[:, 0:1]) & (cx[None, :] < b[:, 2:3])  # [N, W]
    in_y = (cy[None, :] >= b[:, 1:2]) & (cy[None, :] < b[:, 3:4])  # [N, H]
    return in_y[:, :, None] & in_x[:, None, :]


def mask_prf(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target bool [N, H, W] -> [N, 3] (precision, recall, F1) per pair; empty prediction -> P = 0."""
    if pred.shape != target.shape:
        raise ValueError(f"mask_prf: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p, t = pred.flatten(1), target.flatten(1)  # [N, HW]
    inter = (p & t).sum(1).double()
    n_p, n_t = p.sum(1).double(), t.sum(1).double()
    precision = torch.where(n_p > 0, inter / n_p.clamp(min=1), torch.zeros_like(inter))
    recall = torch.where(n_t > 0, inter / n_t.clamp(min=1), torch.zeros_like(inter))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(inter))
    return torch.stack([precision, recall, f1], dim=1)


class OtsuPRF(Metric):
    """Mean precision / recall / F1 of Otsu-binarised maps against boolean region masks (one pair per map)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, nbins: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.nbins = nbins
        self.add_state("sums", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: torch.Tensor, target: torch.Tensor) -> None:
        """maps [N, h, w] relevance (upsampled bilinearly to the target size if smaller); target bool [N, H, W]."""
        if maps.dim() != 3 or target.dim() != 3 or len(maps) != len(target):
            raise ValueError(f"OtsuPRF: maps [N, h, w] and target [N, H, W] expected, "
                             f"got {tuple(maps.shape)} and {tuple(target.shape)}")
        if maps.shape[-2:] != target.shape[-2:]:
            maps = F.interpolate(maps[:, None].float(), size=target.shape[-2:], mode="bilinear",
                                 align_corners=False)[:, 0]
        if not bool(target.flatten(1).any(1).all()):
            raise ValueError("OtsuPRF: every ground-truth region must cover at least one pixel")
        prf = mask_prf(otsu_binarize(maps, self.nbins), target.bool())
        self.sums += prf.sum(0).to(self.sums)
        self.total += len(maps)

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.sums / self.total.clamp(min=1)
        return {"precision": mean[0], "recall": mean[1], "f1": mean[2]}
