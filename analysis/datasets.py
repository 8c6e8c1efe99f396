"""Image sources for the TextSpan analyses: labelled classification sets, segmentation sets, and classifiers.

    data = load_classification("world:200", backbone)          # the built-in world (clean shapes, 20 classes)
    data = load_classification("/data/imagenet/val", backbone)  # ROOT/<class>/<image> (sorted class folders)
    W = build_classifier(backbone, data.class_prompts)          # [D, C] zero-shot classifier (spec A3.4)
    seg = load_segmentation("world:100", backbone)             # images + object masks
    seg = load_segmentation("/data/seg", backbone)             # ROOT/images/<stem>.* + ROOT/masks/<stem>.png
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from xclip.models.zero_shot import openai_imagenet_templates, prompt_classifier
from xclip.utils.images import list_images

CLASS_FOLDER_LAYOUT = "ROOT/<class name>/<image>.{png,jpg,...} (one folder per class)"
SEG_FOLDER_LAYOUT = "ROOT/images/<stem>.{png,jpg} and ROOT/masks/<stem>.png (non-zero = foreground)"


@dataclass
class LabelledImages:
    """A lazily loaded labelled image set: ``load(i)`` -> CLIP-normalised [3, H, W]."""
    load: Callable[[int], torch.Tensor]
    labels: torch.Tensor                  # [K]
    classnames: list[str]
    class_prompts: list[list[str]]        # per class, the prompts whose mean embedding is the class vector
    groups: torch.Tensor | None = None    # [K] group ids (spurious-cue datasets)
    group_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, start: int = 0) -> Iterator[torch.Tensor]:
        """[b, 3, H, W] batches from image ``start`` on (resumable decomposition)."""
        for a in range(start, len(self), batch_size):
            yield torch.stack([self.load(i) for i in range(a, min(len(self), a + batch_size))])


def prompts_for(classnames: Sequence[str], templates: Sequence[str] | None = None) -> list[list[str]]:
    """Each class name in every template (default: the 80 OpenAI ImageNet templates, as the paper)."""
    templates = list(templates) if templates else openai_imagenet_templates()
    return [[t.format(c) for t in templates] for c in classnames]


def _parse_world(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    try:
        n = int(parts[1]) if len(parts) > 1 and parts[1] else 200
        seed = int(parts[2]) if len(parts) > 2 else 1234
    except ValueError:
        raise ValueError(f"bad world source {spec!r}: expected 'world[:N[:SEED]]'") from None
    return n, seed


def load_classification(source: str, backbone, templates: Sequence[str] | None = None,
                        limit_per_class: int | None = None) -> LabelledImages:
    """'world[:N[:SEED]]' (clean shapes of the built-in world) or an image-class folder."""
    if source.startswith("world"):
        from xclip.datamodules.synthetic_world import COLOURS, SHAPES, class_prompts, render_object, to_tensor

        n, seed = _parse_world(source)
        size = backbone.image_size

        def load_world(i: int) -> torch.Tensor:                     # clean object i (classes round-robin)
            rng = random.Random(seed * 1_000_003 + i)
            return to_tensor(render_object(SHAPES[i % len(SHAPES)], rng.choice(tuple(COLOURS)), rng, size)[0])
        prompts = [class_prompts(s) for s in SHAPES] if templates is None else prompts_for(SHAPES, templates)
        return LabelledImages(load=load_world, labels=torch.arange(n) % len(SHAPES), classnames=list(SHAPES),
                              class_prompts=prompts)
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {source!r} not found; expected 'world[:N[:SEED]]' or "
                                f"{CLASS_FOLDER_LAYOUT}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and list_images(d))
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least 2 class folders with images; expected {CLASS_FOLDER_LAYOUT}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = list_images(root / name)[:limit_per_class]
        paths += files
        labels += [c] * len(files)
    names = [c.replace("_", " ") for c in classes]
    pre = backbone.preprocess
    return LabelledImages(load=lambda i: pre(Image.open(paths[i]).convert("RGB")), labels=torch.tensor(labels),
                          classnames=names, class_prompts=prompts_for(names, templates))


@torch.no_grad()
def build_classifier(backbone, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """[D, C] (the store's layout): per class, mean of the L2-normalised prompt embeddings, renormalised (spec A3.4;
    models/zero_shot.py)."""
    return prompt_classifier(backbone, class_prompts).float().cpu().t().contiguous()


# ---- segmentation ------------------------------------------------------------------------------------------
@dataclass
class SegmentationImages:
    load: Callable[[int], tuple[torch.Tensor, torch.Tensor]]   # i -> (image [3, H, W], mask [H, W] bool)
    size: int

    def __len__(self) -> int:
        return self.size


def world_object_with_mask(shape: str, colour: str, rng: random.Random, image_size: int
                           ) -> tuple[Image.Image, torch.Tensor]:
    """A world object and its pixel mask: the object is the set of pixels that differ from the background
    render_object starts from (rendered again from the same rng state)."""
    from xclip.datamodules.synthetic_world import render_background, render_object

    background = np.asarray(render_background(_clone(rng), image_size), np.int16)
    image, _ = render_object(shape, colour, rng, image_size)
    mask = torch.from_numpy((np.abs(np.asarray(image, np.int16) - background).sum(-1) > 0))
    return image, mask


def _clone(rng: random.Random) -> random.Random:
    r = random.Random()
    r.setstate(rng.getstate())
    return r


def load_segmentation(source: str, backbone) -> SegmentationImages:
    """'world[:N[:SEED]]' (world objects with exact masks) or a folder (SEG_FOLDER_LAYOUT)."""
    size = backbone.image_size
    if source.startswith("world"):
        from xclip.datamodules.synthetic_world import COLOURS, SHAPES, to_tensor

        n, seed = _parse_world(source)

        def load_world(i: int):
            rng = random.Random(seed * 1_000_003 + i)
            img, mask = world_object_with_mask(SHAPES[i % len(SHAPES)], rng.choice(tuple(COLOURS)), rng, size)
            return to_tensor(img), mask
        return SegmentationImages(load=load_world, size=n)
    root = Path(source)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise FileNotFoundError(f"segmentation folder {source!r} not found or incomplete; expected "
                                f"{SEG_FOLDER_LAYOUT}, or 'world[:N[:SEED]]'")
    images = list_images(root / "images")
    masks = {p.stem: p for p in list_images(root / "masks")}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise FileNotFoundError(f"{root / 'masks'} lacks masks for {missing[:5]} (expected {SEG_FOLDER_LAYOUT})")
    pre = backbone.preprocess

    def load_folder(i: int):
        img = Image.open(images[i]).convert("RGB")
        # as the anchor: eval transform for the image, nearest-neighbour resize of the mask to the input size
        mask = Image.open(masks[images[i].stem]).convert("L").resize((size, size), Image.NEAREST)
        return pre(img), torch.from_numpy(np.asarray(mask) > 0)
    return SegmentationImages(load=load_folder, size=len(images))
