"""The built-in synthetic world: zero-shot shape accuracy clean vs. with a wrong class word written on the object
(typographic attack), and word-image -> word-string retrieval (dictionary and nonsense words), on fixed seeded splits.

    xclip evaluate --config configs/evaluate/world.yaml      # = --backbone tiny-vit-world --pretrained synthetic-world
                                                             #   --suite world
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from xclip.datamodules.synthetic_world import (
    COLOURS,
    SHAPES,
    TEXT_LAYOUT,
    TextLayout,
    typographic_split,
    word_prompt,
    word_split,
)
from xclip.evaluation.common import EvalModel, RunContext
from xclip.models.zero_shot import zero_shot_logits

NAME = "world"
HELP = "synthetic world: clean vs. wrong-word (attacked) zero-shot accuracy, and word reading"

# The zero-shot prompt ensemble: the caption forms of the world, averaged over colours.
TEMPLATES: tuple[str, ...] = tuple(f"a photo of a {c} {{}}." for c in COLOURS) + tuple(f"a {c} {{}}." for c in COLOURS)


@dataclass
class Settings:
    """Suite world."""
    n: int = 400
    """objects in the typographic split (each clean and attacked)"""
    seed: int = 1234
    """seed of the fixed splits"""
    words: int = 200
    """word images per retrieval split"""
    text_layout: TextLayout = TEXT_LAYOUT
    """how words are drawn (datamodules/synthetic_world.py): 'grid' (one letter per ViT patch cell) or 'free' (any
    size and position); default: the world's TEXT_LAYOUT, the shipped CLIP's. Use the layout the CLIP was trained on"""


def check(s: Settings, ctx: RunContext | None = None) -> None:
    if s.text_layout not in ("free", "grid"):
        raise ValueError(f"--world.text_layout must be 'free' or 'grid' (got {s.text_layout!r})")
    if s.n < 1 or s.words < 2:
        raise ValueError(f"--world.n must be >= 1 and --world.words >= 2 (got {s.n}, {s.words})")


def images_to_tensor(model: EvalModel, images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (already at the model's resolution) -> CLIP-normalised [N, 3, H, W]."""
    size = model.backbone.image_size
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size)) if im.size != (size, size)
                               else im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(model.device)  # [N, 3, H, W] in [0, 1]
    return model.backbone.normalize_pixels(x)


@torch.no_grad()
def typographic_metrics(model: EvalModel, n: int = 400, seed: int = 1234, text_layout: TextLayout = TEXT_LAYOUT
                        ) -> dict[str, float]:
    split = typographic_split(n, seed, image_size=model.backbone.image_size, text_layout=text_layout)
    cls = model.class_text_features(SHAPES, TEMPLATES)                      # [C, D]
    labels = torch.tensor(split.labels, device=model.device)
    attack = torch.tensor([SHAPES.index(w) for w in split.attack_words], device=model.device)
    pred_clean = zero_shot_logits(model.encode_images(images_to_tensor(model, split.clean)), cls).argmax(-1)
    pred_att = zero_shot_logits(model.encode_images(images_to_tensor(model, split.attacked)), cls).argmax(-1)
    clean = (pred_clean == labels).float().mean().item()
    attacked = (pred_att == labels).float().mean().item()
    return {"clean_acc": clean, "attacked_acc": attacked, "typographic_gap": clean - attacked,
            "attack_success_rate": (pred_att == attack).float().mean().item(),
            "chance": 1.0 / len(SHAPES), "n_objects": n}


@torch.no_grad()
def word_retrieval_top1(model: EvalModel, n: int, seed: int, nonsense: bool, text_layout: TextLayout = TEXT_LAYOUT) -> float:
    images, words = word_split(n, seed, image_size=model.backbone.image_size, nonsense=nonsense,
                               text_layout=text_layout)
    img = model.encode_images(images_to_tensor(model, images))              # [N, D]
    txt = model.encode_texts([word_prompt(w) for w in words])              # [N, D]
    pred = (img @ txt.t()).argmax(-1).cpu()
    return (pred == torch.arange(len(words))).float().mean().item()


def run(model: EvalModel, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    check(s)
    out = typographic_metrics(model, s.n, s.seed, s.text_layout)
    out["word_top1_real"] = word_retrieval_top1(model, s.words, s.seed + 1, nonsense=False, text_layout=s.text_layout)
    out["word_top1_nonsense"] = word_retrieval_top1(model, s.words, s.seed + 2, nonsense=True,
                                                    text_layout=s.text_layout)
    out["word_chance"] = 1.0 / s.words
    return out
