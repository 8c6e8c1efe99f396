"""Synthetic quintuples (x_i, y_i, x_t, y_t, x_it) of Materzynska et al. (disentangle.md section 2).

* x_i: a natural image (ImageNet / any labelled image source / the built-in synthetic world), resized on the
  short side and centre-cropped to ``canvas_size`` before any text is drawn, so x_i and x_it are pixel-aligned.
* y_i: its class prompt, "an image of a/an {class}" (underscores -> spaces; 2.5).
* x_t: the word alone on a white canvas; x_it: the same word, same font/size/position, on x_i.
* y_t: the bare word string (no template); ``real``: 1 = dictionary word, 0 = nonsense string.

Words: real English words (``text_render.load_word_list``) and nonsense strings (``text_render.nonsense_word``,
length 3-5 by default), mixed with ``real_fraction`` (0.5; the paper's ratio is unknown). Words are assigned to
train / val / test by a stable hash of the string, so the three word sets are disjoint. Everything about sample
``idx`` (image, word, style draws) is a function of (seed, split, idx) only.

Image sources: ``make_image_source("synthetic-world")``, a local image folder (``root/<class>/<image>``, with an
optional class-index JSON), or ``"hf:NAME"`` for a Hugging Face ``datasets`` dataset (e.g. ``hf:ILSVRC/imagenet-1k``).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image
from torch.utils.data import Dataset

from xclip.datamodules.text_render import (
    DEFAULT_WORD_LIST,
    TextStyle,
    draw_word,
    load_word_list,
    nonsense_word,
    resolve_fonts,
)
from xclip.utils.images import list_images
from xclip.utils.io import read_json

SPLITS = ("train", "val", "test")


def class_prompt(name: str) -> str:
    """'great_white_shark' -> 'an image of a great white shark' (article by first letter, as the code does)."""
    name = name.replace("_", " ").strip()
    return f"an image of {'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic), then centre-crop size x size (2.2)."""
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# ---- image sources --------------------------------------------------------------------------------------
class ImageSource(Protocol):
    classnames: list[str]

    def __len__(self) -> int: ...

    def load(self, idx: int, rng: random.Random, size: int) -> tuple[Image.Image, int]:
        """Image ``idx`` as a size x size RGB PIL image, and its class id."""

    def spec(self) -> dict[str, Any]: ...


class ImageFolderSource:
    """``root/<class folder>/<image>``. Class names are folder names, or looked up in ``class_index`` (a JSON of
    Keras form {"0": ["n01440764", "tench"], ...} or {"n01440764": "tench"}) when given."""

    def __init__(self, root: str | Path, class_index: str | Path | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist.")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        self.files: list[tuple[Path, int]] = []
        for ci, folder in enumerate(folders):
            self.files += [(f, ci) for f in list_images(folder)]
        if not self.files:
            raise ValueError(f"Image folder {self.root} holds no images under class sub-folders "
                             f"(expected {self.root}/<class>/<image>.png|.jpg|...).")
        names = [p.name for p in folders]
        if class_index is not None:
            mapping = _read_class_index(Path(class_index))
            unknown = [n for n in names if n not in mapping]
            if unknown:
                raise KeyError(f"Class index {class_index} has no entry for folder(s) {unknown[:5]}.")
            names = [mapping[n] for n in names]
        self.classnames = names

    def __len__(self) -> int:
        return len(self.files)

    def load(self, idx: int, rng: random.Random, size: int) -> tuple[Image.Image, int]:
        path, ci = self.files[idx]
        with Image.open(path) as im:
            return resize_center_crop(im, size), ci

    def spec(self) -> dict[str, Any]:
        return {"kind": "folder", "root": str(self.root.resolve()), "n": len(self.files),
                "classes": len(self.classnames)}


def _read_class_index(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"Class index file {path} not found.")
    data = read_json(path, "Class index file")
    out = {}
    for k, v in data.items():
        if isinstance(v, (list, tuple)) and len(v) == 2:   # Keras: {"0": [wnid, name]}
            out[str(v[0])] = str(v[1])
        else:                                            # {wnid: name}
            out[str(k)] = str(v)
    return out


class HFImageSource:
    """A Hugging Face ``datasets`` split with an image column and a ClassLabel column (offline: from the cache)."""

    def __init__(self, name: str, split: str = "train", image_key: str = "image", label_key: str = "label"):
        import datasets

        try:
            self.ds = datasets.load_dataset(name, split=split)
        except Exception as e:
            raise RuntimeError(f"Could not load HF dataset {name!r} split {split!r} (offline runs need it in the "
                               f"HF cache): {type(e).__name__}: {e}") from e
        for key in (image_key, label_key):
            if key not in self.ds.column_names:
                raise KeyError(f"HF dataset {name!r} has no column {key!r}; columns: {self.ds.column_names}")
        names = getattr(self.ds.features[label_key], "names", None)
        if not names:
            raise ValueError(f"HF dataset {name!r} column {label_key!r} is not a ClassLabel with names.")
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.classnames = [n.split(",")[0].strip() for n in names]   # imagenet-1k: "tench, Tinca tinca"

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, idx: int, rng: random.Random, size: int) -> tuple[Image.Image, int]:
        row = self.ds[int(idx)]
        return resize_center_crop(row[self.image_key], size), int(row[self.label_key])

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, "split": self.split, "n": len(self.ds)}


class SyntheticWorldSource:
    """Objects of the built-in world (``datamodules.synthetic_world``); class = shape. Unlimited images.

    ``load_pair`` renders the same object clean and with a word drawn by the world's own text style (the style
    the tiny CLIP was pretrained on); y_i is the world's prompt ensemble (``class_prompts``), because the tiny
    CLIP only understands its caption forms ("a photo of a red star.").
    """

    def __init__(self, shapes: Sequence[str] | None = None, colours: Sequence[str] | None = None):
        from xclip.datamodules import synthetic_world as sw

        self._sw = sw
        self.classnames = list(shapes or sw.SHAPES)
        self.colours = list(colours or sw.COLOURS)
        bad = [s for s in self.classnames if s not in sw.SHAPES] + [c for c in self.colours if c not in sw.COLOURS]
        if bad:
            raise ValueError(f"Unknown world shapes/colours {bad}; the world has {list(sw.SHAPES)} and "
                             f"{list(sw.COLOURS)}.")

    def __len__(self) -> int:
        return 2 ** 31 - 1

    def _draw(self, rng: random.Random) -> tuple[str, str, int]:
        ci = rng.randrange(len(self.classnames))
        return self.classnames[ci], rng.choice(self.colours), ci

    def load(self, idx: int, rng: random.Random, size: int) -> tuple[Image.Image, int]:
        shape, colour, ci = self._draw(rng)
        img, _ = self._sw.render_object(shape, colour, rng, image_size=size)
        return img.convert("RGB"), ci

    def load_pair(self, idx: int, rng: random.Random, size: int, word: str
                  ) -> tuple[Image.Image, Image.Image, int]:
        """(clean object, the same object with ``word`` on it, class id)."""
        shape, colour, ci = self._draw(rng)
        state = rng.getstate()
        clean, _ = self._sw.render_object(shape, colour, rng, image_size=size)
        rng.setstate(state)
        with_word, _ = self._sw.render_object(shape, colour, rng, image_size=size, word=word)
        return clean.convert("RGB"), with_word.convert("RGB"), ci

    def render_text(self, word: str, rng: random.Random, size: int) -> Image.Image:
        """x_t in the world's own text layout: ``word`` alone on a white ``size`` canvas, drawn as the world draws
        words (``synthetic_world.TEXT_LAYOUT``), so x_t and x_it show the same kind of lettering."""
        sw = self._sw
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        if sw.uses_grid(word, sw.TEXT_LAYOUT):
            return sw.draw_grid_word(canvas, word, rng, fill=(0, 0, 0))
        return draw_word(canvas, word, TextStyle(font=rng.choice(resolve_fonts()), size=max(6, size * 5 // 16)),
                         rng)[0]

    def class_prompts(self, name: str) -> list[str]:
        return list(self._sw.class_prompts(name))

    def spec(self) -> dict[str, Any]:
        return {"kind": "synthetic-world", "shapes": self.classnames, "colours": self.colours,
                "text_layout": self._sw.TEXT_LAYOUT}


def make_image_source(source: str, split: str = "train", class_index: str | None = None) -> ImageSource:
    """"synthetic-world" | "hf:NAME" (split = HF split) | a folder path."""
    if source == "synthetic-world":
        return SyntheticWorldSource()
    if source.startswith("hf:"):
        return HFImageSource(source[3:], split=split)
    if Path(source).is_dir():
        return ImageFolderSource(source, class_index)
    raise FileNotFoundError(f"Image source {source!r} is neither 'synthetic-world', 'hf:NAME', nor an existing "
                            f"image folder.")


# ---- words ----------------------------------------------------------------------------------------------
def word_split(word: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), salt: str = "spelling") -> str:
    """Stable split of a string by hash: the same word is always in the same one of train/val/test."""
    u = int(hashlib.sha1(f"{salt}:{word}".encode()).hexdigest()[:8], 16) / 16 ** 8
    acc = 0.0
    for name, f in zip(SPLITS, fractions):
        acc += f
        if u < acc:
            return name
    return SPLITS[-1]


@dataclass
class WordConfig:
    real_fraction: float = 0.5
    word_list: str = DEFAULT_WORD_LIST
    real_min_len: int = 3
    real_max_len: int = 8
    nonsense_min_len: int = 3
    nonsense_max_len: int = 5
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    word_template: str = "{}"          # text encoded as y_t (the code: the bare word)


def load_real_words(word_list: str, min_len: int, max_len: int) -> list[str]:
    """A word-list file, or "world": the synthetic world's vocabulary (words its tiny CLIP was trained to read)."""
    if word_list == "world":
        from xclip.datamodules.synthetic_world import world_vocabulary

        return sorted(w for w in world_vocabulary() if min_len <= len(w) <= max_len)
    return load_word_list(word_list, min_len, max_len)


class WordSampler:
    """Draws (word, is_real) for one split; real and nonsense words of different splits never coincide.

    Nonsense strings that happen to be dictionary words are redrawn, so the ``real`` flag is always right.
    """

    def __init__(self, split: str, cfg: WordConfig | None = None):
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        self.split, self.cfg = split, cfg or WordConfig()
        c = self.cfg
        if not 0.0 <= c.real_fraction <= 1.0:
            raise ValueError(f"real_fraction must be in [0, 1], got {c.real_fraction}.")
        if c.nonsense_min_len < 1 or c.nonsense_max_len < c.nonsense_min_len:
            raise ValueError(f"Bad nonsense word lengths {c.nonsense_min_len}..{c.nonsense_max_len}.")
        self.dictionary: set[str] = set()
        self.real_words: list[str] = []
        if c.real_fraction > 0:
            words = load_real_words(c.word_list, c.real_min_len, c.real_max_len)
            self.dictionary = set(words)
            self.real_words = [w for w in words if word_split(w, c.split_fractions) == split]
            if not self.real_words:
                raise ValueError(f"Word list {c.word_list} has no {split} words (length {c.real_min_len}.."
                                 f"{c.real_max_len}, split fractions {c.split_fractions}).")

    def sample(self, rng: random.Random) -> tuple[str, bool]:
        if self.real_words and rng.random() < self.cfg.real_fraction:
            return rng.choice(self.real_words), True
        for _ in range(10_000):
            w = nonsense_word(rng, self.cfg.nonsense_min_len, self.cfg.nonsense_max_len)
            if w not in self.dictionary and word_split(w, self.cfg.split_fractions) == self.split:
                return w, False
        raise RuntimeError(f"Could not draw a {self.split} nonsense word of length "
                           f"{self.cfg.nonsense_min_len}..{self.cfg.nonsense_max_len}: too few strings left.")

    def spec(self) -> dict[str, Any]:
        c = asdict(self.cfg)
        c["split_fractions"] = list(c["split_fractions"])
        c["n_real_words"] = len(self.real_words)
        return c


# ---- text style -----------------------------------------------------------------------------------------
@dataclass
class StyleConfig:
    """How words are drawn (2.4): font size in px at a 224 canvas is 40 (scaled with ``canvas_size``)."""

    fonts: list[str] | None = None              # names or paths; None -> text_render defaults
    font_size: int | None = None                # None -> round(40 * canvas / 224)
    colour: tuple[int, int, int] = (0, 0, 0)
    position: str = "center"                    # "center" | "random"
    white_box: bool = False                     # the paper figure's sticker (True) vs the code's bare text
    random_font: bool = False                   # draw one font per sample from ``fonts`` (else the first)
    font_size_jitter: float = 0.0               # +- fraction of the size drawn per sample
    native_text: bool = True                    # sources with their own word rendering (the world) draw x_it

    def resolve(self) -> list[str]:
        return resolve_fonts(self.fonts)


# ---- the dataset ----------------------------------------------------------------------------------------
class QuintupleDataset(Dataset):
    """``n`` quintuples of one split; item ``idx`` -> dict(x_i, x_t, x_it: PIL, y_i, y_t: str, class_id, real)."""

    def __init__(self, source: ImageSource, split: str = "train", n: int = 1000, seed: int = 0,
                 canvas_size: int = 224, words: WordConfig | None = None, style: StyleConfig | None = None,
                 class_templates: Sequence[str] | None = None):
        if n <= 0:
            raise ValueError(f"QuintupleDataset: n must be positive, got {n}.")
        if n > len(source):
            raise ValueError(f"Image source {source.spec()} has only {len(source)} images but {n} {split} "
                             f"quintuples were requested; lower n or add images.")
        self.source, self.split, self.n, self.seed, self.canvas_size = source, split, n, seed, canvas_size
        self.words = WordSampler(split, words)
        self.style = style or StyleConfig()
        self.fonts = self.style.resolve()
        self.font_size = self.style.font_size or max(6, round(40 * canvas_size / 224))
        self.class_templates = list(class_templates) if class_templates else None
        # finite sources: a seeded subset of the images, one quintuple per image (2.2)
        self._order = None if len(source) >= 2 ** 31 - 1 else random.Random(f"{seed}:{split}:order").sample(
            range(len(source)), n)

    @property
    def classnames(self) -> list[str]:
        return list(self.source.classnames)

    def class_prompts(self) -> list[list[str]]:
        """Per class, the prompts whose mean text embedding is y_i (default: the single template of 2.5)."""
        if self.class_templates is None:
            if hasattr(self.source, "class_prompts"):
                return [self.source.class_prompts(c) for c in self.classnames]
            return [[class_prompt(c)] for c in self.classnames]
        return [[t.format(c.replace("_", " ")) for t in self.class_templates] for c in self.classnames]

    def __len__(self) -> int:
        return self.n

    def text_style(self, rng: random.Random) -> TextStyle:
        s = self.style
        font = rng.choice(self.fonts) if s.random_font else self.fonts[0]
        size = self.font_size
        if s.font_size_jitter:
            size = max(6, round(size * (1 + rng.uniform(-s.font_size_jitter, s.font_size_jitter))))
        return TextStyle(font=font, size=size, fill=tuple(s.colour), position=s.position, white_box=s.white_box)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < self.n:
            raise IndexError(f"QuintupleDataset index {idx} out of range [0, {self.n}).")
        rng = random.Random(f"{self.seed}:{self.split}:{idx}")
        src_idx = idx if self._order is None else self._order[idx]
        word, real = self.words.sample(rng)
        style = self.text_style(rng)
        pos_seed = rng.random()      # x_t and x_it get the same position draw
        if self.style.native_text and hasattr(self.source, "render_text"):
            x_t = self.source.render_text(word, random.Random(pos_seed), self.canvas_size)
        else:
            x_t, _ = draw_word(None, word, style, random.Random(pos_seed), self.canvas_size)
        if self.style.native_text and hasattr(self.source, "load_pair"):
            x_i, x_it, class_id = self.source.load_pair(src_idx, rng, self.canvas_size, word)
        else:
            x_i, class_id = self.source.load(src_idx, rng, self.canvas_size)
            x_it, _ = draw_word(x_i, word, style, random.Random(pos_seed), self.canvas_size)
        return {"x_i": x_i, "x_t": x_t, "x_it": x_it, "y_i": class_prompt(self.classnames[class_id]),
                "y_t": word, "y_t_text": self.words.cfg.word_template.format(word), "class_id": class_id,
                "real": int(real)}

    def spec(self) -> dict[str, Any]:
        """Everything that determines the pixels and strings (part of the feature-cache key)."""
        style = asdict(self.style)
        style["fonts"] = self.fonts
        style["font_size"] = self.font_size
        return {"source": self.source.spec(), "split": self.split, "n": self.n, "seed": self.seed,
                "canvas_size": self.canvas_size, "words": self.words.spec(), "style": style,
                "class_prompts": self.class_prompts()}
