"""Helpers shared by the evaluation suites: encode PIL images with an EvalModel, list image files."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image


def encode_pil(model, images: Iterable[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """PIL images -> [N, D'] normalised (and projected, when the EvalModel has W) image embeddings."""
    return model.backbone.encode_pil(images, batch_size, encode=model.encode_images)


def class_features(model, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, D'] prompt-ensembled class embeddings on the CPU."""
    return model.class_text_features(list(names), templates=tuple(templates)).cpu()


def check_templates(templates: Sequence[str], flag: str) -> list[str]:
    """Prompt templates: at least one, each with '{}'; errors name the flag."""
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{flag} {list(templates)!r}: give at least one template, each containing '{{}}' "
                         f"(bad: {bad})")
    return list(templates)


def require(path: str | Path | None, flag: str, expected: str, kind: str = "file") -> Path:
    """Check a suite input before any work: given, and an existing file / folder; errors name the flag and layout."""
    if not path:
        raise ValueError(f"give {flag} ({expected})")
    p = Path(path).expanduser()
    ok = p.is_file() if kind == "file" else p.is_dir()
    if not ok:
        raise FileNotFoundError(f"{flag} {p}: no such {kind}; expected {expected}")
    return p


def open_image(path: Path, suite: str) -> Image.Image:
    """Open and fully decode an image; a corrupt or non-image file raises ValueError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{suite}: cannot read image {path} ({type(e).__name__}: {e}); replace or remove the "
                         f"file") from None
