"""Mean-ablation of decomposed components (TextSpan §3.2, spec A4).

Mean-ablating a component replaces its direct contribution, for every image, by its mean over the dataset;
classification is then redone from the modified sum of contributions. Everything streams over row chunks, so
the inputs may be ``analysis.store.ShardedArray``s larger than memory.

Inputs: heads [K, L, H, D], mlps [K, L+1, D] (index 0 = embedding term), optionally cls_attn [K, L, D]
(the CLS->CLS token-0 term; it is part of the heads' sum).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch


@dataclass
class AblationSpec:
    """What to mean-ablate.

    layers: whole attention layers (all heads); heads: single (layer, head) pairs; mlps: all L+1 layer-level
    terms (MLPs and the embedding term); cls: the CLS->CLS term of every layer (needs cls_attn).
    """
    layers: list[int] = field(default_factory=list)
    heads: list[tuple[int, int]] = field(default_factory=list)
    mlps: bool = False
    cls: bool = False

    def head_mask(self, L: int, H: int) -> torch.Tensor:
        """[L, H] bool, True where the head is mean-ablated. Fails on out-of-range indices."""
        mask = torch.zeros(L, H, dtype=torch.bool)
        for l in self.layers:
            if not 0 <= l < L:
                raise ValueError(f"ablation layer {l} out of range: the model has {L} layers (0..{L - 1})")
            mask[l] = True
        for l, h in self.heads:
            if not (0 <= l < L and 0 <= h < H):
                raise ValueError(f"ablation head ({l}, {h}) out of range: the model has {L} layers x {H} heads")
            mask[l, h] = True
        return mask


def layers_before_last(num_layers: int, keep_last: int) -> list[int]:
    """The attention layers to ablate so that only the last ``keep_last`` remain."""
    if not 0 <= keep_last <= num_layers:
        raise ValueError(f"keep_last={keep_last} must be in [0, {num_layers}]")
    return list(range(num_layers - keep_last))


def parse_heads(text: str) -> list[tuple[int, int]]:
    """'11:6,11:0 10:11' -> [(11, 6), (11, 0), (10, 11)] (layer:head, 0-indexed)."""
    out = []
    for tok in text.replace(",", " ").split():
        try:
            l, h = tok.split(":")
            out.append((int(l), int(h)))
        except ValueError:
            raise ValueError(f"bad head {tok!r} in {text!r}: expected LAYER:HEAD, e.g. 11:6") from None
    return out


def _chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _rows(arr, a: int, b: int) -> torch.Tensor:
    x = arr[a:b]
    return x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


@torch.no_grad()
def dataset_means(heads, mlps, cls_attn=None, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Means over images: {"heads": [L, H, D], "mlps": [L+1, D], "cls_attn": [L, D] (if given)}; float64 sums."""
    K = len(heads)
    if len(mlps) != K or (cls_attn is not None and len(cls_attn) != K):
        raise ValueError(f"heads/mlps/cls_attn have different numbers of images: {len(heads)}, {len(mlps)}, "
                         f"{None if cls_attn is None else len(cls_attn)}")
    sums: dict[str, torch.Tensor] = {}
    arrays = {"heads": heads, "mlps": mlps, **({"cls_attn": cls_attn} if cls_attn is not None else {})}
    for a, b in _chunks(K, chunk):
        for k, arr in arrays.items():
            s = _rows(arr, a, b).double().sum(0)
            sums[k] = s if k not in sums else sums[k] + s
    return {k: (v / K).float() for k, v in sums.items()}


@torch.no_grad()
def ablated_embeddings(heads, mlps, spec: AblationSpec, means: dict[str, torch.Tensor], cls_attn=None,
                       chunk: int = 1024) -> torch.Tensor:
    """[K, D] sum of contributions with the components in ``spec`` replaced by their means."""
    K, L, H, _ = heads.shape
    mask = spec.head_mask(L, H)                                        # [L, H]
    if spec.cls and cls_attn is None:
        raise ValueError("AblationSpec.cls=True needs the cls_attn array ([K, L, D])")
    out = []
    for a, b in _chunks(K, chunk):
        h = _rows(heads, a, b)                                        # [b, L, H, D]
        h = torch.where(mask[None, :, :, None], means["heads"][None], h)
        emb = h.sum(dim=(1, 2))
        m = _rows(mlps, a, b)                                         # [b, L+1, D]
        emb += means["mlps"].sum(0)[None] if spec.mlps else m.sum(1)
        if spec.cls:
            c = _rows(cls_attn, a, b)                                 # [b, L, D]
            # only layers whose heads are kept still carry their own CLS term; swap it for its mean there
            keep = (~mask.all(dim=1)).float()[None, :, None]          # [1, L, 1]
            emb += ((means["cls_attn"][None] - c) * keep).sum(1)
        out.append(emb)
    return torch.cat(out)


def zero_shot_accuracy(embeddings: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of argmax(embeddings @ classifier) ([K, D] @ [D, C]) against labels [K]."""
    if classifier.shape[0] != embeddings.shape[1]:
        raise ValueError(f"classifier must be [D, C] with D={embeddings.shape[1]}, got {tuple(classifier.shape)}")
    pred = (embeddings.float() @ classifier.float()).argmax(dim=1)
    return float((pred == labels.to(pred.device)).float().mean())


def accumulated_layer_curve(heads, mlps, classifier: torch.Tensor, labels: torch.Tensor,
                            means: dict[str, torch.Tensor] | None = None) -> list[float]:
    """[baseline, acc with layers 0..0 ablated, ..., acc with layers 0..L-1 ablated]: L+1 entries (MLPs kept)."""
    means = means or dataset_means(heads, mlps)
    L = heads.shape[1]
    accs = []
    for k in range(-1, L):
        spec = AblationSpec(layers=list(range(k + 1)))
        accs.append(zero_shot_accuracy(ablated_embeddings(heads, mlps, spec, means), classifier, labels))
    return accs


def ablation_table(heads, mlps, classifier: torch.Tensor, labels: torch.Tensor, cls_attn=None,
                   keep_last: Sequence[int] = ()) -> dict:
    """The A4 report: baseline, +MLPs, +CLS, both, the accumulated curve and 'all but the last k' rows."""
    means = dataset_means(heads, mlps, cls_attn)

    def acc(spec: AblationSpec) -> float:
        return zero_shot_accuracy(ablated_embeddings(heads, mlps, spec, means, cls_attn), classifier, labels)

    res = {"baseline": acc(AblationSpec()), "mlps_ablated": acc(AblationSpec(mlps=True))}
    if cls_attn is not None:
        res["cls_ablated"] = acc(AblationSpec(cls=True))
        res["mlps_and_cls_ablated"] = acc(AblationSpec(mlps=True, cls=True))
    res["accumulated_layers"] = accumulated_layer_curve(heads, mlps, classifier, labels, means)
    L = heads.shape[1]
    for k in keep_last:
        res[f"all_but_last_{k}"] = acc(AblationSpec(layers=layers_before_last(L, k)))
        res[f"all_but_last_{k}_and_mlps"] = acc(AblationSpec(layers=layers_before_last(L, k), mlps=True))
    return res
