"""Text prevalence in generated images (disentangle.md 5.6): the share of images in which OCR finds text with
confidence above each threshold. The paper used easyocr (thresholds 0.0 and 0.25); this suite uses tesseract
(--psm 7, small images upscaled 4x), so absolute rates are not comparable with the paper's chart, only between
models evaluated here.

Folder layout: DIR/*.png (group "all"), optionally DIR/<group>/*.png (e.g. real/ and fake/ word prompts): each
sub-folder is reported separately and all images together under "all".
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from xclip.evaluation._images import IMAGE_EXTS, list_images

NAME = "text_in_image"
HELP = "rate of generated images in which tesseract OCR finds text (per confidence threshold and sub-folder)"
LAYOUT = f"DIR/*{{{','.join(IMAGE_EXTS)}}} and/or DIR/<group>/<images> (one level of sub-folders)"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--text-in-image-dir", default=None, help=f"folder of generated images: {LAYOUT}")
    parser.add_argument("--text-in-image-thresholds", default="0.0,0.25",
                        help="comma-separated confidence thresholds in [0, 1] (tesseract conf / 100)")
    parser.add_argument("--text-in-image-psm", type=int, default=7, help="tesseract page segmentation mode")
    parser.add_argument("--text-in-image-upscale-below", type=int, default=128,
                        help="upscale 4x images whose short side is below this many px")
    parser.add_argument("--text-in-image-limit", type=int, default=None, help="max images per group")


def collect(folder: Path, limit: int | None) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"text_in_image: folder {folder} does not exist; expected {LAYOUT}")
    groups = {"": list_images(folder)[:limit]}
    for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
        imgs = list_images(sub)[:limit]
        if imgs:
            groups[sub.name] = imgs
    if not any(groups.values()):
        raise FileNotFoundError(f"text_in_image: no images in {folder}; expected {LAYOUT}")
    return {k: v for k, v in groups.items() if v}


def run(model, args) -> dict:
    from xclip.metrics.text_in_image import TextDetectionRate, ocr_max_confidence, require_tesseract

    if not args.text_in_image_dir:
        raise SystemExit(f"text_in_image: give --text-in-image-dir DIR ({LAYOUT})")
    require_tesseract()
    try:
        thresholds = [float(t) for t in args.text_in_image_thresholds.split(",") if t.strip()]
    except ValueError as e:
        raise SystemExit(f"text_in_image: bad --text-in-image-thresholds {args.text_in_image_thresholds!r}: {e}")
    groups = collect(Path(args.text_in_image_dir), args.text_in_image_limit)
    overall = TextDetectionRate(thresholds)
    res: dict = {}
    rows = []
    for group, paths in groups.items():
        confs = torch.tensor([ocr_max_confidence(Image.open(p), psm=args.text_in_image_psm,
                                                 upscale_below=args.text_in_image_upscale_below) for p in paths])
        overall.update(confs)
        if group:
            m = TextDetectionRate(thresholds)
            m.update(confs)
            res.update({f"{group}/{k}": float(v) for k, v in m.compute().items()})
            res[f"{group}/n"] = len(paths)
        rows += [[str(p.relative_to(args.text_in_image_dir)), group or "all", float(c)] for p, c in zip(paths, confs)]
    res.update({f"all/{k}": float(v) for k, v in overall.compute().items()})
    res["all/n"] = int(overall.total)
    res["engine"] = "tesseract"
    res["tables"] = {"ocr": {"columns": ["image", "group", "max_confidence"], "data": rows}}
    return res
