"""Detector-based evaluation of spatially conditioned generation (ntlb_coop.md 4.4, item 2): a COCO-trained DETR
runs on each generated image, the conditioning boxes are the ground truth; COCO AP, AP50, AP75, AR1/10/100
(torchmetrics MeanAveragePrecision, faster_coco_eval backend).

Layout::

    DIR/annotations.json   {"img_000.png": [{"label": "dog", "box": [x0, y0, x1, y1]}, ...], ...}  (pixels)
    DIR/img_000.png ...

Detections come from DETR (``--detection_ap.detector``: HF id or a local save_pretrained folder) or from a JSON
file of precomputed ones (``--detection_ap.predictions``: {"img_000.png": [{"label", "box", "score"}, ...]}).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from xclip.evaluation._images import open_image, require
from xclip.evaluation.common import RunContext, read_json_file

NAME = "detection_ap"
HELP = "DETR detections on generated images vs conditioning boxes: COCO AP / AP50 / AP75 / AR1/10/100"
LAYOUT = ("DIR/annotations.json = {\"<image file>\": [{\"label\": \"dog\", \"box\": [x0, y0, x1, y1]}, ...]} "
          "with the images in DIR")


@dataclass
class Settings:
    """Suite detection_ap."""
    dir: str | None = None
    """generated images + boxes: DIR/annotations.json = {"<image file>": [{"label", "box": [x0,y0,x1,y1]}]}"""
    detector: str = "facebook/detr-resnet-50"
    """DETR: HF model id (from the HF cache offline) or a local save_pretrained folder"""
    predictions: str | None = None
    """JSON of precomputed detections {image: [{label, box, score}]} instead of running DETR"""
    threshold: float = 0.5
    """DETR score threshold"""
    label_map: dict[str, str] | None = None
    """DETR label names -> target class names, e.g. {motorcycle: motorbike}"""
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval"


def check(s: Settings, ctx: RunContext | None = None) -> None:
    root = require(s.dir, "--detection_ap.dir", LAYOUT, kind="folder")
    ann_path = require(root / "annotations.json", "--detection_ap.dir", LAYOUT)
    missing = [f for f in _read_json(ann_path, "annotation file") if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"detection_ap: images {missing[:5]} listed in {ann_path} are missing; expected {LAYOUT}")
    if s.predictions:
        require(s.predictions, "--detection_ap.predictions", "a JSON {image: [{label, box, score}, ...]}")


def _read_json(path: Path, what: str) -> dict:
    return read_json_file(path, "detection_ap", dict, f"{what}: {LAYOUT}")


def _boxes(path: Path, image: str, entries, index: dict[str, int] | None, scored: bool) -> dict[str, torch.Tensor]:
    boxes, labels, scores = [], [], []
    for e in entries:
        if not isinstance(e, dict) or "label" not in e or "box" not in e or len(e["box"]) != 4 or \
                (scored and "score" not in e):
            need = "label, box [x0,y0,x1,y1], score" if scored else "label, box [x0,y0,x1,y1]"
            raise ValueError(f"detection_ap: {path} entry for {image!r}: {e!r} needs {need}")
        if index is not None and e["label"] not in index:
            continue  # a predicted class with no ground truth anywhere
        boxes.append([float(v) for v in e["box"]])
        labels.append(e["label"])
        scores.append(float(e.get("score", 1.0)))
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": labels,
            "scores": torch.tensor(scores, dtype=torch.float32)}


def run(model, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    from xclip.metrics.detection import box_ap_metric, summarize_map

    check(s)
    root = Path(s.dir)
    ann_path = root / "annotations.json"
    ann = _read_json(ann_path, "annotation file")
    files = sorted(ann)
    targets = {f: _boxes(ann_path, f, ann[f], None, scored=False) for f in files}
    classes = sorted({l for t in targets.values() for l in t["labels"]})
    index = {c: i for i, c in enumerate(classes)}

    if s.predictions:
        pred_path = Path(s.predictions)
        raw = _read_json(pred_path, "predictions file")
        preds = []
        for f in files:
            p = _boxes(pred_path, f, raw.get(f, []), index, scored=True)
            preds.append({"boxes": p["boxes"], "scores": p["scores"],
                          "labels": torch.tensor([index[l] for l in p["labels"]], dtype=torch.long)})
        source = str(pred_path)
    else:
        from xclip.models.detr import DetrDetector

        det = DetrDetector.from_pretrained(s.detector, classes, s.label_map, threshold=s.threshold,
                                           device=str(model.device))
        preds = det.detect([open_image(root / f, "detection_ap") for f in files])
        source = s.detector
    metric = box_ap_metric(s.backend, class_metrics=True)
    metric.update(preds, [{"boxes": targets[f]["boxes"],
                           "labels": torch.tensor([index[l] for l in targets[f]["labels"]], dtype=torch.long)}
                          for f in files])
    res = summarize_map(metric.compute(), classes)
    per_class = res.pop("AP_per_class", {})
    res.update({"n_images": len(files), "n_boxes": sum(len(t["labels"]) for t in targets.values()),
                "n_detections": sum(len(p["labels"]) for p in preds), "detections_from": source})
    res["tables"] = {"per_class": {"columns": ["class", "AP"], "data": [[c, v] for c, v in per_class.items()]}}
    return res
