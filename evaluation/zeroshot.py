"""Suite `zeroshot`: top-1 accuracy on the full test split of a few-shot dataset (CoOp protocol, spec §2.4).

    xclip evaluate --backbone ViT-B-32 --pretrained openai --suite zeroshot \
        --zeroshot.dataset imagefolder:/data/imagenet --zeroshot.classnames /data/imagenet/classnames.txt
    xclip evaluate --ckpt runs/coop/checkpoints/last.ckpt --suite zeroshot --zeroshot.dataset ...

Always reports the zero-shot baselines of the backbone (``--zeroshot.templates``, default: CLIP's single
"a photo of a {}." and the 80 ImageNet templates ensembled).  With a checkpoint whose method defines
``class_text_features(classnames)`` (CoOp), its accuracy is reported as ``top1/method`` on the same images. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_accuracy

from xclip.datamodules.fewshot import (
    FewShotDataError,
    SplitDataset,
    filter_bad_images,
    open_source,
    read_classnames,
    test_split_of,
)
from xclip.evaluation._images import require
from xclip.evaluation.common import EvalModel, RunContext
from xclip.models.zero_shot import load_templates, zero_shot_classifier, zero_shot_logits

NAME = "zeroshot"
HELP = "zero-shot (1 / 80 templates) and learned-prompt top-1 accuracy on a few-shot dataset's test split"
log = logging.getLogger(__name__)


@dataclass
class Settings:
    """Suite zeroshot."""
    dataset: str | None = None
    """HF datasets name or 'imagefolder:/path' (ROOT/train/<class>, ROOT/test/<class>)"""
    hf_config: str | None = None
    """HF dataset config name"""
    classnames: str | None = None
    """class-name file (one a line, or CoOp's format)"""
    test_split: str | None = None
    """split to test on (default: test / val)"""
    templates: list[str] = field(default_factory=lambda: ["single", "imagenet80"])
    """template sets: single | imagenet80 | imagenet_select | <dataset key> | a file"""
    limit: int = 0
    """evaluate only the first N test images (0 = all)"""
    batch_size: int = 100
    num_workers: int = 4
    max_bad_fraction: float = 0.01
    """share of unreadable test images tolerated (they are skipped and listed)"""
    cache_dir: str | None = None
    """HF datasets cache dir"""


def check(s: Settings, ctx: RunContext | None = None) -> None:
    if not s.dataset:
        raise ValueError("give --zeroshot.dataset (an HF name or imagefolder:/path)")
    if s.dataset.startswith("imagefolder:"):
        require(s.dataset[len("imagefolder:"):], "--zeroshot.dataset imagefolder:",
                "ROOT/train/<class>/..., ROOT/test/<class>/...", kind="folder")
    if s.classnames:
        require(s.classnames, "--zeroshot.classnames", "a class-name file (one a line, or CoOp's format)")
    for spec in s.templates:
        load_templates(spec)


@torch.no_grad()
def run(model: EvalModel, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    check(s)
    source = open_source(s.dataset, s.hf_config, s.cache_dir)
    classnames = read_classnames(s.classnames, source.class_keys) if s.classnames else source.default_names
    split = test_split_of(source, s.test_split)
    items = source.items(split)
    if s.limit:
        items = items[:s.limit]
    if not items:
        raise FewShotDataError(f"split {split!r} of {s.dataset} has no images.")
    items, bad = filter_bad_images(source, split, items, s.max_bad_fraction, f"split {split} of {s.dataset}")
    loader = DataLoader(SplitDataset(source, split, items, model.image_transform()),
                        batch_size=s.batch_size, num_workers=s.num_workers)
    feats, labels = [], []
    for x, y in loader:
        feats.append(model.encode_images(x))  # [b, D] normalised
        labels.append(y)
    img, labels = torch.cat(feats), torch.cat(labels).to(model.device)  # [N, D], [N]

    classifiers: dict[str, torch.Tensor] = {}
    for spec in s.templates:
        templates = load_templates(spec)
        classifiers[spec] = zero_shot_classifier(model, [c.replace("_", " ") for c in classnames], templates)
    if model.method is not None and hasattr(model.method, "class_text_features"):
        classifiers["method"] = model.class_text_features(classnames)  # learned prompts (e.g. CoOp)

    results: dict = {"dataset": s.dataset, "split": split, "n_images": len(items),
                     "n_classes": len(classnames), "n_bad_images": len(bad),
                     "bad_images": [b["path"] for b in bad[:50]]}
    rows = []
    for name, W in classifiers.items():
        pred = zero_shot_logits(img, W).argmax(-1)  # [N]
        results[f"top1/{name}"] = multiclass_accuracy(pred, labels, len(classnames), average="micro").item()
        results[f"mean_per_class/{name}"] = multiclass_accuracy(pred, labels, len(classnames), average="macro").item()
        rows.append([name, results[f"top1/{name}"], results[f"mean_per_class/{name}"]])
    results["tables"] = {"accuracy": {"columns": ["classifier", "top1", "mean_per_class"], "data": rows}}
    return results
