"""Typographic-attack accuracy (disentangle.md 5.5): classify clean and word-attacked images among the candidate
set (true objects U attack words); report clean / attacked accuracy and the attack success rate.

Sources: ``real`` (the 180-photo dataset, datamodules/typographic_real.py layout), ``imagefolder`` (ROOT/<class>/
images; each image gets a clean and an attacked copy with a random other class name, or --typographic-attack-words),
``world`` (datamodules.synthetic_world.typographic_split: shapes with a wrong shape word on them).
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from xclip.datamodules.typographic_real import EXPECTED_LAYOUT, TypoSample, load_typographic_real, make_attacks
from xclip.evaluation._images import class_features, encode_pil, list_images, parse_templates

NAME = "typographic"
HELP = "typographic-attack accuracy: clean vs word-attacked images (real 180-photo set, an image folder, the world)"
IMAGEFOLDER_LAYOUT = "ROOT/<class name>/<image>.{png,jpg,...} (one folder per class)"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--typographic-source", choices=("real", "imagefolder", "world"), default="world")
    parser.add_argument("--typographic-data", default=None,
                        help=f"folder: real: {EXPECTED_LAYOUT}; imagefolder: {IMAGEFOLDER_LAYOUT}")
    parser.add_argument("--typographic-template", default=None,
                        help="class prompt(s), '|'-separated, each with {} (default: 'a photo of a {}.'; world: "
                             "the world's colour ensemble)")
    parser.add_argument("--typographic-n", type=int, default=200,
                        help="world: objects (each clean + attacked); imagefolder: max images per class")
    parser.add_argument("--typographic-attack-words", default=None,
                        help="imagefolder: comma-separated attack words (default: the other class names)")
    parser.add_argument("--typographic-text-size", type=float, default=0.2,
                        help="imagefolder: font size as a fraction of the image's short side")
    parser.add_argument("--typographic-no-white-box", action="store_true",
                        help="imagefolder: bare text instead of a white sticker behind the word")
    parser.add_argument("--typographic-seed", type=int, default=1234)


def _load(args) -> tuple[list[TypoSample], list[str] | None]:
    """-> samples, default templates (None = 'a photo of a {}.')."""
    src = args.typographic_source
    if src == "real":
        if not args.typographic_data:
            raise SystemExit(f"typographic: --typographic-source real needs --typographic-data DIR ({EXPECTED_LAYOUT})")
        return load_typographic_real(args.typographic_data), None
    if src == "imagefolder":
        root = Path(args.typographic_data or "")
        if not args.typographic_data or not root.is_dir():
            raise FileNotFoundError(f"typographic: image folder {args.typographic_data!r} not found; expected "
                                    f"{IMAGEFOLDER_LAYOUT}")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and list_images(d))
        if len(classes) < 2:
            raise ValueError(f"typographic: {root} needs at least 2 class folders with images; expected "
                             f"{IMAGEFOLDER_LAYOUT}")
        images = [(Image.open(p).convert("RGB"), c.replace("_", " "))
                  for c in classes for p in list_images(root / c)[:args.typographic_n]]
        words = [w.strip() for w in args.typographic_attack_words.split(",") if w.strip()] \
            if args.typographic_attack_words else [c.replace("_", " ") for c in classes]
        return make_attacks(images, words, seed=args.typographic_seed, size_frac=args.typographic_text_size,
                            white_box=not args.typographic_no_white_box), None
    try:
        from xclip.datamodules import synthetic_world as sw
    except ImportError as e:
        raise SystemExit(f"typographic: --typographic-source world needs datamodules/synthetic_world.py ({e})")
    split = sw.typographic_split(n=args.typographic_n, seed=args.typographic_seed)
    samples = []
    for i, (c, a, lab, w) in enumerate(zip(split.clean, split.attacked, split.labels, split.attack_words)):
        samples.append(TypoSample(c, split.classnames[lab], None, f"{i}_clean"))
        samples.append(TypoSample(a, split.classnames[lab], w, f"{i}_{w}"))
    return samples, sw.class_prompts("{}")


def run(model, args) -> dict:
    samples, default_templates = _load(args)
    templates = parse_templates(args.typographic_template) if args.typographic_template else \
        (default_templates or ["a photo of a {}."])
    candidates = candidate_set(samples)
    img = encode_pil(model, (s.load_image() for s in samples))  # [N, D']
    txt = class_features(model, candidates, templates)  # [C, D']
    res, pred = score_typographic(samples, img, txt, candidates)
    res.update({"source": args.typographic_source, "n_images": len(samples), "n_candidates": len(candidates),
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
    scores = img @ txt.t()  # [N, C]
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
