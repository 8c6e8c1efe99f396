"""Zero-shot segmentation from per-token contributions (TextSpan §5, spec A6.2) and its metrics.

Per image: sum the per-token contributions over layers and heads (CLS token dropped) -> [N-1, D] patch vectors;
score them against the classifier; heatmap = score of the predicted class minus the mean over classes; reshape to
the patch grid, bilinearly upsample by the patch size, clip at 0, min-max normalise; foreground = map > its mean.

Metrics (the Chefer et al. benchmark conventions): pixel accuracy and mIoU over {background, foreground}
accumulated over the dataset, and mAP = mean over images of the average precision of the two-channel score
(foreground = map, background = 1 - map) against the one-hot mask, both channels flattened together.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric


# ---- maps ---------------------------------------------------------------------------------------------------
def patch_vectors(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, L, N, D] (per layer, per source token; heads summed) -> [B, N-1, D] patch contributions."""
    if tokens.dim() != 4:
        raise ValueError(f"expected per-token contributions [B, L, N, D], got {tuple(tokens.shape)}")
    return tokens[:, :, 1:].sum(dim=1)


def _to_grid(scores: torch.Tensor, out_size: int | None) -> torch.Tensor:
    """[B, N-1, ...] -> [B, ..., g, g] upsampled bilinearly to out_size (if given)."""
    B, P = scores.shape[:2]
    g = int(round(math.sqrt(P)))
    if g * g != P:
        raise ValueError(f"{P} patch tokens do not form a square grid")
    grid = scores.reshape(B, g, g, -1).permute(0, 3, 1, 2)                   # [B, T, g, g]
    if out_size is not None and out_size != g:
        grid = F.interpolate(grid, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return grid


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Clip negatives to 0 and min-max normalise each map over its last two dims ([..., h, w])."""
    maps = maps.clamp_min(0)
    lo = maps.flatten(-2).min(-1).values[..., None, None]
    hi = maps.flatten(-2).max(-1).values[..., None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def class_heatmaps(tokens: torch.Tensor, classifier: torch.Tensor, class_idx: torch.Tensor,
                   out_size: int | None = None) -> torch.Tensor:
    """[B, h, w] normalised maps for the chosen class of each image.

    tokens [B, L, N, D]; classifier [D, C]; class_idx [B] (the *predicted* class in the paper's protocol).
    """
    scores = patch_vectors(tokens) @ classifier.to(tokens)                   # [B, N-1, C]
    heat = scores.gather(2, class_idx.view(-1, 1, 1).expand(-1, scores.shape[1], 1)).squeeze(2) \
        - scores.mean(dim=2)                                                  # [B, N-1]
    return normalize_maps(_to_grid(heat[..., None], out_size)[:, 0])


def text_maps(tokens: torch.Tensor, texts: torch.Tensor, out_size: int | None = None,
              normalize: bool = False) -> torch.Tensor:
    """[B, T, h, w] per-patch similarity with each text embedding (texts [T, D]); the spatial view of A6.4."""
    maps = _to_grid(patch_vectors(tokens) @ texts.to(tokens).T, out_size)     # [B, T, h, w]
    return normalize_maps(maps) if normalize else maps


def foreground(maps: torch.Tensor) -> torch.Tensor:
    """[B, h, w] bool: each map thresholded at its own mean."""
    return maps > maps.flatten(-2).mean(-1)[..., None, None]


# ---- metrics ------------------------------------------------------------------------------------------------
def pixel_correct_total(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(correctly labelled pixels, all pixels) for binary masks of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return int((pred.bool() == target.bool()).sum()), int(target.numel())


def intersection_union(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 2) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Per-class intersection and union pixel counts ([num_classes] each) for integer label maps."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p, t = pred.long().flatten(), target.long().flatten()
    inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes]
    area_p = torch.bincount(p, minlength=num_classes)[:num_classes]
    area_t = torch.bincount(t, minlength=num_classes)[:num_classes]
    return inter, area_p + area_t - inter


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Step-wise AP = sum_n (R_n - R_{n-1}) P_n over distinct score thresholds (as sklearn's
    average_precision_score). NaN when there are no positives."""
    s, y = scores.flatten().double(), labels.flatten().double()
    n_pos = float(y.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    tps = torch.cumsum(y, 0)
    # the last index of each run of equal scores is where a threshold takes effect
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tps, n_pred = tps[last], torch.nonzero(last).flatten().double() + 1
    precision, recall = tps / n_pred, tps / n_pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def two_channel_ap(heatmap: torch.Tensor, mask: torch.Tensor) -> float:
    """AP of [1 - map, map] against the one-hot [background, foreground] mask, flattened together."""
    m = mask.bool()
    scores = torch.stack([1 - heatmap, heatmap])
    labels = torch.stack([~m, m])
    return average_precision(scores, labels)


class SegmentationMetrics(Metric):
    """Accumulates pixel accuracy, 2-class mIoU and mean per-image two-channel AP (DDP-reduced by sum)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("inter", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ap_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ap_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        """heatmaps [B, h, w] in [0, 1]; masks [B, h, w] bool/0-1 ground-truth foreground."""
        if heatmaps.shape != masks.shape:
            raise ValueError(f"heatmaps {tuple(heatmaps.shape)} and masks {tuple(masks.shape)} differ in shape")
        pred = foreground(heatmaps)
        c, t = pixel_correct_total(pred, masks)
        self.correct += c
        self.total += t
        i, u = intersection_union(pred.long(), masks.long(), 2)
        self.inter += i.to(self.inter.device)
        self.union += u.to(self.union.device)
        for hm, mk in zip(heatmaps, masks):
            ap = two_channel_ap(hm, mk)
            if not math.isnan(ap):
                self.ap_sum += ap
                self.ap_count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        iou = self.inter.double() / self.union.double().clamp_min(1)
        return {"pixel_acc": self.correct.double() / self.total.clamp_min(1),
                "miou": iou.mean(),
                "map": self.ap_sum / self.ap_count.clamp_min(1)}
