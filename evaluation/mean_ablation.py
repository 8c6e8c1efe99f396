"""Zero-shot accuracy with chosen attention layers / heads / MLPs mean-ablated (TextSpan §3.2, spec A4).

The backbone's image embeddings are decomposed (analysis/decomposition.py); the chosen direct contributions are
replaced by their mean over the evaluated images and classification is redone from the sum. Reports the baseline,
MLPs ablated, CLS->CLS ablated, the accumulated-layer curve, 'all layers but the last k' and the custom spec.
A projection / method of the EvalModel is not applied: the decomposition is of the backbone's own embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from xclip.evaluation._images import check_templates
from xclip.evaluation.common import RunContext

NAME = "mean_ablation"
HELP = "zero-shot accuracy with chosen layers/heads/MLPs mean-ablated (TextSpan decomposition)"


@dataclass
class Settings:
    """Suite mean_ablation."""
    data: str = "world:200"
    """'world[:N[:SEED]]' (built-in world shapes) or a ROOT/<class>/<image> folder"""
    templates: list[str] | None = None
    """prompts with {} (default: the world ensemble / the 80 OpenAI templates)"""
    limit_per_class: int | None = None
    keep_last: list[int] = field(default_factory=lambda: [1, 2, 4])
    """report accuracy with every attention layer but the last k mean-ablated"""
    layers: list[int] | None = None
    """custom ablation: whole layers"""
    heads: str | None = None
    """custom ablation: heads 'LAYER:HEAD ...' (0-indexed), e.g. '11:6 10:2' (quote it in YAML)"""
    mlps: bool = False
    """custom ablation: also the MLP/embedding terms"""
    batch_size: int = 64


def check(s: Settings, ctx: RunContext | None = None) -> None:
    from xclip.analysis.ablation import parse_heads
    from xclip.analysis.datasets import CLASS_FOLDER_LAYOUT

    if s.templates is not None:
        check_templates(s.templates, "--mean_ablation.templates")
    parse_heads(s.heads or "")
    if not s.data.startswith("world") and not Path(s.data).is_dir():
        raise FileNotFoundError(f"--mean_ablation.data {s.data}: no such folder; expected 'world[:N[:SEED]]' or "
                                f"{CLASS_FOLDER_LAYOUT}")


def run(model, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    from xclip.analysis.ablation import (
        AblationSpec,
        ablated_embeddings,
        ablation_table,
        dataset_means,
        parse_heads,
        zero_shot_accuracy,
    )
    from xclip.analysis.datasets import build_classifier, load_classification
    from xclip.analysis.decomposition import decompose_images

    check(s)
    backbone = model.backbone
    data = load_classification(s.data, backbone, s.templates, s.limit_per_class)
    classifier = build_classifier(backbone, data.class_prompts)                  # [D, C]
    heads, mlps, cls = [], [], []
    for images in data.batches(s.batch_size):
        dec = decompose_images(backbone.model.visual, images.to(backbone.device))
        heads.append(dec.heads.cpu())
        mlps.append(dec.mlps.cpu())
        cls.append(dec.cls_attn.cpu())
    heads, mlps, cls = torch.cat(heads), torch.cat(mlps), torch.cat(cls)         # [K, L, H, D] [K, L+1, D] [K, L, D]
    res = ablation_table(heads, mlps, classifier, data.labels, cls_attn=cls, keep_last=list(s.keep_last))
    if s.layers or s.heads:
        spec = AblationSpec(layers=list(s.layers or []), heads=parse_heads(s.heads or ""), mlps=s.mlps)
        emb = ablated_embeddings(heads, mlps, spec, dataset_means(heads, mlps))
        res["custom"] = zero_shot_accuracy(emb, classifier, data.labels)
    curve = res["accumulated_layers"]
    res["images"] = len(data)
    res["tables"] = {"accumulated_layers": {
        "columns": ["layers_ablated", "accuracy"],
        "data": [[k, acc] for k, acc in enumerate(curve)]}}
    return res
