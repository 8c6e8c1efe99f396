"""Chefer et al. (ICCV 2021) gradient-weighted attention relevance for open_clip's text and image towers.

The rule (spec ntlb_coop.md §1.1): for a scalar ``y`` and the post-softmax attention probabilities ``A_l``
(shape [B, H, N, N]) of the layers ``l >= start_layer``::

    Abar_l = mean_h clamp(dy/dA_l * A_l, min=0)          # [B, N, N]
    R_0 = I,   R_l = R_{l-1} + Abar_l @ R_{l-1}           # [B, N, N], kept in fp32

and the explained row of ``R`` is read: the EOT row for text, the CLS row (without the CLS column) for images.

Public API (names are fixed; other methods code against them)::

    with capture_attention(backbone.model, towers=("text", "visual")) as store: ...   # store.probs["text"]: list of [B,H,N,N]
    text_relevance(backbone, images, tokens)                  -> [B, C, L]   EOT row, all text layers by default
    image_relevance(backbone, images, tokens)                 -> [B, C, N]   CLS row over the N patches, last layer by default
    encode_text_from_embeddings(backbone, embeds, eot_index)  -> [C, D]      (CoOp: learned prompt embeddings)
    text_relevance_from_embeddings(backbone, image_features, embeds, eot_index) -> ([B, C, L], [C, D])
    normalise_token_relevance(rel, eot_index, mode)           -> per-application normalisation (spec §1.6)
    word_relevance(token_relevance, tokens, tokenizer, texts) -> word scores (max over a word's tokens)
    word_token_spans(tokenizer, text)                          -> [(word, start, end)] token positions of each word

Batching (spec §1.8): the text tower runs once on the C texts; for a fixed image b, ``y_b = sum_c s(x_b, t_c)`` gives
the per-text gradients of all C texts in one backward (texts do not interact), so text relevance costs one text
forward plus B backward passes.  Image relevance runs the image tower once on the B images and does one backward per
text with ``y_c = sum_b s(x_b, t_c)``.  Two exact shortcuts make it cheaper still:
  * only the explained row is needed, so it is propagated as a row vector, ``r <- r + r @ Abar_l`` from the last layer
    down to ``start_layer`` (same value as reading the row of the full product, O(N^2) per layer instead of O(N^3));
  * with the causal text mask, tokens after the last EOT of a chunk cannot influence any EOT feature, so the text
    sequence is cut to ``max(eot) + 1`` tokens (relevance there is exactly 0 and is padded back).
"""
from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Tower = Literal["text", "visual"]
Score = Literal["logit", "cosine"]
TOWERS: tuple[str, ...] = ("text", "visual")
NORMALISATIONS: tuple[str, ...] = ("none", "sum", "coop", "styleclip", "fusedream", "interpret")

__all__ = [
    "RelevanceError", "AttentionStore", "capture_attention", "text_relevance", "image_relevance",
    "encode_text_from_embeddings", "text_relevance_from_embeddings", "text_eot_index", "rollout_row",
    "normalise_token_relevance", "word_token_spans", "word_relevance", "words_token_mask", "patch_grid",
]


class RelevanceError(RuntimeError):
    """Raised for models / inputs the relevance engine cannot handle; the message says what and why."""


# ================================================================================================ capture
@dataclass
class AttentionStore:
    """Live attention probabilities recorded during a forward, per tower, in block order.

    ``probs["text"][l]`` is the softmax output of text block l, shape [B, H, N, N]; it is the very tensor multiplied
    by V, so ``torch.autograd.grad(y, store.probs["text"])`` works.  Every forward inside the context appends, call
    ``clear()`` between forwards (the relevance functions do this themselves).
    """

    probs: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {t: [] for t in TOWERS})

    def clear(self) -> None:
        for t in self.probs:
            self.probs[t] = []

    def __getitem__(self, tower: str) -> list[torch.Tensor]:
        return self.probs[tower]


def _unwrap(backbone) -> nn.Module:
    """ClipBackbone | open_clip CLIP -> the open_clip model."""
    model = getattr(backbone, "model", backbone)
    if not isinstance(model, nn.Module):
        raise RelevanceError(f"Expected a ClipBackbone or an open_clip model, got {type(backbone).__name__}.")
    return model


def _tower_transformer(model: nn.Module, tower: str) -> nn.Module:
    if tower == "text":
        if hasattr(model, "text") and hasattr(model.text, "transformer"):  # CustomTextCLIP
            return model.text.transformer
        if hasattr(model, "transformer"):  # CLIP
            return model.transformer
        raise RelevanceError(f"{type(model).__name__} has no text transformer (looked for .transformer / .text.transformer).")
    if tower == "visual":
        visual = getattr(model, "visual", None)
        if visual is None:
            raise RelevanceError(f"{type(model).__name__} has no .visual tower.")
        trunk = getattr(visual, "transformer", None)
        if trunk is None or not hasattr(trunk, "resblocks"):
            raise RelevanceError(
                f"Unsupported visual tower {type(visual).__name__}: attention relevance needs a ViT "
                f"(open_clip VisionTransformer with .transformer.resblocks); CNN towers such as ModifiedResNet or "
                f"timm towers have no attention probabilities to explain.")
        return trunk
    raise RelevanceError(f"Unknown tower {tower!r}; expected one of {TOWERS}.")


def _check_block(block: nn.Module, tower: str, index: int) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    where = f"{tower} block {index}"
    if type(block) is not ResidualAttentionBlock:
        raise RelevanceError(
            f"Unsupported attention block type {type(block).__module__}.{type(block).__qualname__} at {where}: "
            f"attention capture supports open_clip.transformer.ResidualAttentionBlock only (blocks built with "
            f"qk_norm / scale_attn / scale_heads options are CustomResidualAttentionBlock and are not supported).")
    mha = block.attn
    if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise RelevanceError(f"Unsupported attention module {type(mha).__name__} in {where} "
                             f"(need nn.MultiheadAttention with a packed in_proj_weight).")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise RelevanceError(f"Unsupported nn.MultiheadAttention options in {where} (add_bias_kv / add_zero_attn).")


def _explicit_attention(block: nn.Module, store: AttentionStore, tower: str, q_x: torch.Tensor,
                        k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                        attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stand-in for ResidualAttentionBlock.attention that keeps the live softmax probabilities."""
    if k_x is not None or v_x is not None:
        raise RelevanceError(f"Cross-attention in a {tower} block is not supported by capture_attention.")
    mha: nn.MultiheadAttention = block.attn
    x = q_x if mha.batch_first else q_x.transpose(0, 1)  # [B, N, W]
    B, N, W = x.shape
    H = mha.num_heads
    d = W // H
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)  # [B, N, 3W]
    q, k, v = (t.reshape(B, N, H, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # [B, H, N, d] each
    scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)  # [B, H, N, N]
    if attn_mask is not None:
        mask = attn_mask
        if mask.dim() == 3:  # [B*H, N, N] (MultiheadAttention convention)
            mask = mask.reshape(B, H, N, N)
        if mask.dtype == torch.bool:  # True = not allowed
            scores = scores.masked_fill(mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)  # [B, H, N, N]
    store.probs[tower].append(probs)
    if mha.training and mha.dropout > 0:
        probs = F.dropout(probs, p=mha.dropout)
    out = (probs @ v).transpose(1, 2).reshape(B, N, W)  # [B, N, W]
    out = mha.out_proj(out)
    return out if mha.batch_first else out.transpose(0, 1)


@contextlib.contextmanager
def capture_attention(model, towers: Sequence[str] | str = TOWERS) -> Iterator[AttentionStore]:
    """Swap every attention call of the chosen towers for an explicit one that records the probabilities.

    ``model``: ClipBackbone or open_clip CLIP / CustomTextCLIP.  ``towers``: "text", "visual" or both.
    On exit the blocks get their stock (fused) attention back, also when the body raised.
    Outputs equal the stock forward up to float rounding (~1e-7 in fp32).
    """
    model = _unwrap(model)
    towers = (towers,) if isinstance(towers, str) else tuple(towers)
    store = AttentionStore()
    patched: list[nn.Module] = []
    # validate everything before patching anything
    plan: list[tuple[str, nn.Module]] = []
    for tower in towers:
        trunk = _tower_transformer(model, tower)
        if getattr(trunk, "grad_checkpointing", False):
            raise RelevanceError(f"Gradient checkpointing is enabled on the {tower} tower; disable it "
                                 f"(model.set_grad_checkpointing(False)) for attention relevance.")
        for i, blk in enumerate(trunk.resblocks):
            _check_block(blk, tower, i)
            if "attention" in vars(blk):
                raise RelevanceError(f"{tower} block {i} is already being captured (nested capture_attention).")
            plan.append((tower, blk))
    try:
        for tower, blk in plan:
            def attention(self, q_x, k_x=None, v_x=None, attn_mask=None, _tower=tower):
                return _explicit_attention(self, store, _tower, q_x, k_x, v_x, attn_mask)

            blk.attention = types.MethodType(attention, blk)
            patched.append(blk)
        yield store
    finally:
        for blk in patched:
            del blk.attention  # the class method (stock fused attention) is visible again


# ================================================================================================ text tower
@dataclass
class _TextParts:
    token_embedding: nn.Module
    positional_embedding: torch.Tensor  # [ctx, W]
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Module | None
    attn_mask: torch.Tensor | None  # [ctx, ctx] additive causal mask
    pool_type: str
    eos_id: int | None
    cast_dtype: torch.dtype


def _text_parts(model: nn.Module) -> _TextParts:
    src = model.text if hasattr(model, "text") and hasattr(model.text, "transformer") else model
    if getattr(src, "cls_emb", None) is not None:
        raise RelevanceError("Text towers with an appended class token (CoCa-style cls_emb) are not supported.")
    if getattr(src, "use_pad_mask", False):
        raise RelevanceError("Text towers with a padding mask (use_pad_mask) are not supported.")
    pool = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
    if pool not in ("argmax", "eos", "last", "first"):
        raise RelevanceError(f"Unsupported text pool type {pool!r} (need argmax / eos / last / first).")
    return _TextParts(src.token_embedding, src.positional_embedding, src.transformer, src.ln_final,
                      src.text_projection, getattr(src, "attn_mask", None), pool,
                      getattr(src, "text_eos_id", None) or getattr(src, "eos_id", None),
                      src.transformer.get_cast_dtype())


def text_eot_index(backbone, tokens: torch.Tensor) -> torch.Tensor:
    """[C, L] token ids -> [C] index of the token open_clip pools (EOT for OpenAI-style models)."""
    parts = _text_parts(_unwrap(backbone))
    if tokens.dim() != 2:
        raise RelevanceError(f"tokens must be [C, L] token ids, got shape {tuple(tokens.shape)}.")
    if parts.pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if parts.pool_type == "eos":
        return (tokens == parts.eos_id).int().argmax(dim=-1)
    if parts.pool_type == "last":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


def encode_text_from_embeddings(backbone, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """Text features from token embeddings, exactly as open_clip's encode_text (unnormalised).

    embeds: [C, L, W] token embeddings *before* the positional embedding (L <= context_length; shorter
    sequences use the first L positions and the top-left L x L causal mask, which is exact for a causal tower as
    long as every pooled index is < L).  eot_index: [C] pooled position.  Returns [C, D].
    """
    parts = _text_parts(_unwrap(backbone))
    if embeds.dim() != 3:
        raise RelevanceError(f"embeds must be [C, L, W], got shape {tuple(embeds.shape)}.")
    C, L, W = embeds.shape
    ctx = parts.positional_embedding.shape[0]
    if L > ctx:
        raise RelevanceError(f"embeds have {L} positions but the text tower's context length is {ctx}.")
    eot_index = torch.as_tensor(eot_index, device=embeds.device).long().reshape(-1)
    if eot_index.shape[0] != C or (eot_index.numel() and (int(eot_index.max()) >= L or int(eot_index.min()) < 0)):
        raise RelevanceError(f"eot_index must hold {C} positions in [0, {L}), got {eot_index.tolist()[:8]}.")
    x = embeds.to(parts.cast_dtype) + parts.positional_embedding[:L].to(parts.cast_dtype)  # [C, L, W]
    mask = parts.attn_mask[:L, :L] if parts.attn_mask is not None else None
    x = parts.transformer(x, attn_mask=mask)  # [C, L, W]
    x = parts.ln_final(x)
    x = x[torch.arange(C, device=x.device), eot_index]  # [C, W]
    proj = parts.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Module) else x @ proj  # [C, D]


# ================================================================================================ rule
def rollout_row(probs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], row: torch.Tensor | int) -> torch.Tensor:
    """Row ``row`` of R = prod_l (I + Abar_l) (layers in forward order), in fp32.

    probs / grads: per layer [B, H, N, N]; row: int or [B] index.  Returns [B, N].
    Equivalent to reading R[row] after ``R_l = R_{l-1} + Abar_l @ R_{l-1}``; computed as a row vector
    propagated from the last layer down.
    """
    B, _, N, _ = probs[0].shape
    device = probs[0].device
    rows = torch.as_tensor(row, device=device).long().expand(B) if not isinstance(row, torch.Tensor) or row.dim() == 0 \
        else row.to(device).long()
    dtype = torch.promote_types(probs[0].dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays fp64
    r = F.one_hot(rows, N).to(dtype)  # [B, N]
    for A, G in zip(reversed(list(probs)), reversed(list(grads))):
        abar = (G.to(dtype) * A.to(dtype)).clamp(min=0).mean(dim=1)  # [B, N, N]
        r = r + (r.unsqueeze(1) @ abar).squeeze(1)  # [B, N]
    return r


def _resolve_start(start_layer: int, n_layers: int, tower: str) -> int:
    s = start_layer + n_layers if start_layer < 0 else start_layer
    if not 0 <= s < n_layers:
        raise RelevanceError(f"start_layer={start_layer} is out of range for the {tower} tower with {n_layers} layers "
                             f"(use 0..{n_layers - 1} or -{n_layers}..-1).")
    return s


def _scale(model: nn.Module, score: str) -> torch.Tensor | float:
    if score == "logit":
        return model.logit_scale.exp()
    if score == "cosine":
        return 1.0
    raise RelevanceError(f"score must be 'logit' (logit_scale * cos, as the reference) or 'cosine', got {score!r}.")


def _chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is not None and chunk_size < 1:
        raise RelevanceError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
    step = n if not chunk_size else chunk_size
    return [(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


def _text_relevance_chunk(model: nn.Module, image_features: torch.Tensor, embeds: torch.Tensor,
                          eot_index: torch.Tensor, start_layer: int, create_graph: bool,
                          score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of texts: ([B, C, L] relevance, [C, D] text features)."""
    C, L, _ = embeds.shape
    causal = _text_parts(model).attn_mask is not None
    L_used = int(eot_index.max()) + 1 if causal else L  # causal tower: later tokens never reach a pooled index
    if not embeds.requires_grad:  # frozen tower: give autograd a leaf so the probabilities join the graph
        embeds = embeds.detach().requires_grad_(True)
    with capture_attention(model, ("text",)) as store:
        text_features = encode_text_from_embeddings(model, embeds[:, :L_used], eot_index)  # [C, D]
    probs = store.probs["text"]  # per layer [C, H, L_used, L_used]
    s0 = _resolve_start(start_layer, len(probs), "text")
    probs = probs[s0:]
    t_hat = F.normalize(text_features, dim=-1)
    sims = _scale(model, score) * (image_features @ t_hat.T)  # [B, C]
    if not all(p.requires_grad for p in probs):
        raise RelevanceError("Attention probabilities do not require grad: call the relevance functions with "
                             "gradients enabled (not under torch.no_grad / inference_mode).")
    rows = []
    for b in range(sims.shape[0]):
        grads = torch.autograd.grad(sims[b].sum(), probs, retain_graph=True, create_graph=create_graph)
        if not create_graph:
            grads = [g.detach() for g in grads]
        rows.append(rollout_row(probs, grads, eot_index))  # [C, L_used]
    rel = torch.stack(rows, dim=0)  # [B, C, L_used]
    if L_used < L:
        rel = F.pad(rel, (0, L - L_used))  # [B, C, L]
    return rel, text_features


def text_relevance_from_embeddings(backbone, image_features: torch.Tensor, embeds: torch.Tensor,
                                   eot_index: torch.Tensor, *, start_layer: int = 0, create_graph: bool = False,
                                   score: Score = "logit", chunk_size: int | None = None,
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Text relevance for learned prompts (CoOp) built from embeddings.

    image_features: [B, D] L2-normalised image features (detach them unless gradients should reach the image;
        they only matter through G = dy/dA when create_graph=True).
    embeds: [C, L, W] token embeddings before the positional embedding; eot_index: [C] pooled position.
    Returns (relevance [B, C, L] = EOT row of R for y = score(x_b, t_c), text features [C, D] unnormalised).

    create_graph=False (CoOp / NTLB, spec §1.7): G is a constant, the attention probabilities A stay attached, so a
    loss on the relevance reaches ``embeds`` through A and the products in R (first-order path).
    create_graph=True: G is differentiable as well (second-order; StyleCLIP / FuseDream).
    chunk_size: texts per text-tower pass (None = all at once).  Each chunk keeps its own graph when the result is
    attached, so chunking bounds peak memory only for detached use.
    """
    model = _unwrap(backbone)
    if image_features.dim() != 2:
        raise RelevanceError(f"image_features must be [B, D], got shape {tuple(image_features.shape)}.")
    eot_index = torch.as_tensor(eot_index, device=embeds.device).long().reshape(-1)
    if embeds.dim() != 3 or eot_index.shape[0] != embeds.shape[0]:
        raise RelevanceError(f"embeds must be [C, L, W] with one eot_index per text; got embeds "
                             f"{tuple(embeds.shape)} and eot_index {tuple(eot_index.shape)}.")
    rels, feats = [], []
    with torch.enable_grad():
        for lo, hi in _chunks(embeds.shape[0], chunk_size):
            r, f = _text_relevance_chunk(model, image_features, embeds[lo:hi], eot_index[lo:hi], start_layer,
                                         create_graph, score)
            rels.append(r)
            feats.append(f)
    return torch.cat(rels, dim=1), torch.cat(feats, dim=0)


def _image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4:
        raise RelevanceError(f"images must be [B, 3, H, W] CLIP-normalised pixels, got shape {tuple(images.shape)}.")
    return F.normalize(model.encode_image(images), dim=-1)  # [B, D]


def text_relevance(backbone, images: torch.Tensor, tokens: torch.Tensor, *, start_layer: int = 0,
                   create_graph: bool = False, score: Score = "logit", chunk_size: int | None = 256) -> torch.Tensor:
    """EOT-row text relevance for every (image, text) pair: [B, 3, H, W] x [C, L] -> [B, C, L] (fp32).

    ``y = logit_scale.exp() * cos(image_b, text_c)`` by default (as T's notebook, CoOp loss, StyleCLIP EGCLIPLoss);
    ``score="cosine"`` uses the raw cosine (FuseDream explainability_loss).  The scale is not a no-op: it changes the
    mix of first- and higher-order terms of R (spec §1.3).  start_layer=0 uses all text layers (NTLB's choice for
    its losses); Chefer's CLIP notebook (HEAD) uses the last text layer only: pass start_layer=-1 to match it.
    Negative values count from the end (-1 = last layer only).
    create_graph=False returns a result whose graph reaches the text token embeddings only through A (the image
    features are detached); create_graph=True keeps G differentiable so gradients also reach the image pixels.
    Wrap in torch.no_grad()-free code; for plain visualisation call ``.detach()`` on the result.
    """
    model = _unwrap(backbone)
    if tokens.dim() != 2:
        raise RelevanceError(f"tokens must be [C, L] token ids, got shape {tuple(tokens.shape)}.")
    parts = _text_parts(model)
    eot = text_eot_index(model, tokens)
    with torch.enable_grad():
        if create_graph:
            img = _image_features(model, images)
        else:
            with torch.no_grad():
                img = _image_features(model, images)
        rels = []
        for lo, hi in _chunks(tokens.shape[0], chunk_size):
            embeds = parts.token_embedding(tokens[lo:hi])  # [c, L, W]
            r, _ = _text_relevance_chunk(model, img, embeds, eot[lo:hi], start_layer, create_graph, score)
            attached = embeds.requires_grad or (create_graph and img.requires_grad)
            rels.append(r if attached else r.detach())
    return torch.cat(rels, dim=1)  # [B, C, L]


# ================================================================================================ image tower
def _check_visual_pool(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    _tower_transformer(model, "visual")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" \
            or getattr(visual, "class_embedding", None) is None:
        raise RelevanceError(f"Image relevance reads the CLS row; {type(visual).__name__} pools with "
                             f"pool_type={getattr(visual, 'pool_type', None)!r} / attentional pooling, "
                             f"which is not supported.")
    return visual


def patch_grid(backbone) -> tuple[int, int]:
    """(rows, cols) of the image tower's patch grid, e.g. (7, 7) for ViT-B/32 at 224 px."""
    visual = _check_visual_pool(_unwrap(backbone))
    gs = visual.grid_size
    return (int(gs[0]), int(gs[1])) if isinstance(gs, (tuple, list)) else (int(gs), int(gs))


def image_relevance(backbone, images: torch.Tensor, tokens: torch.Tensor | None = None, *, start_layer: int = -1,
                    create_graph: bool = False, score: Score = "logit", chunk_size: int | None = 256,
                    text_features: torch.Tensor | None = None) -> torch.Tensor:
    """CLS-row image relevance over the N patches for every pair: -> [B, C, N] (fp32, CLS column dropped).

    Reshape with ``rel.reshape(B, C, *patch_grid(backbone))``.  start_layer=-1 (default) uses only the last layer
    (T's notebook HEAD and NTLB's spatial conditioning); 0 uses all layers.  Pass ``text_features`` ([C, D],
    normalised or not) instead of ``tokens`` to explain against precomputed / learned texts.
    y = logit_scale * cos by default; ``score="cosine"`` for VQGAN spatial conditioning (spec §4.3).
    create_graph=True keeps G differentiable so a loss on the map reaches the pixels through both A and G.
    """
    model = _unwrap(backbone)
    _check_visual_pool(model)
    if (tokens is None) == (text_features is None):
        raise RelevanceError("Pass exactly one of tokens [C, L] or text_features [C, D].")
    with torch.enable_grad():
        if text_features is None:
            if tokens.dim() != 2:
                raise RelevanceError(f"tokens must be [C, L] token ids, got shape {tuple(tokens.shape)}.")
            ctx = contextlib.nullcontext() if create_graph else torch.no_grad()
            with ctx:
                text_features = model.encode_text(tokens)
        t_hat = F.normalize(text_features, dim=-1)  # [C, D]
        if images.dim() != 4:
            raise RelevanceError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}.")
        pixels = images if images.requires_grad else images.detach().requires_grad_(True)
        with capture_attention(model, ("visual",)) as store:
            img = _image_features(model, pixels)  # [B, D]
        probs = store.probs["visual"]  # per layer [B, H, N+1, N+1]
        s0 = _resolve_start(start_layer, len(probs), "visual")
        probs = probs[s0:]
        if not all(p.requires_grad for p in probs):
            raise RelevanceError("Attention probabilities do not require grad: call image_relevance with gradients "
                                 "enabled (not under torch.no_grad / inference_mode).")
        scale = _scale(model, score)
        out = []
        for lo, hi in _chunks(t_hat.shape[0], chunk_size):
            sims = scale * (img @ t_hat[lo:hi].T)  # [B, c]
            for c in range(hi - lo):
                grads = torch.autograd.grad(sims[:, c].sum(), probs, retain_graph=True, create_graph=create_graph)
                if not create_graph:
                    grads = [g.detach() for g in grads]
                out.append(rollout_row(probs, grads, 0)[:, 1:])  # [B, N]
    rel = torch.stack(out, dim=1)  # [B, C, N]
    attached = images.requires_grad or any(p.requires_grad for p in model.visual.parameters()) or \
        (create_graph and text_features.requires_grad)
    return rel if attached else rel.detach()


# ================================================================================================ words
def normalise_token_relevance(rel: torch.Tensor, eot_index: torch.Tensor | int, mode: str = "coop") -> torch.Tensor:
    """Per-application normalisation of EOT-row relevance (spec §1.6). rel: [..., L]; eot_index: [...] or int.

    Returns [..., L] with zeros at the dropped positions:
      "coop":      r = R[eot, :], r[eot] = 0, r / sum r (SOS stays in the denominator)
      "styleclip": r = R[eot, 1:eot], r / sum r
      "fusedream": diagonal zeroed, r = R[eot, 1:eot], r / sum r, then r / max r   (FuseDream explainability_loss)
      "interpret": r = R[eot, 1:eot], r / sum, r / max (FuseDream interpret; identical to "fusedream" because the
                   only diagonal entry of the EOT row is R[eot, eot], which 1:eot drops anyway)
      "sum":       r / sum r over all positions;   "none": unchanged.
    """
    if mode not in NORMALISATIONS:
        raise RelevanceError(f"Unknown normalisation {mode!r}; expected one of {NORMALISATIONS}.")
    if mode == "none":
        return rel
    L = rel.shape[-1]
    pos = torch.arange(L, device=rel.device)  # [L]
    eot = torch.as_tensor(eot_index, device=rel.device).long().unsqueeze(-1)  # [..., 1]
    eps = torch.finfo(rel.dtype).tiny
    if mode == "sum":
        return rel / rel.sum(-1, keepdim=True).clamp_min(eps)
    if mode == "coop":
        keep = pos != eot
    else:
        keep = (pos >= 1) & (pos < eot)
    r = rel * keep.to(rel.dtype)
    r = r / r.sum(-1, keepdim=True).clamp_min(eps)
    if mode in ("fusedream", "interpret"):
        r = r / r.amax(-1, keepdim=True).clamp_min(eps)
    return r


@dataclass(frozen=True)
class WordSpan:
    word: str
    start: int  # first token position in the tokenised text (SOS is position 0)
    end: int  # one past the last token position


def _encode(tokenizer, text: str) -> list[int]:
    inner = getattr(tokenizer, "tokenizer", None)  # some wrappers keep the BPE in .tokenizer
    for t in (tokenizer, inner):
        if t is not None and hasattr(t, "encode") and not isinstance(t, nn.Module):
            try:
                return list(t.encode(text))
            except TypeError:
                pass
    ids = tokenizer([text])[0].tolist()  # fall back on the full call: strip SOS ... EOT
    eot = max(range(len(ids)), key=lambda i: ids[i])
    return ids[1:eot]


def word_token_spans(tokenizer, text: str, tokens: torch.Tensor | None = None) -> list[WordSpan]:
    """Map each whitespace-separated word of ``text`` to its token positions.

    Each word is encoded on its own with the tokenizer's BPE; the per-word encodings must concatenate to the encoding
    of the whole text (and to ``tokens[1:eot]`` when ``tokens`` [L] is given), otherwise a RelevanceError names the
    first word where they diverge.  Punctuation glued to a word belongs to that word ("hair." -> [hair, .]).
    """
    words = text.split()
    pieces = [_encode(tokenizer, w) for w in words]
    whole = _encode(tokenizer, text)
    flat = [i for p in pieces for i in p]
    if tokens is not None:
        ids = tokens.tolist()
        eot = max(range(len(ids)), key=lambda i: ids[i])
        reference = ids[1:eot]
        if whole[:len(reference)] != reference:
            raise RelevanceError(f"tokens do not encode {text!r} (tokens hold {len(reference)} ids between SOS and "
                                 f"EOT, the tokenizer gives {len(whole)}); pass the tokens of this very text.")
    if flat != whole:
        acc = 0
        for w, p in zip(words, pieces):
            if whole[acc:acc + len(p)] != p:
                raise RelevanceError(
                    f"Cannot align word {w!r} of {text!r} with its tokens: encoding it alone gives {p}, but the "
                    f"sentence has {whole[acc:acc + len(p)]} at token positions {acc + 1}..{acc + len(p)}. "
                    f"Separate punctuation / special characters from words with spaces.")
            acc += len(p)
        raise RelevanceError(f"Per-word encodings of {text!r} ({len(flat)} tokens) do not add up to the sentence "
                             f"({len(whole)} tokens).")
    spans, pos = [], 1
    for w, p in zip(words, pieces):
        spans.append(WordSpan(w, pos, pos + len(p)))
        pos += len(p)
    return spans


def words_token_mask(tokenizer, text: str, words: Sequence[int] | Sequence[str], length: int) -> torch.Tensor:
    """Bool [length] mask of the token positions of the chosen words (indices or word strings) of ``text``."""
    spans = word_token_spans(tokenizer, text)
    mask = torch.zeros(length, dtype=torch.bool)
    for w in words:
        hits = [s for i, s in enumerate(spans) if (i == w if isinstance(w, int) else s.word == w)]
        if not hits:
            raise RelevanceError(f"Word {w!r} is not in {text!r} (words: {[s.word for s in spans]}).")
        for s in hits:
            if s.end > length:
                raise RelevanceError(f"Word {s.word!r} ends at token {s.end} beyond length {length}.")
            mask[s.start:s.end] = True
    return mask


def word_relevance(token_relevance: torch.Tensor, tokens: torch.Tensor, tokenizer, texts: str | Sequence[str], *,
                   normalise: str = "none", reduce: str = "max",
                   ) -> tuple[torch.Tensor, list[WordSpan]] | list[tuple[torch.Tensor, list[WordSpan]]]:
    """Word-level scores from token relevance (differentiable).

    Single text: token_relevance [..., L], tokens [L], texts str -> (scores [..., n_words], spans).
    Several texts: token_relevance [..., C, L] (e.g. [B, C, L] from text_relevance), tokens [C, L], texts of length C
    -> list of C (scores [..., n_words_c], spans).
    ``normalise`` is applied first (see normalise_token_relevance: "coop" | "styleclip" | "fusedream" | "interpret"
    | "sum" | "none"); ``reduce`` combines a word's tokens: "max" (CoOp, FuseDream), "mean" or "sum".
    """
    if reduce not in ("max", "mean", "sum"):
        raise RelevanceError(f"reduce must be 'max', 'mean' or 'sum', got {reduce!r}.")
    if isinstance(texts, str):
        if tokens.dim() != 1:
            raise RelevanceError(f"With one text, tokens must be [L], got {tuple(tokens.shape)}.")
        return _word_scores(token_relevance, tokens, tokenizer, texts, normalise, reduce)
    texts = list(texts)
    if tokens.dim() != 2 or tokens.shape[0] != len(texts) or token_relevance.shape[-2] != len(texts):
        raise RelevanceError(f"Expected tokens [C, L] and token_relevance [..., C, L] with C = {len(texts)} texts; got "
                             f"tokens {tuple(tokens.shape)}, relevance {tuple(token_relevance.shape)}.")
    return [_word_scores(token_relevance[..., c, :], tokens[c], tokenizer, t, normalise, reduce)
            for c, t in enumerate(texts)]


def _word_scores(rel: torch.Tensor, tokens: torch.Tensor, tokenizer, text: str, normalise: str,
                 reduce: str) -> tuple[torch.Tensor, list[WordSpan]]:
    if rel.shape[-1] != tokens.shape[-1]:
        raise RelevanceError(f"token_relevance has {rel.shape[-1]} positions but tokens have {tokens.shape[-1]}.")
    eot = int(tokens.argmax())
    rel = normalise_token_relevance(rel, eot, normalise)
    spans = word_token_spans(tokenizer, text, tokens.cpu())
    cols = []
    for s in spans:
        seg = rel[..., s.start:s.end]  # [..., n_tokens]
        cols.append(seg.amax(-1) if reduce == "max" else seg.mean(-1) if reduce == "mean" else seg.sum(-1))
    scores = torch.stack(cols, dim=-1) if cols else rel.new_zeros(rel.shape[:-1] + (0,))
    return scores, spans
