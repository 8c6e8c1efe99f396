"""Zero-shot accuracy with chosen attention layers / heads / MLPs mean-ablated (TextSpan §3.2, spec A4).

The backbone's image embeddings are decomposed (analysis/decomposition.py); the chosen direct contributions are
replaced by their mean over the evaluated images and classification is redone from the sum. Reports the baseline,
MLPs ablated, CLS->CLS ablated, the accumulated-layer curve, 'all layers but the last k' and the custom spec.
A projection / method of the EvalModel is not applied: the decomposition is of the backbone's own embedding.
"""
from __future__ import annotations

import argparse

import torch

NAME = "mean_ablation"
HELP = "zero-shot accuracy with chosen layers/heads/MLPs mean-ablated (TextSpan decomposition)"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--mean-ablation-data", default="world:200",
                        help="'world[:N[:SEED]]' (built-in world shapes) or ROOT/<class>/<image> folder")
    parser.add_argument("--mean-ablation-templates", default=None,
                        help="'|'-separated prompts with {} (default: world ensemble / 80 OpenAI templates)")
    parser.add_argument("--mean-ablation-limit-per-class", type=int, default=None)
    parser.add_argument("--mean-ablation-keep-last", type=int, nargs="*", default=[1, 2, 4],
                        help="report accuracy with every attention layer but the last k mean-ablated")
    parser.add_argument("--mean-ablation-layers", type=int, nargs="*", default=None, help="custom: whole layers")
    parser.add_argument("--mean-ablation-heads", default=None, help="custom: 'L:H L:H ...' (0-indexed)")
    parser.add_argument("--mean-ablation-mlps", action="store_true", help="custom: also MLP/embedding terms")
    parser.add_argument("--mean-ablation-batch-size", type=int, default=64)


def run(model, args) -> dict:
    from xclip.analysis.ablation import (AblationSpec, ablated_embeddings, ablation_table, dataset_means, parse_heads,
                                   zero_shot_accuracy)
    from xclip.analysis.datasets import build_classifier, load_classification
    from xclip.analysis.decomposition import decompose_images

    backbone = model.backbone
    templates = [t for t in args.mean_ablation_templates.split("|") if t] if args.mean_ablation_templates else None
    data = load_classification(args.mean_ablation_data, backbone, templates, args.mean_ablation_limit_per_class)
    classifier = build_classifier(backbone, data.class_prompts)                  # [D, C]
    heads, mlps, cls = [], [], []
    for images in data.batches(args.mean_ablation_batch_size):
        dec = decompose_images(backbone.model.visual, images.to(backbone.device))
        heads.append(dec.heads.cpu())
        mlps.append(dec.mlps.cpu())
        cls.append(dec.cls_attn.cpu())
    heads, mlps, cls = torch.cat(heads), torch.cat(mlps), torch.cat(cls)         # [K, L, H, D] [K, L+1, D] [K, L, D]
    res = ablation_table(heads, mlps, classifier, data.labels, cls_attn=cls,
                         keep_last=args.mean_ablation_keep_last)
    if args.mean_ablation_layers or args.mean_ablation_heads:
        spec = AblationSpec(layers=args.mean_ablation_layers or [],
                            heads=parse_heads(args.mean_ablation_heads or ""), mlps=args.mean_ablation_mlps)
        emb = ablated_embeddings(heads, mlps, spec, dataset_means(heads, mlps))
        res["custom"] = zero_shot_accuracy(emb, classifier, data.labels)
    curve = res["accumulated_layers"]
    res["images"] = len(data)
    res["tables"] = {"accumulated_layers": {
        "columns": ["layers_ablated", "accuracy"],
        "data": [[k, acc] for k, acc in enumerate(curve)]}}
    return res
