"""The zero-shot CLIP classifier (spec §2.4), the one place that turns class names x prompt templates into class
embeddings, built on open_clip's ``build_zero_shot_classifier``.

    W = zero_shot_classifier(backbone, classnames, ["a photo of a {}."])          # [C, D]
    W = zero_shot_classifier(backbone, classnames, load_templates("imagenet80"))   # CLIP's 80 ImageNet prompts
    W = prompt_classifier(backbone, [["a red circle.", "a blue circle."], ...])    # per-class prompt lists
    logits = zero_shot_logits(image_features, W)                                   # [N, C]

Ensembling averages the L2-normalised text features of every template and re-normalises (CLIP's notebook, CoOp's
ZeroshotCLIP2, TextSpan's classifier). ``encoder`` is anything with ``tokenize(list[str]) -> [N, L]`` and
``encode_text(tokens, normalize=True) -> [N, D]``: a ``ClipBackbone``, or an ``EvalModel`` (whose text features
carry its projection W, so the ensemble averages the projected prompt embeddings).
"""
from __future__ import annotations

from operator import itemgetter
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

SINGLE_TEMPLATE = "a photo of a {}."
# CoOp's CUSTOM_TEMPLATES (one per dataset; ImageNet and the rest use SINGLE_TEMPLATE)
DATASET_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "food101": "a photo of {}, a type of food.",
    "ucf101": "a photo of a person doing {}.",
}
# CoOp's IMAGENET_TEMPLATES_SELECT (7 templates used by ZeroshotCLIP2)
IMAGENET_TEMPLATES_SELECT = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                             "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
Template = str | Callable[[str], str]     # "a photo of a {}." or a function of the class name (open_clip's form)


class TextEncoder(Protocol):
    device: torch.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor: ...


def load_templates(spec: str) -> list[str]:
    """'single' | 'imagenet80' (open_clip's 80 OpenAI templates) | 'imagenet_select' | a dataset key of
    DATASET_TEMPLATES | a text file (one template a line, each with one '{}')."""
    if spec == "single":
        return [SINGLE_TEMPLATE]
    if spec == "imagenet_select":
        return list(IMAGENET_TEMPLATES_SELECT)
    if spec in DATASET_TEMPLATES:
        return [DATASET_TEMPLATES[spec]]
    if spec == "imagenet80":
        return openai_imagenet_templates()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Template spec {spec!r}: not 'single', 'imagenet80', 'imagenet_select', one of "
                                f"{sorted(DATASET_TEMPLATES)}, nor an existing file ({path}).")
    templates = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"Template file {path}: every line needs exactly one '{{}}'; bad lines: {bad[:3]}")
    return templates


def openai_imagenet_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet templates as '{}' strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


class _Projected:
    """``encoder`` whose text features pass through ``project`` ([N, D] -> [N, D'], normalised) before averaging."""

    def __init__(self, encoder: TextEncoder, project: Callable[[torch.Tensor], torch.Tensor]):
        self.encoder, self.project, self.device, self.tokenize = encoder, project, encoder.device, encoder.tokenize

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project(self.encoder.encode_text(tokens, normalize=normalize))


@torch.no_grad()
def zero_shot_classifier(encoder: TextEncoder, classnames: Sequence, templates: Sequence[Template],
                         project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         classes_per_batch: int = 10) -> torch.Tensor:
    """-> [C, D] L2-normalised class embeddings, each the re-normalised mean of its normalised prompt embeddings
    (``project``: applied to every prompt embedding first, e.g. a spelling projection W)."""
    if not templates or not classnames:
        raise ValueError(f"zero_shot_classifier: needs class names and templates (got {len(classnames)} names, "
                         f"{len(templates)} templates)")
    enc = encoder if project is None else _Projected(encoder, project)
    weights = build_zero_shot_classifier(enc, enc.tokenize, list(classnames), list(templates),
                                         num_classes_per_batch=classes_per_batch, device=enc.device)  # [D, C]
    return weights.t()


def prompt_classifier(encoder: TextEncoder, class_prompts: Sequence[Sequence[str]],
                      project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per class its own prompt list (e.g. "an image of an {}" with the class's article) -> [C, D]."""
    sizes = {len(p) for p in class_prompts}
    if len(sizes) == 1:   # the j-th "template" of class c picks class_prompts[c][j]
        getters = [itemgetter(j) for j in range(sizes.pop())]
        return zero_shot_classifier(encoder, [tuple(p) for p in class_prompts], getters, project)
    return torch.cat([prompt_classifier(encoder, [p], project) for p in class_prompts])


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor,
                     logit_scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """image_features [N, D] (normalised), classifier [C, D] -> cosine logits [N, C] (times logit_scale if given)."""
    logits = image_features @ classifier.to(image_features).t()
    return logits if logit_scale is None else logit_scale * logits
