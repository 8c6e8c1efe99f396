"""Suite `zeroshot`: top-1 accuracy on the full test split of a few-shot dataset (CoOp protocol, spec §2.4).

    python evaluate.py --backbone ViT-B-32 --pretrained openai --suite zeroshot \
        --zeroshot_dataset imagefolder:/data/imagenet --zeroshot_classnames /data/imagenet/classnames.txt
    python evaluate.py --ckpt runs/coop/checkpoints/last.ckpt --suite zeroshot --zeroshot_dataset ...

Always reports the zero-shot baselines of the backbone (``--zeroshot_templates``, default: CLIP's single
"a photo of a {}." and the 80 ImageNet templates ensembled).  With a checkpoint whose method defines
``class_text_features(classnames)`` (CoOp), its accuracy is reported as ``top1/method`` on the same images.
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from xclip.datamodules.fewshot import (FewShotDataError, SplitDataset, filter_bad_images, open_source, read_classnames,
                                 test_split_of)
from xclip.evaluation.common import EvalModel
from xclip.models.zero_shot import load_templates, zero_shot_classifier

NAME = "zeroshot"
HELP = "zero-shot (1 / 80 templates) and learned-prompt top-1 accuracy on a few-shot dataset's test split"
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--zeroshot_dataset", default=None,
                        help="HF datasets name or 'imagefolder:/path' (ROOT/train/<class>, ROOT/test/<class>)")
    parser.add_argument("--zeroshot_hf_config", default=None, help="HF dataset config name")
    parser.add_argument("--zeroshot_classnames", default=None, help="class-name file (one a line or CoOp format)")
    parser.add_argument("--zeroshot_test_split", default=None, help="split to test on (default test / val)")
    parser.add_argument("--zeroshot_templates", default="single,imagenet80",
                        help="comma list of template sets: single | imagenet80 | imagenet_select | <dataset key> | file")
    parser.add_argument("--zeroshot_limit", type=int, default=0, help="evaluate only the first N test images (0 = all)")
    parser.add_argument("--zeroshot_batch_size", type=int, default=100)
    parser.add_argument("--zeroshot_num_workers", type=int, default=4)
    parser.add_argument("--zeroshot_max_bad_fraction", type=float, default=0.01)
    parser.add_argument("--zeroshot_cache_dir", default=None, help="HF datasets cache dir")


@torch.no_grad()
def run(model: EvalModel, args) -> dict:
    if not args.zeroshot_dataset:
        raise SystemExit("suite zeroshot: --zeroshot_dataset is required (HF name or imagefolder:/path)")
    source = open_source(args.zeroshot_dataset, args.zeroshot_hf_config, args.zeroshot_cache_dir)
    classnames = read_classnames(args.zeroshot_classnames, source.class_keys) if args.zeroshot_classnames \
        else source.default_names
    split = test_split_of(source, args.zeroshot_test_split)
    items = source.items(split)
    if args.zeroshot_limit:
        items = items[:args.zeroshot_limit]
    if not items:
        raise FewShotDataError(f"split {split!r} of {args.zeroshot_dataset} has no images.")
    items, bad = filter_bad_images(source, split, items, args.zeroshot_max_bad_fraction,
                                   f"split {split} of {args.zeroshot_dataset}")
    loader = DataLoader(SplitDataset(source, split, items, model.image_transform()),
                        batch_size=args.zeroshot_batch_size, num_workers=args.zeroshot_num_workers)
    feats, labels = [], []
    for x, y in loader:
        feats.append(model.encode_images(x))  # [b, D] normalised
        labels.append(y)
    img, labels = torch.cat(feats), torch.cat(labels).to(model.device)  # [N, D], [N]

    classifiers: dict[str, torch.Tensor] = {}
    for spec in [s.strip() for s in args.zeroshot_templates.split(",") if s.strip()]:
        templates = load_templates(spec)
        classifiers[spec] = zero_shot_classifier(model, [c.replace("_", " ") for c in classnames], templates)
    if model.method is not None and hasattr(model.method, "class_text_features"):
        classifiers["method"] = model.class_text_features(classnames)  # learned prompts (e.g. CoOp)

    results: dict = {"dataset": args.zeroshot_dataset, "split": split, "n_images": len(items),
                     "n_classes": len(classnames), "n_bad_images": len(bad),
                     "bad_images": [b["path"] for b in bad[:50]]}
    rows = []
    for name, W in classifiers.items():
        pred = (img @ W.to(img).T).argmax(-1)  # [N]
        acc = (pred == labels).float().mean().item()
        per_class = torch.zeros(len(classnames), device=img.device).index_add_(0, labels, (pred == labels).float())
        counts = torch.bincount(labels, minlength=len(classnames)).clamp_min(1)
        results[f"top1/{name}"] = round(100 * acc, 3)
        results[f"mean_per_class/{name}"] = round(100 * (per_class / counts).mean().item(), 3)
        rows.append([name, results[f"top1/{name}"], results[f"mean_per_class/{name}"]])
    results["tables"] = {"accuracy": {"columns": ["classifier", "top1", "mean_per_class"], "data": rows}}
    return results
