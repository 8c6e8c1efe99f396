"""Small generated image-classification folders for the CoOp / few-shot tests (not a test module)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def colour_image(colour: tuple[int, int, int], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A filled ellipse/rectangle of ``colour`` at a random place on a noisy grey background."""
    bg = rng.integers(90, 150, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    w = int(rng.integers(size // 2, size - 2))
    x0, y0 = (int(v) for v in rng.integers(0, size - w + 1, size=2))
    jitter = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w - 1, y0 + w - 1], fill=jitter)
    return img


def make_colour_folder(root: Path, n_train: int = 6, n_test: int = 8, size: int = 32, seed: int = 0,
                       classes: dict | None = None, with_val: bool = False) -> Path:
    """ROOT/{train,test[,val]}/<colour>/<i>.png"""
    rng = np.random.default_rng(seed)
    classes = classes or COLOURS
    splits = {"train": n_train, "test": n_test, **({"val": 4} if with_val else {})}
    for split, n in splits.items():
        for name, rgb in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour_image(rgb, rng, size).save(folder / f"{i:03d}.png")
    return root


def make_world_folder(root: Path, shapes: list[str], n_train: int, n_test: int, seed: int = 0,
                      image_size: int = 64) -> Path:
    """Shapes of random colours rendered by datamodules.synthetic_world (classes = shapes)."""
    import random

    from xclip.datamodules.synthetic_world import COLOURS as WORLD_COLOURS
    from xclip.datamodules.synthetic_world import render_object

    rng = random.Random(seed)
    colours = list(WORLD_COLOURS)
    for split, n in (("train", n_train), ("test", n_test)):
        for shape in shapes:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = rng.choice(colours)
                img, _ = render_object(shape, colour, rng, image_size=image_size)
                img.save(folder / f"{i:03d}.png")
    return root
