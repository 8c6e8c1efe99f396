"""NTLB explainability loss for CoOp (spec §3): push the class-name share of the EOT text relevance up for the
true class and down for the others.

    S[b, k] = max over class-name tokens j of  r_bk[j],   r_bk = R_bk[eot_k, :], r[eot] = 0, r / sum r   (§1.6, §3.3)
    L_expl  = -(1/B) sum_b S[b, y_b]  +  also_minimize * (1/(B*K)) sum_b sum_{k != y_b} S[b, k]            (§3.4)

R_bk is the Chefer relevance of the prompt of class k for y_b = sum_k logit(x_b, t_k) over all text layers, with
G = dy/dA a constant and A attached (``create_graph=False``, as the anchor), computed by models/relevance.py.

Deliberate deviations from the anchor (spec §3.5): the image features are computed once per image (the anchor
pushes each image through the image tower K times: identical gradients, §1.8); all images share one text forward
(B backward passes instead of B text forwards); lambda is a plain argument (no ``.module`` crash on one GPU);
the loss is the same in fp32 and mixed precision (the relevance pass runs with autocast off: text forward,
G and the accumulation of R in fp32; tests/test_gpu.py checks 16-mixed / bf16-mixed against fp32); ``to_minimize`` is not an alias of the
ground-truth scores (no in-place edit).  Chunking over classes (``chunk_size``) bounds memory exactly: the loss is
a sum over classes, so each chunk's gradient w.r.t. the learned parameters is taken and freed in turn.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from xclip.models.relevance import normalise_token_relevance, text_relevance_from_embeddings


def _fp32(like: torch.Tensor):
    """Autocast off on ``like``'s device: under ``16-mixed`` / ``bf16-mixed`` the relevance pass (its text forward,
    G = dy/dA and the rollout products, which autocast would run in half precision even on fp32 accumulators) is
    computed in fp32, so the loss and its gradient equal the fp32 run up to the image features' rounding."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def classname_scores(relevance: torch.Tensor, eot_index: torch.Tensor, name_mask: torch.Tensor) -> torch.Tensor:
    """relevance [B, C, L] (raw EOT rows), eot_index [C], name_mask [C, L] -> S [B, C] (CoOp normalisation, max)."""
    r = normalise_token_relevance(relevance.float(), eot_index, "coop")  # [B, C, L]
    return (r * name_mask.to(r.dtype)).amax(-1)  # r >= 0, so this is the max over class-name positions


def ntlb_expl_loss(scores: torch.Tensor, labels: torch.Tensor, also_minimize: bool = True) -> torch.Tensor:
    """scores [B, K], labels [B] -> scalar  -mean_b S[b, y_b] + (1/(B*K)) sum_{k != y_b} S[b, k]."""
    gt_mask = F.one_hot(labels, scores.shape[1]).to(torch.bool)  # [B, K]
    loss = -scores[gt_mask].mean()
    if also_minimize:
        loss = loss + scores.masked_fill(gt_mask, 0.0).sum() / scores.numel()
    return loss


def _chunk_loss(scores: torch.Tensor, labels: torch.Tensor, lo: int, K: int, also_minimize: bool) -> torch.Tensor:
    """Part of ntlb_expl_loss contributed by classes [lo, lo + c) (scores [B, c]); the parts sum to the loss."""
    B, c = scores.shape
    local = labels - lo
    inside = (local >= 0) & (local < c)  # [B]
    gt_mask = torch.zeros_like(scores, dtype=torch.bool)
    gt_mask[inside, local[inside]] = True
    loss = -scores[gt_mask].sum() / B
    if also_minimize:
        loss = loss + scores.masked_fill(gt_mask, 0.0).sum() / (B * K)
    return loss


def coop_expl_loss(backbone, image_features: torch.Tensor, embeds: torch.Tensor, eot_index: torch.Tensor,
                   name_mask: torch.Tensor, labels: torch.Tensor, *, also_minimize: bool = True, start_layer: int = 0,
                   score: str = "logit", chunk_size: int | None = None,
                   params: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """NTLB loss for a batch.  image_features [B, D] (normalised, computed once per image), embeds [C, L, W] prompt
    embeddings, eot_index [C], name_mask [C, L], labels [B].

    Returns (loss, scores [B, C] detached, text_features [C, D] attached or None).
    chunk_size None / >= C: one pass; the loss is an ordinary attached scalar and the prompts' text features are
    returned for the CE term.  Smaller chunk_size: for each chunk of classes the gradient of its part w.r.t.
    ``params`` (the learned tensors, e.g. the prompt context) is taken and the chunk's graph freed; the returned loss
    is a surrogate with the exact value and exactly that gradient; text features are None (encode them for CE).
    """
    image_features = image_features.detach().float()
    embeds = embeds.float()  # prompt parameters are fp32; an fp16/bf16 copy would quantise the learned context
    C = embeds.shape[0]
    if not chunk_size or chunk_size >= C:
        with _fp32(embeds):
            rel, text_feats = text_relevance_from_embeddings(backbone, image_features, embeds, eot_index,
                                                             start_layer=start_layer, create_graph=False, score=score)
        scores = classname_scores(rel, eot_index, name_mask)  # [B, C]
        return ntlb_expl_loss(scores, labels, also_minimize), scores.detach(), text_feats
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("coop_expl_loss with chunk_size < C needs `params` (the learned tensors) to differentiate.")
    grads = [torch.zeros_like(p) for p in params]
    total = embeds.new_zeros((), dtype=torch.float32)
    all_scores = []
    for lo in range(0, C, chunk_size):
        hi = min(lo + chunk_size, C)
        with _fp32(embeds):
            rel, _ = text_relevance_from_embeddings(backbone, image_features, embeds[lo:hi], eot_index[lo:hi],
                                                    start_layer=start_layer, create_graph=False, score=score)
        scores = classname_scores(rel, eot_index[lo:hi], name_mask[lo:hi])  # [B, c]
        part = _chunk_loss(scores, labels, lo, C, also_minimize)
        for g, d in zip(grads, torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)):
            if d is not None:
                g += d
        total = total + part.detach()
        all_scores.append(scores.detach())
    linear = sum((p * g).sum() for p, g in zip(params, grads))  # d/dp = g
    return linear - linear.detach() + total, torch.cat(all_scores, dim=1), None
