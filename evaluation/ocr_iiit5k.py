"""IIIT5K CLIP-as-OCR: classify each test word image among lexicon words by cosine (disentangle.md 5.4).

Lexicons: ``small`` (the 50 words of each image), ``medium`` (its 1,000 words; "1k"), ``full`` (every test
ground-truth word; the spec's presumed "full"), and ``large`` (lexicon.txt, 0.5 M words; with
``--ocr_iiit5k.large true``).
Words are lower-cased on both sides and de-duplicated; the text prompt is the raw word by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xclip.datamodules.iiit5k import EXPECTED_LAYOUT, find_root, load_iiit5k_folder, load_iiit5k_hf, load_large_lexicon
from xclip.evaluation._images import check_templates, encode_pil
from xclip.evaluation.common import RunContext

NAME = "ocr_iiit5k"
HELP = "IIIT5K word images classified among 50 / 1k / all-test-word lexicons (CLIP as OCR)"


@dataclass
class Settings:
    """Suite ocr_iiit5k."""
    root: str | None = None
    """local IIIT5K folder (testdata.mat + test/*.png: the unpacked IIIT5K-Word_V3.0.tar.gz)"""
    hf: str | None = None
    """HF dataset name instead of a folder, e.g. HuggingFaceM4/IIIT-5K"""
    limit: int | None = None
    """use only the first N test images"""
    templates: list[str] = field(default_factory=lambda: ["{}"])
    """text prompts for a word, each with {} (default: the raw word)"""
    large: bool = False
    """also score against ROOT/lexicon.txt (0.5 M words; slow)"""


def check(s: Settings, ctx: RunContext | None = None) -> None:
    check_templates(s.templates, "--ocr_iiit5k.templates")
    if not (s.root or s.hf):
        raise ValueError(f"give --ocr_iiit5k.root DIR ({EXPECTED_LAYOUT}) or --ocr_iiit5k.hf HuggingFaceM4/IIIT-5K")
    if s.root:
        root = find_root(s.root)
        if s.large and not (root / "lexicon.txt").is_file():
            raise FileNotFoundError(f"--ocr_iiit5k.large true needs {root / 'lexicon.txt'} (the 0.5 M-word lexicon)")
    elif s.large:
        raise ValueError("--ocr_iiit5k.large true needs --ocr_iiit5k.root (lexicon.txt)")


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


def run(model, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    check(s)
    samples = load_iiit5k_hf(s.hf, limit=s.limit) if s.hf else load_iiit5k_folder(s.root, limit=s.limit)
    templates = list(s.templates)
    labels = [x.label.lower() for x in samples]
    small = [sorted({w.lower() for w in x.small_lexicon}) for x in samples]
    medium = [sorted({w.lower() for w in x.medium_lexicon}) for x in samples]
    full_words = sorted(set(labels))
    vocab = sorted(set(full_words).union(*small, *medium))
    vocab_index = {w: i for i, w in enumerate(vocab)}

    img = encode_pil(model, (x.load_image() for x in samples))  # [N, D']
    txt = _encode_words(model, vocab, templates)  # [V, D']
    full_mask = [full_words] * len(samples)
    res = {
        "accuracy_small": float(lexicon_scores(img, txt, vocab_index, small, labels).compute()),
        "accuracy_1k": float(lexicon_scores(img, txt, vocab_index, medium, labels).compute()),
        "accuracy_full": float(lexicon_scores(img, txt, vocab_index, full_mask, labels).compute()),
        "n_images": len(samples), "n_full_words": len(full_words),
        "template": "|".join(templates),
        "label_in_small": sum(lab in set(lex) for lab, lex in zip(labels, small)) / len(labels),
    }
    if s.large:
        large = load_large_lexicon(s.root)
        if large is None:
            raise FileNotFoundError(f"ocr_iiit5k: --ocr_iiit5k.large true given but no lexicon.txt in {s.root}")
        lv = sorted({w.lower() for w in large})
        lt = _encode_words(model, lv, templates)
        res["accuracy_large"] = float(lexicon_scores(img, lt, {w: i for i, w in enumerate(lv)}, None,
                                                     labels).compute())
        res["n_large_words"] = len(lv)
    return res
