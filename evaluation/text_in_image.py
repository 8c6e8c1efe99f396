"""Text prevalence in generated images (disentangle.md 5.6): the share of images in which OCR finds text with
confidence above each threshold. The paper used easyocr (thresholds 0.0 and 0.25); this suite uses tesseract
(--psm 7, small images upscaled 4x), so absolute rates are not comparable with the paper's chart, only between
models evaluated here.

Folder layout: DIR/*.png (group "all"), optionally DIR/<group>/*.png (e.g. real/ and fake/ word prompts): each
sub-folder is reported separately and all images together under "all". An unreadable (corrupt) image is skipped
with a warning, counted in ``n_unreadable`` and listed in ``unreadable``; the suite fails only when no image reads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xclip.evaluation._images import open_image, require
from xclip.evaluation.common import RunContext
from xclip.utils.images import IMAGE_EXTENSIONS as IMAGE_EXTS
from xclip.utils.images import list_images

NAME = "text_in_image"
HELP = "rate of generated images in which tesseract OCR finds text (per confidence threshold and sub-folder)"
LAYOUT = f"DIR/*{{{','.join(IMAGE_EXTS)}}} and/or DIR/<group>/<images> (one level of sub-folders)"


log = logging.getLogger(__name__)


@dataclass
class Settings:
    """Suite text_in_image."""
    dir: str | None = None
    """folder of generated images: DIR/*.png and/or DIR/<group>/*.png (one level of sub-folders)"""
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.25])
    """confidence thresholds in [0, 1] (tesseract conf / 100)"""
    psm: int = 7
    """tesseract page segmentation mode"""
    upscale_below: int = 128
    """upscale 4x images whose short side is below this many px"""
    limit: int | None = None
    """max images per group"""


def check(s: Settings, ctx: RunContext | None = None) -> None:
    """Folder with images and the tesseract binary, before any suite runs."""
    from xclip.metrics.text_in_image import require_tesseract

    root = require(s.dir, "--text_in_image.dir", LAYOUT, kind="folder")
    if not s.thresholds or any(not 0.0 <= t <= 1.0 for t in s.thresholds):
        raise ValueError(f"--text_in_image.thresholds {s.thresholds}: give confidences in [0, 1]")
    collect(root, s.limit)
    require_tesseract()


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


def _confidences(paths: list[Path], s: Settings, unreadable: list[str]) -> tuple[list[Path], torch.Tensor]:
    """OCR each readable image -> (the paths read, max confidences [n]); unreadable files are appended to
    ``unreadable`` (and skipped)."""
    from xclip.metrics.text_in_image import ocr_max_confidence

    read, confs = [], []
    for p in paths:
        try:
            image = open_image(p, "text_in_image")
        except ValueError as e:
            log.warning("%s (skipped)", e)
            unreadable.append(str(p))
            continue
        read.append(p)
        confs.append(ocr_max_confidence(image, psm=s.psm, upscale_below=s.upscale_below))
    return read, torch.tensor(confs, dtype=torch.float32)


def run(model, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    from xclip.metrics.text_in_image import TextDetectionRate

    check(s)
    root = Path(s.dir)
    groups = collect(root, s.limit)
    overall = TextDetectionRate(list(s.thresholds))
    res: dict = {}
    rows, unreadable = [], []
    for group, paths in groups.items():
        paths, confs = _confidences(paths, s, unreadable)
        if not paths:
            continue
        overall.update(confs)
        if group:
            m = TextDetectionRate(list(s.thresholds))
            m.update(confs)
            res.update({f"{group}/{k}": float(v) for k, v in m.compute().items()})
            res[f"{group}/n"] = len(paths)
        rows += [[str(p.relative_to(root)), group or "all", float(c)] for p, c in zip(paths, confs)]
    if not rows:
        raise ValueError(f"text_in_image: none of the images in {root} could be read (e.g. {unreadable[0]}); "
                         f"expected {LAYOUT}")
    res.update({f"all/{k}": float(v) for k, v in overall.compute().items()})
    res["all/n"] = int(overall.total)
    res["n_unreadable"] = len(unreadable)
    res["unreadable"] = unreadable[:50]
    res["engine"] = "tesseract"
    res["tables"] = {"ocr": {"columns": ["image", "group", "max_confidence"], "data": rows}}
    return res
