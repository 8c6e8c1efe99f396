"""Detector-based evaluation of spatially conditioned generation (ntlb_coop.md 4.4, item 2): a COCO-trained DETR
runs on each generated image, the conditioning boxes are the ground truth; COCO AP, AP50, AP75, AR1/10/100
(torchmetrics MeanAveragePrecision, faster_coco_eval backend).

Layout::

    DIR/annotations.json   {"img_000.png": [{"label": "dog", "box": [x0, y0, x1, y1]}, ...], ...}  (pixels)
    DIR/img_000.png ...

Detections come from DETR (``--detection-ap-detector``: HF id or a local save_pretrained folder) or from a JSON
file of precomputed ones (``--detection-ap-predictions``: {"img_000.png": [{"label", "box", "score"}, ...]}).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from xclip.evaluation.common import read_json_file


NAME = "detection_ap"
HELP = "DETR detections on generated images vs conditioning boxes: COCO AP / AP50 / AP75 / AR1/10/100"
LAYOUT = ("DIR/annotations.json = {\"<image file>\": [{\"label\": \"dog\", \"box\": [x0, y0, x1, y1]}, ...]} "
          "with the images in DIR")


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--detection-ap-dir", default=None, help=f"generated images + boxes: {LAYOUT}")
    parser.add_argument("--detection-ap-detector", default="facebook/detr-resnet-50",
                        help="DETR: HF model id (from the HF cache offline) or a local save_pretrained folder")
    parser.add_argument("--detection-ap-predictions", default=None,
                        help="JSON of precomputed detections {image: [{label, box, score}]} instead of running DETR")
    parser.add_argument("--detection-ap-threshold", type=float, default=0.5, help="DETR score threshold")
    parser.add_argument("--detection-ap-label-map", default=None,
                        help="JSON object mapping DETR label names to target class names, e.g. {\"motorcycle\": \"motorbike\"}")
    parser.add_argument("--detection-ap-backend", default="faster_coco_eval", choices=("faster_coco_eval", "pycocotools"))


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


def run(model, args) -> dict:
    from xclip.metrics.detection import box_ap_metric, summarize_map

    if not args.detection_ap_dir:
        raise SystemExit(f"detection_ap: give --detection-ap-dir DIR ({LAYOUT})")
    root = Path(args.detection_ap_dir)
    ann_path = root / "annotations.json"
    ann = _read_json(ann_path, "annotation file")
    missing = [f for f in ann if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"detection_ap: images {missing[:5]} listed in {ann_path} are missing; expected {LAYOUT}")
    files = sorted(ann)
    targets = {f: _boxes(ann_path, f, ann[f], None, scored=False) for f in files}
    classes = sorted({l for t in targets.values() for l in t["labels"]})
    index = {c: i for i, c in enumerate(classes)}

    if args.detection_ap_predictions:
        pred_path = Path(args.detection_ap_predictions)
        raw = _read_json(pred_path, "predictions file")
        preds = []
        for f in files:
            p = _boxes(pred_path, f, raw.get(f, []), index, scored=True)
            preds.append({"boxes": p["boxes"], "scores": p["scores"],
                          "labels": torch.tensor([index[l] for l in p["labels"]], dtype=torch.long)})
        source = str(pred_path)
    else:
        from xclip.models.detr import DetrDetector

        label_map = json.loads(args.detection_ap_label_map) if args.detection_ap_label_map else None
        det = DetrDetector.from_pretrained(args.detection_ap_detector, classes, label_map,
                                           threshold=args.detection_ap_threshold, device=args.device)
        preds = det.detect([Image.open(root / f) for f in files])
        source = args.detection_ap_detector
    metric = box_ap_metric(args.detection_ap_backend, class_metrics=True)
    metric.update(preds, [{"boxes": targets[f]["boxes"],
                           "labels": torch.tensor([index[l] for l in targets[f]["labels"]], dtype=torch.long)}
                          for f in files])
    res = summarize_map(metric.compute(), classes)
    per_class = res.pop("AP_per_class", {})
    res.update({"n_images": len(files), "n_boxes": sum(len(t["labels"]) for t in targets.values()),
                "n_detections": sum(len(p["labels"]) for p in preds), "detections_from": source})
    res["tables"] = {"per_class": {"columns": ["class", "AP"], "data": [[c, v] for c, v in per_class.items()]}}
    return res
