"""Text prevalence in generated images: the share of images in which an OCR engine finds text above a confidence
threshold (disentangle.md 5.6; the paper used easyocr at thresholds 0.0 and 0.25, here tesseract is the engine).

``TextDetectionRate`` takes one number per image: the highest confidence (in [0, 1]) of any detected word, or
-1 when nothing was detected. An image counts as "has text" at threshold t when that confidence is > t.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import torch
from PIL import Image
from torchmetrics import Metric

TESSERACT_APT = "tesseract-ocr"


def detection_counts(max_conf: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """max_conf [N] (-1 = no text) -> [len(thresholds)] counts of images with max_conf > t."""
    return torch.stack([(max_conf > t).sum() for t in thresholds]).long()


class TextDetectionRate(Metric):
    """Fraction of images whose best OCR confidence exceeds each threshold."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, thresholds: Sequence[float] = (0.0, 0.25), **kwargs):
        super().__init__(**kwargs)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.add_state("hits", default=torch.zeros(len(self.thresholds), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, max_conf: torch.Tensor) -> None:
        self.hits += detection_counts(max_conf.flatten(), self.thresholds).to(self.hits.device)
        self.total += max_conf.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        denom = self.total.clamp(min=1).float()
        return {f"rate@{t:g}": self.hits[i].float() / denom for i, t in enumerate(self.thresholds)}


# ---- the OCR engine ---------------------------------------------------------------------------------------
def require_tesseract() -> None:
    """Fail early, naming the apt package, when pytesseract or the tesseract binary is missing."""
    try:
        import pytesseract  # noqa: F401
    except ImportError as e:
        raise RuntimeError("pytesseract is not installed: `pip install pytesseract` (and the binary: "
                           f"`apt-get install {TESSERACT_APT}`).") from e
    if shutil.which("tesseract") is None:
        raise RuntimeError(f"The tesseract binary is not on PATH: install it with `apt-get install "
                           f"{TESSERACT_APT} tesseract-ocr-eng` (Debian/Ubuntu).")


def ocr_max_confidence(image: Image.Image, psm: int = 7, upscale_below: int = 128, upscale: int = 4,
                       min_alnum: int = 1) -> float:
    """Highest tesseract word confidence in [0, 1] for ``image``, or -1 when no word is found.

    Images whose short side is below ``upscale_below`` px are enlarged ``upscale``x (bicubic) first: tesseract
    misses small text (64 px renders: 15-18/20 words read, 20/20 after a 4x upscale; environment.md 7).
    A "word" must contain at least ``min_alnum`` letters/digits (tesseract reports stray punctuation on noise).
    """
    import pytesseract

    img = image.convert("RGB")
    if min(img.size) < upscale_below:
        img = img.resize((img.width * upscale, img.height * upscale), Image.BICUBIC)
    # One OpenMP thread for the tesseract child only (faster on small images; environment.md 7). Never set it for
    # the whole process: torch subprocesses that inherit OMP_THREAD_LIMIT=1 while expecting 2 threads got garbage
    # conv weight gradients (|g| ~ 1e35) and NaN pretraining runs on this machine.
    previous = os.environ.get("OMP_THREAD_LIMIT")
    os.environ["OMP_THREAD_LIMIT"] = "1"
    try:
        data = pytesseract.image_to_data(img, config=f"--psm {psm}", output_type=pytesseract.Output.DICT)
    finally:
        if previous is None:
            os.environ.pop("OMP_THREAD_LIMIT", None)
        else:
            os.environ["OMP_THREAD_LIMIT"] = previous
    best = -1.0
    for text, conf in zip(data.get("text", []), data.get("conf", [])):
        try:
            c = float(conf)
        except (TypeError, ValueError):
            continue
        if c < 0 or sum(ch.isalnum() for ch in str(text)) < min_alnum:
            continue
        best = max(best, c / 100.0)
    return best
