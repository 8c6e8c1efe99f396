"""IIIT5K CLIP-as-OCR: classify each test word image among lexicon words by cosine (disentangle.md 5.4).

Lexicons: ``small`` (the 50 words of each image), ``medium`` (its 1,000 words; "1k"), ``full`` (every test
ground-truth word; the spec's presumed "full"), and ``large`` (lexicon.txt, 0.5 M words; with --ocr-iiit5k-large).
Words are lower-cased on both sides and de-duplicated; the text prompt is the raw word by default.
"""
from __future__ import annotations

import argparse

import torch

from xclip.datamodules.iiit5k import EXPECTED_LAYOUT, load_iiit5k_folder, load_iiit5k_hf, load_large_lexicon
from xclip.evaluation._images import encode_pil, parse_templates

NAME = "ocr_iiit5k"
HELP = "IIIT5K word images classified among 50 / 1k / all-test-word lexicons (CLIP as OCR)"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--ocr-iiit5k-root", default=None,
                        help=f"local IIIT5K folder: {EXPECTED_LAYOUT}")
    parser.add_argument("--ocr-iiit5k-hf", default=None, metavar="DATASET",
                        help="HF dataset name instead of a folder, e.g. HuggingFaceM4/IIIT-5K")
    parser.add_argument("--ocr-iiit5k-limit", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--ocr-iiit5k-template", default="{}",
                        help="text prompt(s) for a word, '|'-separated, each with {} (default: the raw word)")
    parser.add_argument("--ocr-iiit5k-large", action="store_true",
                        help="also score against ROOT/lexicon.txt (0.5 M words; slow)")


def _encode_words(model, words: list[str], templates: list[str]) -> torch.Tensor:
    if templates == ["{}"]:
        return model.encode_texts(words).cpu()  # [V, D']
    return model.class_text_features(words, templates=tuple(templates)).cpu()


def lexicon_scores(img: torch.Tensor, txt: torch.Tensor, vocab_index: dict[str, int],
                   lexicons: list[list[str]] | None, labels: list[str], chunk: int = 256):
    """img [N, D], txt [V, D]; lexicons: per-image candidate words (None = the whole vocabulary) -> LexiconAccuracy."""
    from xclip.metrics.classification import LexiconAccuracy

    metric = LexiconAccuracy()
    for s in range(0, len(img), chunk):
        scores = img[s:s + chunk] @ txt.t()  # [n, V]
        allowed = None
        if lexicons is not None:
            allowed = torch.zeros_like(scores, dtype=torch.bool)
            for r, lex in enumerate(lexicons[s:s + chunk]):
                allowed[r, [vocab_index[w] for w in lex]] = True
        target = torch.tensor([vocab_index.get(w, -1) for w in labels[s:s + chunk]])
        metric.update(scores, target, allowed)
    return metric


def run(model, args) -> dict:
    if args.ocr_iiit5k_hf:
        samples = load_iiit5k_hf(args.ocr_iiit5k_hf, limit=args.ocr_iiit5k_limit)
    elif args.ocr_iiit5k_root:
        samples = load_iiit5k_folder(args.ocr_iiit5k_root, limit=args.ocr_iiit5k_limit)
    else:
        raise SystemExit(f"ocr_iiit5k: give --ocr-iiit5k-root DIR ({EXPECTED_LAYOUT}) "
                         f"or --ocr-iiit5k-hf HuggingFaceM4/IIIT-5K")
    templates = parse_templates(args.ocr_iiit5k_template)
    labels = [s.label.lower() for s in samples]
    small = [sorted({w.lower() for w in s.small_lexicon}) for s in samples]
    medium = [sorted({w.lower() for w in s.medium_lexicon}) for s in samples]
    full_words = sorted(set(labels))
    vocab = sorted(set(full_words).union(*small, *medium))
    vocab_index = {w: i for i, w in enumerate(vocab)}

    img = encode_pil(model, (s.load_image() for s in samples))  # [N, D']
    txt = _encode_words(model, vocab, templates)  # [V, D']
    full_mask = [full_words] * len(samples)
    res = {
        "accuracy_small": float(lexicon_scores(img, txt, vocab_index, small, labels).compute()),
        "accuracy_1k": float(lexicon_scores(img, txt, vocab_index, medium, labels).compute()),
        "accuracy_full": float(lexicon_scores(img, txt, vocab_index, full_mask, labels).compute()),
        "n_images": len(samples), "n_full_words": len(full_words),
        "template": "|".join(templates),
        "label_in_small": sum(l in set(s) for l, s in zip(labels, small)) / len(labels),
    }
    if args.ocr_iiit5k_large:
        if not args.ocr_iiit5k_root:
            raise SystemExit("ocr_iiit5k: --ocr-iiit5k-large needs --ocr-iiit5k-root (lexicon.txt)")
        large = load_large_lexicon(args.ocr_iiit5k_root)
        if large is None:
            raise FileNotFoundError(f"ocr_iiit5k: --ocr-iiit5k-large given but no lexicon.txt in "
                                    f"{args.ocr_iiit5k_root}")
        lv = sorted({w.lower() for w in large})
        lt = _encode_words(model, lv, templates)
        res["accuracy_large"] = float(lexicon_scores(img, lt, {w: i for i, w in enumerate(lv)}, None,
                                                     labels).compute())
        res["n_large_words"] = len(lv)
    return res
