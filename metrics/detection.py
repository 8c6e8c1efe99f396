"""COCO-style box AP / AR of detections against target boxes (ntlb_coop.md 4.4, environment.md 5).

The metric is torchmetrics' ``MeanAveragePrecision`` (COCO evaluation, IoU 0.50:0.95, area ranges, maxDets
1/10/100) with the faster_coco_eval backend; ``summarize_map`` renames its output to AP, AP50, AP75, AR1, AR10,
AR100 (+ per-class AP when asked). -1 means "no ground truth in that range" (COCO convention).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics.detection import MeanAveragePrecision

SUMMARY_KEYS = {"map": "AP", "map_50": "AP50", "map_75": "AP75", "mar_1": "AR1", "mar_10": "AR10",
                "mar_100": "AR100", "map_small": "AP_small", "map_medium": "AP_medium", "map_large": "AP_large"}


def box_ap_metric(backend: str = "faster_coco_eval", class_metrics: bool = False) -> MeanAveragePrecision:
    """A fresh COCO bbox metric. ``update(preds, targets)`` takes lists of dicts per image:
    preds {"boxes" [n, 4] xyxy pixels, "scores" [n], "labels" [n] long}, targets {"boxes" [m, 4], "labels" [m]}.
    """
    return MeanAveragePrecision(iou_type="bbox", box_format="xyxy", backend=backend, class_metrics=class_metrics)


def summarize_map(result: dict[str, torch.Tensor], class_names: Sequence[str] | None = None) -> dict:
    """MeanAveragePrecision.compute() output -> {"AP": .., "AP50": .., ..., ["AP_per_class": {name: ap}]}."""
    out: dict = {new: float(result[old]) for old, new in SUMMARY_KEYS.items() if old in result}
    per_class = result.get("map_per_class")
    classes = result.get("classes")
    if per_class is not None and classes is not None and per_class.numel() == classes.numel() > 0:
        classes = classes.flatten().tolist()
        vals = per_class.flatten().tolist()
        out["AP_per_class"] = {(class_names[c] if class_names and 0 <= c < len(class_names) else str(c)): v
                               for c, v in zip(classes, vals)}
    return out
