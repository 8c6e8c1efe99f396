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
from torchmetrics.classification import BinaryAccuracy, MulticlassJaccardIndex
from torchmetrics.functional.classification import binary_average_precision


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
def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Step-wise AP = sum_n (R_n - R_{n-1}) P_n over distinct score thresholds (torchmetrics'
    binary_average_precision, = sklearn's average_precision_score). NaN when there are no positives."""
    y = labels.flatten().long()
    if int(y.sum()) == 0:
        return float("nan")
    return float(binary_average_precision(scores.flatten().double(), y))


def two_channel_ap(heatmap: torch.Tensor, mask: torch.Tensor) -> float:
    """AP of [1 - map, map] against the one-hot [background, foreground] mask, flattened together."""
    m = mask.bool()
    scores = torch.stack([1 - heatmap, heatmap])
    labels = torch.stack([~m, m])
    return average_precision(scores, labels)


class SegmentationMetrics(Metric):
    """Pixel accuracy (torchmetrics BinaryAccuracy), 2-class mIoU (MulticlassJaccardIndex, macro over {background,
    foreground}, accumulated over all pixels) and mean per-image two-channel AP (DDP-reduced by sum)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pixel_acc = BinaryAccuracy()
        self.jaccard = MulticlassJaccardIndex(num_classes=2, average="macro")
        self.add_state("ap_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ap_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        """heatmaps [B, h, w] in [0, 1]; masks [B, h, w] bool/0-1 ground-truth foreground."""
        if heatmaps.shape != masks.shape:
            raise ValueError(f"heatmaps {tuple(heatmaps.shape)} and masks {tuple(masks.shape)} differ in shape")
        pred, target = foreground(heatmaps).long().flatten(), masks.long().flatten()   # [B*h*w]
        self.pixel_acc.update(pred, target)
        self.jaccard.update(pred, target)
        for hm, mk in zip(heatmaps, masks):
            ap = two_channel_ap(hm, mk)
            if not math.isnan(ap):
                self.ap_sum += ap
                self.ap_count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {"pixel_acc": self.pixel_acc.compute().double(),
                "miou": self.jaccard.compute().double(),
                "map": self.ap_sum / self.ap_count.clamp_min(1)}

    def reset(self) -> None:
        super().reset()
        self.pixel_acc.reset()
        self.jaccard.reset()
