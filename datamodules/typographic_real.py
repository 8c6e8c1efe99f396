"""The real typographic-attack dataset of Materzynska et al. (180 photos of 20 objects, 8 attack words;
disentangle.md 5.5), and a generator that writes attack words onto any labelled images.

Accepted layouts (the README says ``annotation.json``, third-party loaders use ``annotations.json``)::

    ROOT/annotation(s).json             {"IMG_2934.JPG": {"true object": "cup", "typographic attack label": "good"}, ...}
    ROOT/IMG_2934.JPG  or  ROOT/images/IMG_2934.JPG
    (or the same under ROOT/typographic_attack_dataset/)

An empty / missing attack label marks a clean photo.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from xclip.datamodules.text_render import TextStyle, draw_word
from xclip.utils.io import read_json

EXPECTED_LAYOUT = ("ROOT/annotation.json or ROOT/annotations.json mapping image file name -> {\"true object\": ..., "
                   "\"typographic attack label\": ...}, with the images in ROOT/ or ROOT/images/ "
                   "(ROOT may also hold typographic_attack_dataset/ with that layout)")
TRUE_KEY, ATTACK_KEY = "true object", "typographic attack label"


@dataclass
class TypoSample:
    image: Image.Image | Path
    true_label: str
    attack_word: str | None          # None: clean image
    name: str = ""

    def load_image(self) -> Image.Image:
        return self.image.convert("RGB") if isinstance(self.image, Image.Image) else \
            Image.open(self.image).convert("RGB")


def _find_annotation(root: Path) -> Path:
    for d in (root, root / "typographic_attack_dataset"):
        for name in ("annotation.json", "annotations.json"):
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(f"Typographic dataset: no annotation.json / annotations.json in {root}. "
                            f"Expected layout: {EXPECTED_LAYOUT}")


def load_typographic_real(root: str | Path) -> list[TypoSample]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Typographic dataset folder {root} does not exist. Expected layout: {EXPECTED_LAYOUT}")
    ann_path = _find_annotation(root)
    try:
        ann = read_json(ann_path, "annotation file")
    except ValueError as e:
        raise ValueError(f"Typographic dataset: {e}") from e
    if not isinstance(ann, dict) or not ann:
        raise ValueError(f"Typographic dataset: {ann_path} must be a non-empty JSON object. "
                         f"Expected layout: {EXPECTED_LAYOUT}")
    base = ann_path.parent
    samples = []
    for fname, entry in sorted(ann.items()):
        if not isinstance(entry, dict) or TRUE_KEY not in entry:
            raise ValueError(f"Typographic dataset: {ann_path} entry {fname!r} = {entry!r} lacks {TRUE_KEY!r}. "
                             f"Expected layout: {EXPECTED_LAYOUT}")
        path = next((p for p in (base / fname, base / "images" / fname) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"Typographic dataset: image {fname!r} of {ann_path} is in neither {base} nor "
                                    f"{base / 'images'}. Expected layout: {EXPECTED_LAYOUT}")
        attack = str(entry.get(ATTACK_KEY) or "").strip() or None
        samples.append(TypoSample(path, str(entry[TRUE_KEY]).strip(), attack, fname))
    return samples


def attack_image(image: Image.Image, word: str, rng: random.Random, size_frac: float = 0.2,
                 white_box: bool = True, position: str = "random") -> Image.Image:
    """Write ``word`` on ``image`` (font size = size_frac x the short side, shrunk to fit)."""
    size = max(6, int(round(size_frac * min(image.size))))
    style = TextStyle(size=size, white_box=white_box, position=position, box_pad=max(1, size // 8))
    out, _ = draw_word(image, word, style, rng)
    return out


def make_attacks(images: Sequence[tuple[Image.Image, str]], attack_words: Sequence[str], seed: int = 0,
                 size_frac: float = 0.2, white_box: bool = True, position: str = "random") -> list[TypoSample]:
    """For every (image, label): the clean image plus one copy carrying a random attack word != label."""
    rng = random.Random(seed)
    out = []
    for i, (img, label) in enumerate(images):
        choices = [w for w in attack_words if w != label]
        if not choices:
            raise ValueError(f"make_attacks: no attack word differs from label {label!r} (words: {list(attack_words)})")
        word = rng.choice(choices)
        out.append(TypoSample(img, label, None, f"{i}_clean"))
        out.append(TypoSample(attack_image(img, word, rng, size_frac, white_box, position), label, word,
                              f"{i}_{word}"))
    return out
