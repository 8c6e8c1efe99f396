"""Typographic-attack accuracy (disentangle.md 5.5): classify clean and word-attacked images among the candidate
set (true objects U attack words); report clean / attacked accuracy and the attack success rate.

Sources: ``real`` (the 180-photo dataset, datamodules/typographic_real.py layout), ``imagefolder`` (ROOT/<class>/
images; each image gets a clean and an attacked copy with a random other class name, or --typographic.attack_words),
``world`` (datamodules.synthetic_world.typographic_split: shapes with a wrong shape word on them).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from xclip.datamodules.typographic_real import EXPECTED_LAYOUT, TypoSample, load_typographic_real, make_attacks
from xclip.evaluation._images import check_templates, class_features, encode_pil, open_image, require
from xclip.evaluation.common import RunContext
from xclip.models.zero_shot import zero_shot_logits
from xclip.utils.images import list_images

NAME = "typographic"
HELP = "typographic-attack accuracy: clean vs word-attacked images (real 180-photo set, an image folder, the world)"
IMAGEFOLDER_LAYOUT = "ROOT/<class name>/<image>.{png,jpg,...} (one folder per class)"


@dataclass
class Settings:
    """Suite typographic."""
    source: Literal["real", "imagefolder", "world"] = "world"
    data: str | None = None
    """folder: real: the 180-photo layout (datamodules/typographic_real.py); imagefolder: ROOT/<class>/<image>"""
    templates: list[str] | None = None
    """class prompts, each with {} (default: ['a photo of a {}.']; world: the world's colour ensemble)"""
    n: int = 200
    """world: objects (each clean + attacked); imagefolder: max images per class"""
    attack_words: list[str] | None = None
    """imagefolder: attack words (default: the other class names)"""
    text_size: float = 0.2
    """imagefolder: font size as a fraction of the image's short side"""
    white_box: bool = True
    """imagefolder: a white sticker behind the word (false: bare text)"""
    seed: int = 1234
    """seed of the attacks / the world split"""


def check(s: Settings, ctx: RunContext | None = None) -> None:
    if s.templates is not None:
        check_templates(s.templates, "--typographic.templates")
    if s.source == "real":
        require(s.data, "--typographic.data", EXPECTED_LAYOUT, kind="folder")
        require(Path(s.data) / "annotations.json", "--typographic.data", EXPECTED_LAYOUT)
    elif s.source == "imagefolder":
        require(s.data, "--typographic.data", IMAGEFOLDER_LAYOUT, kind="folder")
        if len(_classes(Path(s.data))) < 2:
            raise ValueError(f"typographic: {s.data} needs at least 2 class folders with images; expected "
                             f"{IMAGEFOLDER_LAYOUT}")


def _classes(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and list_images(d))


def _load(s: Settings) -> tuple[list[TypoSample], list[str] | None]:
    """-> samples, default templates (None = 'a photo of a {}.')."""
    if s.source == "real":
        return load_typographic_real(s.data), None
    if s.source == "imagefolder":
        root = Path(s.data)
        classes = _classes(root)
        images = [(open_image(p, "typographic").convert("RGB"), c.replace("_", " "))
                  for c in classes for p in list_images(root / c)[:s.n]]
        words = [w.strip() for w in s.attack_words if w.strip()] if s.attack_words \
            else [c.replace("_", " ") for c in classes]
        return make_attacks(images, words, seed=s.seed, size_frac=s.text_size, white_box=s.white_box), None
    from xclip.datamodules import synthetic_world as sw

    split = sw.typographic_split(n=s.n, seed=s.seed)
    samples = []
    for i, (c, a, lab, w) in enumerate(zip(split.clean, split.attacked, split.labels, split.attack_words)):
        samples.append(TypoSample(c, split.classnames[lab], None, f"{i}_clean"))
        samples.append(TypoSample(a, split.classnames[lab], w, f"{i}_{w}"))
    return samples, sw.class_prompts("{}")


def run(model, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    check(s)
    samples, default_templates = _load(s)
    templates = list(s.templates) if s.templates else (default_templates or ["a photo of a {}."])
    candidates = candidate_set(samples)
    img = encode_pil(model, (x.load_image() for x in samples))  # [N, D']
    txt = class_features(model, candidates, templates)  # [C, D']
    res, pred = score_typographic(samples, img, txt, candidates)
    res.update({"source": s.source, "n_images": len(samples), "n_candidates": len(candidates),
                "templates": templates[:3] + (["..."] if len(templates) > 3 else [])})
    res["tables"] = _tables(samples, pred, candidates)
    return res


def candidate_set(samples: list[TypoSample]) -> list[str]:
    """The classification candidates: true objects U attack words (sorted)."""
    return sorted({s.true_label for s in samples} | {s.attack_word for s in samples if s.attack_word})


def score_typographic(samples: list[TypoSample], img: torch.Tensor, txt: torch.Tensor,
                      candidates: list[str]) -> tuple[dict, torch.Tensor]:
    """img [N, D] (sample order), txt [C, D] (candidate order) -> (metrics dict, predicted index [N])."""
    from xclip.metrics.classification import TypographicAttackAccuracy

    index = {c: i for i, c in enumerate(candidates)}
    scores = zero_shot_logits(img, txt)  # [N, C]
    true_idx = torch.tensor([index[s.true_label] for s in samples])
    attack_idx = torch.tensor([index[s.attack_word] if s.attack_word else -1 for s in samples])
    metric = TypographicAttackAccuracy()
    metric.update(scores, true_idx, attack_idx)
    res = {k: float(v) for k, v in metric.compute().items()}
    return res, scores.argmax(1)


def _tables(samples: list[TypoSample], pred: torch.Tensor, candidates: list[str]) -> dict:
    """Per-attack-word accuracy and per-image predictions (W&B tables)."""
    per_word: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s, p in zip(samples, pred.tolist()):
        if s.attack_word:
            per_word[s.attack_word][0] += int(candidates[p] == s.true_label)
            per_word[s.attack_word][1] += 1
    return {
        "per_attack_word": {"columns": ["attack_word", "accuracy", "n"],
                            "data": [[w, c / n, n] for w, (c, n) in sorted(per_word.items())]},
        "predictions": {"columns": ["image", "true", "attack", "predicted"],
                        "data": [[s.name, s.true_label, s.attack_word or "", candidates[p]]
                                 for s, p in zip(samples, pred.tolist())]},
    }
