"""Rendering words onto images: the one primitive behind the synthetic world, the quintuples x_t / x_it of
Materzynska et al., typographic attacks and the OCR tests.

Defaults follow the disentangling paper's released script (ref. disentangle.md 2.3-2.4): black fill, centred,
lower-case nonsense strings of length 3-5; the paper figure's white box behind the word is ``white_box=True``.
Verdana Bold is not free: DejaVu Sans Bold / Liberation Sans Bold stand in for it.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts", "/usr/local/share/fonts")
DEFAULT_FONTS = (
    "DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf",
    "LiberationSans-Bold.ttf", "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf",
)
DEFAULT_WORD_LIST = "/usr/share/dict/words"


@lru_cache(maxsize=None)
def _font_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for d in FONT_DIRS:
        p = Path(d)
        if p.is_dir():
            for f in sorted(p.rglob("*.ttf")):
                index.setdefault(f.name, str(f))
    return index


def resolve_fonts(fonts: Sequence[str] | None = None) -> list[str]:
    """Font names or paths -> existing .ttf paths. Explicit fonts that do not exist raise FileNotFoundError."""
    index = _font_index()
    if fonts is None:
        found = [index[n] for n in DEFAULT_FONTS if n in index]
        if not found:
            raise FileNotFoundError(
                f"No TrueType fonts found in {FONT_DIRS}; install them with `apt-get install fonts-dejavu-core "
                f"fonts-liberation` or pass font paths explicitly.")
        return found
    out = []
    for f in fonts:
        if Path(f).is_file():
            out.append(str(f))
        elif f in index:
            out.append(index[f])
        else:
            raise FileNotFoundError(f"Font {f!r} not found (neither a file nor a .ttf name under {FONT_DIRS}).")
    return out


@lru_cache(maxsize=256)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def load_word_list(path: str | Path = DEFAULT_WORD_LIST, min_len: int = 3, max_len: int = 8) -> list[str]:
    """Lower-case alphabetic dictionary words of min_len..max_len letters, sorted and de-duplicated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Word list {path} not found; install it with `apt-get install wamerican` "
                                f"or pass another file (one word per line).")
    words = sorted({w.strip().lower() for w in path.read_text(errors="ignore").splitlines()
                    if w.strip().isalpha() and w.strip().isascii() and min_len <= len(w.strip()) <= max_len})
    if not words:
        raise ValueError(f"Word list {path} holds no alphabetic words of length {min_len}..{max_len}.")
    return words


def nonsense_word(rng: random.Random, min_len: int = 3, max_len: int = 5) -> str:
    """Uniform length in [min_len, max_len], letters uniform with replacement (the released script: 3..5)."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))


@dataclass
class TextStyle:
    """How a word is drawn. ``size`` is the font size in px at the canvas size given to ``draw_word``."""

    font: str | None = None           # path; None -> first default font
    size: int = 40
    fill: tuple[int, int, int] = (0, 0, 0)
    position: str | tuple[int, int] = "center"   # "center", "random", or a top-left (x, y)
    white_box: bool = False           # the paper figure's sticker look
    box_pad: int = 4


def fit_font(text: str, font_path: str, size: int, max_w: int, max_h: int) -> ImageFont.FreeTypeFont:
    """The font at ``size``, shrunk until the text fits max_w x max_h (a word that never fits raises)."""
    while size >= 6:
        font = load_font(font_path, size)
        l, t, r, b = font.getbbox(text)
        if r - l <= max_w and b - t <= max_h:
            return font
        size = int(size * 0.85)
    raise ValueError(f"Word {text!r} does not fit a {max_w}x{max_h} canvas even at font size 6.")


def draw_word(image: Image.Image | None, word: str, style: TextStyle | None = None,
              rng: random.Random | None = None, canvas_size: int | tuple[int, int] = 224,
              canvas_colour: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draw ``word`` on a copy of ``image`` (or on a blank canvas when None). Returns (image, text bbox x0,y0,x1,y1).

    Words too long for the canvas are drawn with a smaller font (shrunk by 15 % steps, never below 6 px).
    """
    style = style or TextStyle()
    rng = rng or random.Random(0)
    if image is None:
        size = (canvas_size, canvas_size) if isinstance(canvas_size, int) else canvas_size
        image = Image.new("RGB", size, canvas_colour)
    else:
        image = image.convert("RGB").copy()
    W, H = image.size
    font_path = style.font or resolve_fonts()[0]
    pad = style.box_pad if style.white_box else 0
    font = fit_font(word, font_path, style.size, W - 2 * pad - 2, H - 2 * pad - 2)
    l, t, r, b = font.getbbox(word)
    tw, th = r - l, b - t
    if style.position == "center":
        x, y = (W - tw) // 2, (H - th) // 2
    elif style.position == "random":
        x = rng.randint(pad, max(pad, W - tw - pad))
        y = rng.randint(pad, max(pad, H - th - pad))
    else:
        x, y = style.position  # type: ignore[misc]
    draw = ImageDraw.Draw(image)
    if style.white_box:
        draw.rectangle([x - pad, y - pad, x + tw + pad, y + th + pad], fill=(255, 255, 255))
    draw.text((x - l, y - t), word, font=font, fill=tuple(style.fill))
    return image, (x, y, x + tw, y + th)
