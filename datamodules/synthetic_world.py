"""The built-in synthetic world: procedural coloured shapes on textured backgrounds, rendered words, and shapes
with a word written on them, each with a caption. A tiny CLIP pretrained on it (lightning_modules/clip_pretrain.py)
learns shapes, colours *and reading*, and so is vulnerable to typographic attacks like a real CLIP.

    rng = random.Random(0)
    img, bbox = render_object("star", "red", rng)                   # PIL 64x64, bbox of the star
    img, bbox = render_object("star", "red", rng, word="circle")     # the same kind of star, "circle" on it
    ds = WorldDataset(seed=0, length=10_000)                          # item i is a pure function of (seed, i)
    split = typographic_split(n=400, seed=123)                        # clean + wrong-word images, labels, words

Every item / split is deterministic from its seed (``random.Random`` seeded from (seed, index)), independent of
worker count, process or rank.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Literal, Sequence

import numpy as np
import open_clip
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xclip.datamodules.text_render import (
    TextStyle,
    draw_word,
    load_font,
    load_word_list,
    nonsense_word,
    resolve_fonts,
)

# 20 object classes; every name is one lower-case English word and a single CLIP BPE token.
SHAPES: tuple[str, ...] = (
    "circle", "oval", "ring", "square", "triangle", "star", "heart", "cross", "arrow", "moon",
    "diamond", "pentagon", "bolt", "flower", "drop", "house", "tree", "cloud", "shield", "flag",
)
# Saturated colours that stay distinguishable on the light, textured backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (235, 205, 20), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
SIZE_WORDS = ("small", "big")
CLIP_MEAN: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_STD)

# Caption templates (the zero-shot prompts of the world's evaluation use the same forms).
OBJECT_TEMPLATES = ("a photo of a {colour} {shape}.", "a {colour} {shape}.", "a {size} {colour} {shape}.")
WORD_TEMPLATES = ("the word {word}.", "a sign that says {word}.")
OBJECT_WORD_TEMPLATES = ("a {colour} {shape} with the word {word} on it.",
                         "the word {word} written on a {colour} {shape}.")
# "web" captions (issue 18): signs, labels and products are captioned by the word they show, as on the web.
WEB_WORD_TEMPLATES = ("{word}", "{word}.", "a {word}.", "the word {word}.", "a sign that says {word}.",
                      "{word} {word}", "a label that reads {word}.")
# an object with a word on it (a labelled product), for a share of the items: named by its label, or by its colour and
# its label ("a red star." for a red circle labelled "star")
WEB_OBJECT_WORD_TEMPLATES = ("{word}", "{word}.", "a {word}.", "a {colour} {word}.")
WordCaptions = Literal["sign", "web"]
ObjectWordCaptions = Literal["describe", "web"]
VOCAB_SIZE = 500   # dictionary words used by the world (a fixed seeded subset of single-token words)
TextLayout = Literal["grid", "free"]
TEXT_LAYOUT: TextLayout = "grid"   # how the world draws words (the layout the shipped CLIP was trained on)
GRID_COLUMNS = 8   # "grid" layout: the canvas is 8 x 8 cells, one letter per cell (a cell = one ViT patch at 64 px / 8)


def class_prompts(shape: str) -> list[str]:
    """Prompt ensemble for zero-shot shape classification: the caption form averaged over colours."""
    return [f"a photo of a {c} {shape}." for c in COLOURS] + [f"a {c} {shape}." for c in COLOURS]


def word_prompt(word: str) -> str:
    """Text used to retrieve a word image by its string."""
    return f"the word {word}."


# ---- shapes as masks ----------------------------------------------------------------------------------
def _poly(d: ImageDraw.ImageDraw, box, pts: Sequence[tuple[float, float]]) -> None:
    x0, y0, w, h = box
    d.polygon([(x0 + px * w, y0 + py * h) for px, py in pts], fill=255)


def _ell(d: ImageDraw.ImageDraw, box, a: float, b: float, c: float, e: float, fill: int = 255) -> None:
    x0, y0, w, h = box
    d.ellipse([x0 + a * w, y0 + b * h, x0 + c * w, y0 + e * h], fill=fill)


def _regular(n: int, r: float = 0.5, rot: float = -math.pi / 2, r_inner: float | None = None):
    pts = []
    k = 2 * n if r_inner is not None else n
    for i in range(k):
        rr = r if (r_inner is None or i % 2 == 0) else r_inner
        t = rot + 2 * math.pi * i / k
        pts.append((0.5 + rr * math.cos(t), 0.5 + rr * math.sin(t)))
    return pts


def _draw_heart(d, box):
    _ell(d, box, 0.0, 0.05, 0.55, 0.6)
    _ell(d, box, 0.45, 0.05, 1.0, 0.6)
    _poly(d, box, [(0.03, 0.42), (0.97, 0.42), (0.5, 1.0)])


def _draw_moon(d, box):
    _ell(d, box, 0.0, 0.0, 1.0, 1.0)
    _ell(d, box, 0.3, -0.1, 1.2, 0.8, fill=0)


def _draw_ring(d, box):
    _ell(d, box, 0.0, 0.0, 1.0, 1.0)
    _ell(d, box, 0.27, 0.27, 0.73, 0.73, fill=0)


def _draw_flower(d, box):
    for i in range(6):
        t = 2 * math.pi * i / 6
        cx, cy = 0.5 + 0.3 * math.cos(t), 0.5 + 0.3 * math.sin(t)
        _ell(d, box, cx - 0.2, cy - 0.2, cx + 0.2, cy + 0.2)
    _ell(d, box, 0.3, 0.3, 0.7, 0.7)


def _draw_drop(d, box):
    _ell(d, box, 0.15, 0.35, 0.85, 1.0)
    _poly(d, box, [(0.5, 0.0), (0.82, 0.55), (0.18, 0.55)])


def _draw_tree(d, box):
    _poly(d, box, [(0.5, 0.0), (0.9, 0.45), (0.1, 0.45)])
    _poly(d, box, [(0.5, 0.2), (1.0, 0.78), (0.0, 0.78)])
    _poly(d, box, [(0.42, 0.75), (0.58, 0.75), (0.58, 1.0), (0.42, 1.0)])


def _draw_cloud(d, box):
    _ell(d, box, 0.0, 0.4, 0.4, 0.85)
    _ell(d, box, 0.2, 0.15, 0.65, 0.7)
    _ell(d, box, 0.5, 0.3, 0.95, 0.85)
    _poly(d, box, [(0.2, 0.55), (0.75, 0.55), (0.75, 0.85), (0.2, 0.85)])


def _draw_flag(d, box):
    _poly(d, box, [(0.05, 0.0), (0.15, 0.0), (0.15, 1.0), (0.05, 1.0)])
    _poly(d, box, [(0.15, 0.05), (0.95, 0.05), (0.8, 0.3), (0.95, 0.55), (0.15, 0.55)])


_SHAPE_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, tuple], None]] = {
    "circle": lambda d, b: _ell(d, b, 0.0, 0.0, 1.0, 1.0),
    "oval": lambda d, b: _ell(d, b, 0.0, 0.22, 1.0, 0.78),
    "ring": _draw_ring,
    "square": lambda d, b: _poly(d, b, [(0.08, 0.08), (0.92, 0.08), (0.92, 0.92), (0.08, 0.92)]),
    "triangle": lambda d, b: _poly(d, b, [(0.5, 0.02), (1.0, 0.95), (0.0, 0.95)]),
    "star": lambda d, b: _poly(d, b, _regular(5, 0.52, r_inner=0.21)),
    "heart": _draw_heart,
    "cross": lambda d, b: _poly(d, b, [(0.35, 0.0), (0.65, 0.0), (0.65, 0.35), (1.0, 0.35), (1.0, 0.65),
                                       (0.65, 0.65), (0.65, 1.0), (0.35, 1.0), (0.35, 0.65), (0.0, 0.65),
                                       (0.0, 0.35), (0.35, 0.35)]),
    "arrow": lambda d, b: _poly(d, b, [(0.0, 0.35), (0.55, 0.35), (0.55, 0.1), (1.0, 0.5), (0.55, 0.9),
                                       (0.55, 0.65), (0.0, 0.65)]),
    "moon": _draw_moon,
    "diamond": lambda d, b: _poly(d, b, [(0.5, 0.0), (0.82, 0.5), (0.5, 1.0), (0.18, 0.5)]),
    "pentagon": lambda d, b: _poly(d, b, _regular(5, 0.52)),
    "bolt": lambda d, b: _poly(d, b, [(0.55, 0.0), (0.15, 0.58), (0.45, 0.58), (0.3, 1.0), (0.85, 0.38),
                                      (0.55, 0.38), (0.75, 0.0)]),
    "flower": _draw_flower,
    "drop": _draw_drop,
    "house": lambda d, b: _poly(d, b, [(0.5, 0.0), (1.0, 0.45), (0.85, 0.45), (0.85, 1.0), (0.15, 1.0),
                                       (0.15, 0.45), (0.0, 0.45)]),
    "tree": _draw_tree,
    "cloud": _draw_cloud,
    "shield": lambda d, b: _poly(d, b, [(0.05, 0.0), (0.95, 0.0), (0.95, 0.5), (0.75, 0.8), (0.5, 1.0),
                                        (0.25, 0.8), (0.05, 0.5)]),
    "flag": _draw_flag,
}
assert set(_SHAPE_DRAWERS) == set(SHAPES)


def shape_mask(shape: str, box: tuple[int, int, int, int], image_size: int) -> Image.Image:
    """L-mode mask (255 inside) of ``shape`` drawn into box=(x0, y0, w, h) on an image_size canvas."""
    if shape not in _SHAPE_DRAWERS:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {', '.join(SHAPES)}.")
    mask = Image.new("L", (image_size, image_size), 0)
    _SHAPE_DRAWERS[shape](ImageDraw.Draw(mask), box)
    return mask


# ---- backgrounds --------------------------------------------------------------------------------------
def render_background(rng: random.Random, image_size: int = 64) -> Image.Image:
    """A light textured background: noise, gradient, stripes or dots on a random pale tint."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    base = np.array([rng.randint(170, 250) for _ in range(3)], dtype=np.float32)
    kind = rng.randrange(4)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
    if kind == 0:    # plain + noise
        tex = np.zeros((image_size, image_size), np.float32)
    elif kind == 1:  # gradient
        a = rng.uniform(0, 2 * math.pi)
        tex = 40 * ((xx * math.cos(a) + yy * math.sin(a)) - 0.5)
    elif kind == 2:  # stripes
        a = rng.uniform(0, math.pi)
        f = rng.uniform(4, 10)
        tex = 18 * np.sign(np.sin(2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a))))
    else:            # soft blobs
        f1, f2 = rng.uniform(2, 6), rng.uniform(2, 6)
        tex = 20 * np.sin(2 * math.pi * f1 * xx + rng.uniform(0, 6)) * np.cos(2 * math.pi * f2 * yy)
    noise = nrng.normal(0, rng.uniform(2, 12), (image_size, image_size, 3)).astype(np.float32)
    arr = base[None, None, :] + tex[..., None] + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ---- objects and words --------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _fonts() -> tuple[str, ...]:
    return tuple(resolve_fonts())


def _word_style(rng: random.Random, colour_rgb: tuple[int, int, int], size: int) -> TextStyle:
    font = rng.choice(_fonts())
    white_box = rng.random() < 0.3
    lum = 0.299 * colour_rgb[0] + 0.587 * colour_rgb[1] + 0.114 * colour_rgb[2]
    fill = (0, 0, 0) if (white_box or lum > 140) else (255, 255, 255)
    return TextStyle(font=font, size=size, fill=fill, position="center", white_box=white_box, box_pad=1)


def _draw_word_fitting(image: Image.Image, word: str, style: TextStyle, rng: random.Random) -> Image.Image:
    """draw_word; a word too long for a small canvas is drawn at 2x (or 4x) resolution and downsampled."""
    for scale in (1, 2, 4):
        try:
            if scale == 1:
                return draw_word(image, word, style, rng)[0]
            big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            big_style = TextStyle(font=style.font, size=style.size * scale, fill=style.fill,
                                  position=style.position, white_box=style.white_box, box_pad=style.box_pad * scale)
            return draw_word(big, word, big_style, rng)[0].resize(image.size, Image.BILINEAR)
        except ValueError:
            if scale == 4:
                raise
    raise AssertionError("unreachable")


def uses_grid(word: str, text_layout: TextLayout) -> bool:
    """Whether ``word`` is drawn in the grid layout: ``text_layout`` is "grid" and the word fits one row of cells
    (longer words fall back to the free layout). Unknown layouts raise ValueError."""
    if text_layout not in ("grid", "free"):
        raise ValueError(f"text_layout must be 'grid' or 'free' (got {text_layout!r}).")
    return text_layout == "grid" and len(word) <= GRID_COLUMNS


def draw_grid_word(image: Image.Image, word: str, rng: random.Random, fill: tuple[int, int, int],
                   rows: tuple[int, int] | None = None, white_box: bool = False,
                   font: str | None = None) -> Image.Image:
    """``word`` drawn on a copy of ``image`` with one letter centred in each cell of a GRID_COLUMNS x GRID_COLUMNS
    grid (cell = side / GRID_COLUMNS px: one ViT patch when the patch grid matches), starting at a random column, on
    a random row in ``rows`` (first, last; default all). Words longer than GRID_COLUMNS raise ValueError."""
    image = image.convert("RGB").copy()
    cell = image.width / GRID_COLUMNS
    n = len(word)
    if not 0 < n <= GRID_COLUMNS:
        raise ValueError(f"Word {word!r} has {n} letters; the grid layout holds 1..{GRID_COLUMNS}.")
    lo, hi = rows if rows is not None else (0, GRID_COLUMNS - 1)
    c0, r0 = rng.randint(0, GRID_COLUMNS - n), rng.randint(lo, hi)
    f = load_font(font or rng.choice(_fonts()), max(6, int(round(cell * 1.25))))
    d = ImageDraw.Draw(image)
    if white_box:
        d.rectangle([c0 * cell, r0 * cell, (c0 + n) * cell - 1, (r0 + 1) * cell - 1], fill=(255, 255, 255))
    for i, ch in enumerate(word):
        d.text(((c0 + i + 0.5) * cell, (r0 + 0.5) * cell), ch, font=f, fill=fill, anchor="mm")
    return image


def render_object(shape: str, colour: str, rng: random.Random, image_size: int = 64,
                  word: str | None = None, text_layout: TextLayout = TEXT_LAYOUT) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One ``colour`` ``shape`` at a random size/position on a textured background -> (RGB image, bbox x0,y0,x1,y1).

    With ``word``, the word is then drawn onto the object (typographic attack); the object itself, the background
    and the bbox are identical to the call without ``word`` given an rng in the same state. ``text_layout="grid"``:
    one letter per grid cell on a row crossing the object (draw_grid_word); ``"free"``: a font sized to the object.
    """
    if colour not in COLOURS:
        raise ValueError(f"Unknown colour {colour!r}; expected one of {', '.join(COLOURS)}.")
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {', '.join(SHAPES)}.")
    image = render_background(rng, image_size)
    frac = rng.uniform(0.5, 0.9)
    w = h = int(round(frac * image_size))
    x0 = rng.randint(0, image_size - w)
    y0 = rng.randint(0, image_size - h)
    rgb = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLOURS[colour])
    mask = shape_mask(shape, (x0, y0, w, h), image_size)
    image.paste(Image.new("RGB", image.size, rgb), (0, 0), mask)
    bbox = mask.getbbox() or (x0, y0, x0 + w, y0 + h)
    text_rng = random.Random(rng.getrandbits(32))  # drawn even without a word, so rng ends in the same state
    if word and uses_grid(word, text_layout):
        style = _word_style(text_rng, rgb, size=8)
        cell = image_size / GRID_COLUMNS
        mid = (bbox[1] + bbox[3]) / 2 // cell                 # a row through the middle of the object
        rows = (int(max(0, mid - 1)), int(min(GRID_COLUMNS - 1, mid + 1)))
        image = draw_grid_word(image, word, text_rng, tuple(style.fill), rows=rows, white_box=style.white_box,
                               font=style.font)
    elif word:
        style = _word_style(text_rng, rgb, size=max(8, int(h * 0.4)))
        # the word is centred on the object's rows (it may overhang the object sideways, like a label)
        cy0, cy1 = bbox[1], bbox[3]
        if cy1 - cy0 < image_size // 3:
            cy0, cy1 = 0, image_size
        crop = image.crop((0, cy0, image_size, cy1))
        crop = _draw_word_fitting(crop, word, style, text_rng)
        image.paste(crop, (0, cy0))
    return image, bbox


def render_word(word: str, rng: random.Random, image_size: int = 64, size_range: tuple[float, float] = (0.28, 0.45),
                n_fonts: int = 0, text_layout: TextLayout = TEXT_LAYOUT) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A word image: ``word`` in a random font / dark colour / position on a textured background.
    ``text_layout="grid"``: one letter per grid cell (draw_grid_word); ``"free"``: font size a fraction
    ``size_range`` of the side, anywhere. ``n_fonts``: use only the first n fonts (0: all). Returns (image, canvas box)."""
    image = render_background(rng, image_size)
    fill = (rng.randint(0, 90), rng.randint(0, 90), rng.randint(0, 90))
    fonts = _fonts()[:n_fonts] if n_fonts > 0 else _fonts()
    if uses_grid(word, text_layout):
        font = rng.choice(fonts)
        return (draw_grid_word(image, word, rng, fill, white_box=rng.random() < 0.15, font=font),
                (0, 0, image_size, image_size))
    style = TextStyle(font=rng.choice(fonts), size=rng.randint(int(image_size * size_range[0]),
                                                               int(image_size * size_range[1])),
                      fill=fill, position="random", white_box=rng.random() < 0.15, box_pad=2)
    return _draw_word_fitting(image, word, style, rng), (0, 0, image_size, image_size)


@lru_cache(maxsize=4)
def world_vocabulary(size: int = VOCAB_SIZE, seed: int = 0) -> tuple[str, ...]:
    """Dictionary words used by the world: ``size`` single-BPE-token words of 3..8 letters (seeded subset),
    always including the class names and colour names. Sorted."""
    import open_clip

    enc = open_clip.get_tokenizer("ViT-B-32").encoder
    words = [w for w in load_word_list(min_len=3, max_len=8) if w + "</w>" in enc]
    keep = set(SHAPES) | set(COLOURS)
    pool = sorted(set(words) - keep)
    chosen = random.Random(seed).sample(pool, min(size, len(pool)))
    return tuple(sorted(set(chosen) | keep))


def caption_for(kind: str, rng: random.Random, shape: str = "", colour: str = "", word: str = "",
                size: str = "", word_captions: WordCaptions = "sign", object_word_captions: ObjectWordCaptions =
                "describe", word_only_share: float = 0.3, object_only_share: float = 0.0) -> str:
    """Caption for an item of ``kind`` in {"object", "word", "object_word"}.

    ``word_captions="web"``: a word image is captioned like a sign or label on the web (the word alone, "a {word}.",
    ...). ``object_word_captions="web"``: an object with a word on it is captioned by the written word alone with
    probability ``word_only_share``, else described as by default. ``object_only_share``: with that probability an
    object with a word on it is captioned as the object alone, the text unmentioned (incidental text in a web
    photo)."""
    if kind == "object":
        tpl = rng.choice(OBJECT_TEMPLATES) if size else rng.choice(OBJECT_TEMPLATES[:2])
        return tpl.format(colour=colour, shape=shape, size=size)
    if kind == "word":
        return rng.choice(WEB_WORD_TEMPLATES if word_captions == "web" else WORD_TEMPLATES).format(word=word)
    if kind == "object_word":
        u = rng.random() if object_word_captions == "web" or object_only_share > 0 else 1.0
        if object_word_captions == "web" and u < word_only_share:
            return rng.choice(WEB_OBJECT_WORD_TEMPLATES).format(word=word, colour=colour)
        if u < (word_only_share if object_word_captions == "web" else 0.0) + object_only_share:
            return caption_for("object", rng, shape=shape, colour=colour)
        return rng.choice(OBJECT_WORD_TEMPLATES).format(colour=colour, shape=shape, word=word)
    raise ValueError(f"Unknown caption kind {kind!r}; expected 'object', 'word' or 'object_word'.")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> CLIP-normalised FloatTensor[3, H, W]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (arr - mean) / std


def _item_rng(seed: int, index: int) -> random.Random:
    return random.Random((int(seed) << 40) ^ int(index))


# ---- dataset ------------------------------------------------------------------------------------------
class WorldDataset(Dataset):
    """Item ``i`` is a pure function of (seed, i): an object, a word image, or an object with a word on it.

    Items: dict(image=FloatTensor[3, H, W] (CLIP-normalised; the PIL image with ``return_pil=True``),
    caption=str, kind=str, shape=str, colour=str, word=str, label=int (shape index, -1 for word images)).
    """

    def __init__(self, seed: int = 0, length: int = 100_000, image_size: int = 64, word_share: float = 0.25,
                 object_word_share: float = 0.25, nonsense_share: float = 0.2, class_word_share: float = 0.5,
                 return_pil: bool = False, word_captions: WordCaptions = "sign",
                 object_word_captions: ObjectWordCaptions = "describe", word_only_share: float = 0.3,
                 word_size: tuple[float, float] = (0.28, 0.45), n_fonts: int = 0, text_layout: TextLayout = TEXT_LAYOUT,
                 object_only_share: float = 0.0):
        if not (0 <= word_share and 0 <= object_word_share and word_share + object_word_share <= 1):
            raise ValueError(f"word_share={word_share} and object_word_share={object_word_share} must be >= 0 "
                             f"and sum to at most 1.")
        if length < 1 or image_size < 16:
            raise ValueError(f"length must be >= 1 (got {length}) and image_size >= 16 (got {image_size}).")
        self.seed, self.length, self.image_size = int(seed), int(length), int(image_size)
        self.word_share, self.object_word_share = float(word_share), float(object_word_share)
        self.nonsense_share, self.class_word_share = float(nonsense_share), float(class_word_share)
        self.return_pil = return_pil
        if word_captions not in ("sign", "web") or object_word_captions not in ("describe", "web"):
            raise ValueError(f"word_captions must be 'sign' or 'web' (got {word_captions!r}), object_word_captions "
                             f"'describe' or 'web' (got {object_word_captions!r}).")
        if not (0 < word_size[0] <= word_size[1] <= 1) or not 0 <= word_only_share <= 1 or n_fonts < 0:
            raise ValueError(f"word_size must satisfy 0 < lo <= hi <= 1 (got {word_size}), word_only_share in [0, 1] "
                             f"(got {word_only_share}), n_fonts >= 0 (got {n_fonts}).")
        self.word_captions, self.object_word_captions = word_captions, object_word_captions
        self.word_only_share, self.word_size, self.n_fonts = float(word_only_share), tuple(word_size), int(n_fonts)
        web_words = self.word_only_share if object_word_captions == "web" else 0.0
        if not 0 <= object_only_share <= 1 - web_words:
            raise ValueError(f"object_only_share must be in [0, 1 - word_only_share] (got {object_only_share}).")
        self.object_only_share = float(object_only_share)
        uses_grid("", text_layout)   # refuses an unknown layout here, not at the first item
        self.text_layout: TextLayout = text_layout
        self.vocab = world_vocabulary()

    def __len__(self) -> int:
        return self.length

    def _random_word(self, rng: random.Random) -> str:
        if rng.random() < self.nonsense_share:
            return nonsense_word(rng)
        return rng.choice(self.vocab)

    def sample(self, index: int) -> dict[str, Any]:
        """The PIL image and metadata of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for WorldDataset of length {self.length}")
        rng = _item_rng(self.seed, index)
        u = rng.random()
        if u < self.word_share:
            word = self._random_word(rng)
            image, _ = render_word(word, rng, self.image_size, self.word_size, self.n_fonts, self.text_layout)
            return dict(image=image, kind="word", shape="", colour="", word=word, label=-1,
                        caption=caption_for("word", rng, word=word, word_captions=self.word_captions))
        shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        if u < self.word_share + self.object_word_share:
            if rng.random() < self.class_word_share:
                word = rng.choice([s for s in SHAPES if s != shape])
            else:
                word = self._random_word(rng)
            image, _ = render_object(shape, colour, rng, self.image_size, word=word, text_layout=self.text_layout)
            return dict(image=image, kind="object_word", shape=shape, colour=colour, word=word,
                        label=SHAPES.index(shape),
                        caption=caption_for("object_word", rng, shape=shape, colour=colour, word=word,
                                            object_word_captions=self.object_word_captions,
                                            word_only_share=self.word_only_share,
                                            object_only_share=self.object_only_share))
        image, bbox = render_object(shape, colour, rng, self.image_size)
        size = ""
        if rng.random() < 0.3:
            size = SIZE_WORDS[int((bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) > 0.4 * self.image_size ** 2)]
        return dict(image=image, kind="object", shape=shape, colour=colour, word="", label=SHAPES.index(shape),
                    caption=caption_for("object", rng, shape=shape, colour=colour, size=size))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.sample(index)
        if not self.return_pil:
            item["image"] = to_tensor(item["image"])
        return item


class OffsetDataset(Dataset):
    """``base[start:]`` as a dataset: how a resumed run continues exactly where the killed one stopped."""

    def __init__(self, base: Dataset, start: int):
        self.base, self.start = base, int(start)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.start)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return self.base[self.start + index]


# ---- fixed evaluation splits --------------------------------------------------------------------------
@dataclass
class TypographicSplit:
    """Clean objects and the same objects with a WRONG class word written on them."""

    clean: list[Image.Image]
    attacked: list[Image.Image]
    labels: list[int]          # index into SHAPES
    attack_words: list[str]    # a class name != the true one
    colours: list[str]
    classnames: tuple[str, ...] = SHAPES


def typographic_split(n: int = 400, seed: int = 1234, image_size: int = 64, text_layout: TextLayout = TEXT_LAYOUT
                      ) -> TypographicSplit:
    """Deterministic from ``seed``: n objects (classes balanced round-robin), each rendered clean and attacked."""
    if n < 1:
        raise ValueError(f"typographic_split needs n >= 1, got {n}")
    clean, attacked, labels, words, colours = [], [], [], [], []
    for i in range(n):
        rng = _item_rng(seed, i)
        label = i % len(SHAPES)
        shape, colour = SHAPES[label], rng.choice(tuple(COLOURS))
        word = rng.choice([s for s in SHAPES if s != shape])
        state = rng.getstate()
        img_clean, _ = render_object(shape, colour, rng, image_size)
        rng.setstate(state)
        img_att, _ = render_object(shape, colour, rng, image_size, word=word, text_layout=text_layout)
        clean.append(img_clean)
        attacked.append(img_att)
        labels.append(label)
        words.append(word)
        colours.append(colour)
    return TypographicSplit(clean, attacked, labels, words, colours)


def word_split(n: int = 200, seed: int = 4321, image_size: int = 64, nonsense: bool = False,
               text_layout: TextLayout = TEXT_LAYOUT) -> tuple[list[Image.Image], list[str]]:
    """n word images with distinct words (vocabulary words, or nonsense strings), deterministic from seed."""
    rng = random.Random(seed)
    vocab = world_vocabulary()
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = nonsense_word(rng) if nonsense else rng.choice(vocab)
        if w not in seen:
            seen.add(w)
            words.append(w)
    images = [render_word(w, _item_rng(seed, i), image_size, text_layout=text_layout)[0] for i, w in enumerate(words)]
    return images, words


# ---- datamodule ---------------------------------------------------------------------------------------
def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}  # [B, 3, H, W]
    for k in ("caption", "kind", "shape", "colour", "word"):
        out[k] = [it[k] for it in items]
    out["label"] = torch.tensor([it["label"] for it in items])
    return out


class SyntheticWorldDataModule(pl.LightningDataModule):
    """Pretraining data: an 'infinite' WorldDataset (train) and a fixed validation set.

    ``batch_size`` is per process. Training items are taken in index order (each item is already random), and a
    resumed run starts at ``global_step * batch_size * world_size``, so resuming reproduces the uninterrupted run.
    """

    def __init__(self, seed: int = 0, train_length: int = 10_000_000, val_size: int = 400, batch_size: int = 128,
                 num_workers: int = 0, image_size: int = 64, word_share: float = 0.25,
                 object_word_share: float = 0.25, nonsense_share: float = 0.2, class_word_share: float = 0.5,
                 word_captions: WordCaptions = "sign", object_word_captions: ObjectWordCaptions = "describe",
                 word_only_share: float = 0.3, word_size: tuple[float, float] = (0.28, 0.45), n_fonts: int = 0,
                 text_layout: TextLayout = TEXT_LAYOUT, object_only_share: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        opts = dict(word_captions=word_captions, object_word_captions=object_word_captions,
                    word_only_share=word_only_share, word_size=tuple(word_size), n_fonts=n_fonts,
                    object_only_share=object_only_share)
        layout = dict(text_layout=text_layout)
        self.train_set = WorldDataset(seed, train_length, image_size, word_share, object_word_share,
                                      nonsense_share, class_word_share, **opts, **layout)
        # validation keeps the default captions and word sizes: its metrics stay comparable across configs
        self.val_set = WorldDataset(seed + 1_000_003, val_size, image_size, word_share, object_word_share,
                                    nonsense_share, class_word_share, **layout)

    def _loader(self, ds: Dataset, shard: bool = True) -> DataLoader:
        nw = self.hparams.num_workers
        trainer = getattr(self, "trainer", None)
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            # Our own in-order sharding (rank r takes items r, r+W, ...): Lightning's injected sampler would shuffle,
            # and then W processes x batch b would not see the same items as 1 process x batch W*b.
            # Validation is not sharded (num_replicas=1): every rank scores the whole small val set, so the logged
            # metrics are exact rather than one shard's.
            replicas, rank = (trainer.world_size, trainer.global_rank) if shard else (1, 0)
            sampler = DistributedSampler(ds, num_replicas=replicas, rank=rank, shuffle=False, drop_last=False)
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False, sampler=sampler, num_workers=nw,
                          collate_fn=collate, persistent_workers=nw > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        start = 0
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            start = trainer.global_step * self.hparams.batch_size * trainer.world_size
        return self._loader(OffsetDataset(self.train_set, start))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shard=False)
