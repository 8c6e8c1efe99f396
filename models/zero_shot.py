"""Zero-shot CLIP classifiers (spec §2.4): one hand-crafted template, or an ensemble of templates.

    W = zero_shot_classifier(backbone, classnames, ["a photo of a {}."])          # [C, D]
    W = zero_shot_classifier(backbone, classnames, load_templates("imagenet80"))   # CLIP's 80 ImageNet prompts
Ensembling averages the L2-normalised text features of every template and re-normalises (CoOp's ZeroshotCLIP2,
CLIP's notebook).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from xclip.models.clip_backbone import ClipBackbone

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "configs" / "coop"
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


def load_templates(spec: str) -> list[str]:
    """'single' | 'imagenet80' | 'imagenet_select' | a dataset key of DATASET_TEMPLATES | a text file (one a line)."""
    if spec == "single":
        return [SINGLE_TEMPLATE]
    if spec == "imagenet_select":
        return list(IMAGENET_TEMPLATES_SELECT)
    if spec in DATASET_TEMPLATES:
        return [DATASET_TEMPLATES[spec]]
    path = TEMPLATE_DIR / "imagenet_templates.txt" if spec == "imagenet80" else Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Template spec {spec!r}: not 'single', 'imagenet80', 'imagenet_select', one of "
                                f"{sorted(DATASET_TEMPLATES)}, nor an existing file ({path}).")
    templates = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"Template file {path}: every line needs exactly one '{{}}'; bad lines: {bad[:3]}")
    return templates


@torch.no_grad()
def zero_shot_classifier(backbone: ClipBackbone, classnames: Sequence[str], templates: Sequence[str],
                         batch_size: int = 256) -> torch.Tensor:
    """-> [C, D] L2-normalised class embeddings (template-averaged)."""
    texts = [t.format(c.replace("_", " ")) for c in classnames for t in templates]
    feats = torch.cat([backbone.encode_text(backbone.tokenize(texts[i:i + batch_size]), normalize=True)
                       for i in range(0, len(texts), batch_size)])  # [C*T, D]
    feats = feats.view(len(classnames), len(templates), -1).mean(1)  # [C, D]
    return F.normalize(feats, dim=-1)
