"""Helpers shared by the evaluation suites: encode PIL images with an EvalModel, list image files."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def encode_pil(model, images: Iterable[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """PIL images -> [N, D'] normalised (and projected, when the EvalModel has W) image embeddings."""
    transform = model.image_transform()
    feats, batch = [], []
    for img in images:
        batch.append(transform(img.convert("RGB")))  # [3, H, W]
        if len(batch) == batch_size:
            feats.append(model.encode_images(torch.stack(batch)).cpu())
            batch = []
    if batch:
        feats.append(model.encode_images(torch.stack(batch)).cpu())
    if not feats:
        raise ValueError("encode_pil: no images to encode")
    return torch.cat(feats)


def class_features(model, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, D'] prompt-ensembled class embeddings on the CPU."""
    return model.class_text_features(list(names), templates=tuple(templates)).cpu()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def parse_templates(spec: str) -> list[str]:
    """'a photo of a {}.|a {}' -> ['a photo of a {}.', 'a {}']; each must contain '{}'."""
    templates = [t for t in spec.split("|") if t]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"template spec {spec!r}: every '|'-separated template must contain '{{}}' (bad: {bad})")
    return templates
