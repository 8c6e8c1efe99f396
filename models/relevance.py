"""Chefer et al. (ICCV 2021) gradient-weighted attention relevance for open_clip's text and image towers.

The rule (spec ntlb_coop.md §1.1): for a scalar ``y`` and the post-softmax attention probabilities ``A_l``
(shape [B, H, N, N]) of the layers ``l >= start_layer``::

    Abar_l = mean_h clamp(dy/dA_l * A_l, min=0)          # [B, N, N]
    R_0 = I,   R_l = R_{l-1} + Abar_l @ R_{l-1}           # [B, N, N], kept in fp32

and the explained row of ``R`` is read: the EOT row for text, the CLS row (without the CLS column) for images.

Public API (names are fixed; other methods code against them)::

    relevance(backbone, images, tokens, towers=("text", "visual"), start_layer_text=0, start_layer_image=-1)
        -> Relevance(text [B, C, L], image [B, C, N], similarity [B, C], text_features, image_features)
    text_relevance(backbone, images, tokens)                  -> [B, C, L]   view: towers=("text",)
    image_relevance(backbone, images, tokens)                 -> [B, C, N]   view: towers=("visual",)
    text_relevance_from_embeddings(backbone, image_features, embeds, eot_index) -> ([B, C, L], [C, D])  (CoOp)
    with capture_attention(backbone.model, towers=("text", "visual")) as store: ...   # store.probs["text"]: list of [B,H,N,N]
    encode_text_from_embeddings(backbone, embeds, eot_index)  -> [C, D]      (CoOp: learned prompt embeddings)
    normalise_token_relevance(rel, eot_index, mode)           -> per-application normalisation (spec §1.6)
    word_relevance(token_relevance, tokens, tokenizer, texts) -> word scores (max over a word's tokens)
    word_token_spans(tokenizer, text)                          -> [(word, start, end)] token positions of each word

Cost (docs/relevance.md has the numbers): one forward of each tower for all B x C pairs (spec §1.8: the image is
never repeated per text); for a fixed image b, ``y_b = sum_c s(x_b, t_c)`` gives the per-text gradients of all C
texts in one backward (texts do not interact), and for a fixed text c, ``y_c = sum_b s(x_b, t_c)`` those of all B
images: B text-tower passes and C image-tower passes, each run as one vmapped backward (``is_grads_batched``), or,
when the tower is frozen and nothing is differentiated twice (every visualisation), as a hand-written batched
backward of the block stack fused with the rollout (section "frozen backward").
Exact shortcuts:
  * backward no deeper than the start layer: blocks below it run without a graph (under no_grad) when nothing
    upstream needs grad, and the probabilities of the first captured block are the graph's leaves;
  * the last block is computed for the pooled token only (CLS / EOT: K and V for all tokens, the rest for one), and
    only the explained row of R is propagated, as a row vector ``r <- r + r @ Abar_l`` from the last layer down;
  * with the causal text mask, tokens after the last EOT of a chunk cannot influence any EOT feature, so the text
    sequence is cut to ``max(eot) + 1`` tokens (relevance there is exactly 0 and is padded back).
Memory: the graph held at once is one chunk of ``chunk_size`` texts (plus the B images); one batched backward holds
at most ``chunk_size x context_length`` token rows of activations.
"""
from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Tower = Literal["text", "visual"]
Score = Literal["logit", "cosine"]
TOWERS: tuple[str, ...] = ("text", "visual")
NORMALISATIONS: tuple[str, ...] = ("none", "sum", "coop", "styleclip", "fusedream", "interpret")

__all__ = [
    "RelevanceError", "AttentionStore", "capture_attention", "Relevance", "relevance", "text_relevance", "image_relevance",
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
    return _engine_attention(block, store.probs[tower], q_x, attn_mask, fused=False)


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


# ================================================================================================ fast towers
# The relevance engine runs each tower with its blocks swapped (instance attribute ``forward``) for one of:
#   skip     blocks below start_layer when nothing upstream needs grad: under no_grad, fused attention
#            (F.scaled_dot_product_attention: no probabilities are needed there);
#   plain    blocks below start_layer otherwise: explicit attention, probabilities not kept;
#   capture  explicit attention, probabilities kept (when the tower is depth-limited, the first captured block
#            computes q, k, v and the softmax without a graph and its probabilities are the graph's leaves, so the
#            backward stops there);
#   pooled   the last block when only the pooled row (CLS / EOT) is read: K and V for every token, Q, the attention
#            row, out-projection and MLP for the pooled token only; every output row holds the pooled row's value
#            (downstream only the pooled row is read), and the kept probabilities are that row: [n, H, 1, N].
# All modes compute the same function as the stock block (to float rounding).  Kernel choices, measured at 1 thread
# on ViT-B/32 shapes (docs/relevance.md): where no autograd graph is recorded (the blocks below the start layer,
# the patch embedding) a linear layer runs on oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``), which does
# not repack the weight on every call as MKL's sgemm does (1.6x faster at 8 rows, ~1.1-1.2x at 50-400); the
# non-overlapping patch convolution runs as one matmul over the unfolded patches (~2x).
_ONEDNN: list = []  # [op] once probed and working, [None] when unavailable


def _onednn_linear():
    if not _ONEDNN:
        op = None
        try:
            cand = torch.ops.mkldnn._linear_pointwise
            x = torch.linspace(-1, 1, 15).reshape(3, 5)  # fixed values: the probe must not touch the global RNG
            w, b = torch.linspace(-2, 1, 20).reshape(4, 5), torch.linspace(0, 1, 4)
            if torch.backends.mkldnn.is_available() and torch.allclose(cand(x, w, b, "none", [], ""),
                                                                        F.linear(x, w, b), atol=1e-5, rtol=1e-5):
                op = cand
        except (AttributeError, RuntimeError, NotImplementedError):
            op = None
        _ONEDNN.append(op)
    return _ONEDNN[0]


def _graph_free_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The oneDNN linear op when it applies here (no graph recorded, fp32 CPU, contiguous weight), else None."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if x.numel() == 0 or x.device.type != "cpu" or not x.dtype == weight.dtype == torch.float32 \
            or (bias is not None and bias.dtype != torch.float32) or not weight.is_contiguous():
        return None
    return _onednn_linear()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) (same values to float rounding); on oneDNN when no graph is recorded (see above)."""
    op = _graph_free_onednn(x, weight, bias)
    return F.linear(x, weight, bias) if op is None else op(x.contiguous(), weight, bias, "none", [], "")


class _FirstOrderGelu(torch.autograd.Function):
    """GELU (exact erf form, or open_clip's QuickGELU) whose backward is one multiply by dGELU/dx, saved in the
    forward.  Same values as the stock activation and its backward; first order only (no double backward).  Under
    the batched backward (``is_grads_batched``) the stock ``gelu_backward`` re-evaluates erf / exp for every pass
    (measured 46 ms against 21 ms for 10 passes over 8 ViT-B/32 images, per layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quick: bool) -> torch.Tensor:
        y, slope = _gelu_and_slope(x, quick)  # x * sigmoid(1.702 x) | x * Phi(x), d/dx = Phi(x) + x * phi(x)
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (slope,) = ctx.saved_tensors
        return grad * slope, None


def _activation(act: nn.Module, h: torch.Tensor, first_order: bool) -> torch.Tensor:
    if first_order and torch.is_grad_enabled() and h.requires_grad:
        from open_clip.transformer import QuickGELU

        if type(act) is QuickGELU:
            return _FirstOrderGelu.apply(h, True)
        if type(act) is nn.GELU and act.approximate == "none":
            return _FirstOrderGelu.apply(h, False)
    return act(h)


def _mlp(block: nn.Module, h: torch.Tensor, first_order: bool = False) -> torch.Tensor:
    mlp = block.mlp
    fc, act, proj = (getattr(mlp, n, None) for n in ("c_fc", "gelu", "c_proj"))
    if isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear) \
            and act is not None:
        op = _graph_free_onednn(h, fc.weight, fc.bias) if type(act) is nn.GELU else None
        if op is not None:  # linear + GELU in one oneDNN call (its erf GELU agrees with F.gelu to float rounding)
            hidden = op(h.contiguous(), fc.weight, fc.bias, "gelu", [], act.approximate)
        else:
            hidden = _activation(act, _linear(h, fc.weight, fc.bias), first_order)
        return _linear(hidden, proj.weight, proj.bias)
    return mlp(h)


def _block_tail(block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor, first_order: bool = False) -> torch.Tensor:
    x = x + block.ls_1(attn_out)
    return x + block.ls_2(_mlp(block, block.ln_2(x), first_order))


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention scores with MultiheadAttention's mask applied: boolean (True = may not attend) or additive."""
    if mask is None:
        return scores
    return scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)


def _pooled_rows(rows: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
    """The pooled query row of each of n sequences as a long tensor [n] (an int or 0-d tensor is broadcast)."""
    if not torch.is_tensor(rows) or rows.dim() == 0:
        return torch.as_tensor(rows, device=device).long().expand(n)
    return rows.to(device).long()


def _pooled_row_mask(attn_mask: torch.Tensor, H: int, rows: torch.Tensor) -> torch.Tensor:
    """The mask rows of the pooled queries: [n*H, N, N] (per sequence) or [N, N] -> [n, H | 1, 1, N]."""
    n, N = rows.shape[0], attn_mask.shape[-1]
    if attn_mask.dim() == 3:
        return attn_mask.reshape(n, H, N, N)[torch.arange(n, device=rows.device), :, rows].unsqueeze(2)
    return attn_mask[rows].reshape(n, 1, 1, N)


def _engine_attention(block: nn.Module, keep: list[torch.Tensor] | None, h: torch.Tensor,
                      attn_mask: torch.Tensor | None, fused: bool, leaf_probs: bool = False) -> torch.Tensor:
    """Attention of ``block`` on its normalised input h ([B, N, W] batch-first, or [N, B, W]).

    fused: F.scaled_dot_product_attention (no probabilities; for blocks run without a graph).  Otherwise the
    explicit softmax, whose live tensor is appended to ``keep`` when given (as ``_explicit_attention``).
    leaf_probs: the first captured block of a depth-limited tower: q, k, v and the softmax run without a graph and
    the probabilities become the graph's leaf (nothing below them is differentiated).
    """
    mha: nn.MultiheadAttention = block.attn
    x = h if mha.batch_first else h.transpose(0, 1)  # [B, N, W]
    B, N, W = x.shape
    H = mha.num_heads
    d = W // H
    mask = attn_mask
    if mask is not None and mask.dim() == 3:  # [B*H, N, N] (MultiheadAttention convention)
        mask = mask.reshape(B, H, N, N)
    dropout = mha.dropout if mha.training else 0.0
    with torch.no_grad() if leaf_probs else contextlib.nullcontext():
        qkv = _linear(x, mha.in_proj_weight, mha.in_proj_bias)  # [B, N, 3W]
        if fused:
            q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)  # [B, H, N, d] each
            if mask is not None:
                mask = ~mask if mask.dtype == torch.bool else mask.to(q.dtype)  # SDPA: True = may attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # [B, H, N, d]
        else:
            q, k, v = (t.reshape(B, N, H, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # [B, H, N, d] each
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)  # [B, H, N, N]
            probs = _masked(scores, mask).softmax(dim=-1)  # [B, H, N, N]
    if not fused:
        if leaf_probs:
            probs.requires_grad_(True)
        if keep is not None:
            keep.append(probs)
        if dropout > 0:
            probs = F.dropout(probs, p=dropout)
        out = probs @ v  # [B, H, N, d]
    out = out.transpose(1, 2).reshape(B, N, W)
    out = _linear(out, mha.out_proj.weight, mha.out_proj.bias)  # [B, N, W]
    return out if mha.batch_first else out.transpose(0, 1)


def _pooled_block(block: nn.Module, store: AttentionStore, tower: str, x: torch.Tensor, rows: torch.Tensor | int,
                  attn_mask: torch.Tensor | None, first_order: bool = False, leaf_probs: bool = False) -> torch.Tensor:
    """Last block for the pooled query rows only. x: [n, N, W] (batch-first) -> [n, N, W], every row = pooled row.

    leaf_probs: as for ``_engine_attention`` (this block is the first captured one of a depth-limited tower).
    """
    mha: nn.MultiheadAttention = block.attn
    if not mha.batch_first:
        x = x.transpose(0, 1)
    n, N, W = x.shape
    H = mha.num_heads
    d = W // H
    idx = torch.arange(n, device=x.device)
    rows = _pooled_rows(rows, n, x.device)
    with torch.no_grad() if leaf_probs else contextlib.nullcontext():
        h = block.ln_1(x)  # [n, N, W]
        b = mha.in_proj_bias
        q = _linear(h[idx, rows], mha.in_proj_weight[:W], None if b is None else b[:W]).reshape(n, H, 1, d)
        kv = _linear(h, mha.in_proj_weight[W:], None if b is None else b[W:])  # [n, N, 2W]
        k, v = kv.reshape(n, N, 2, H, d).permute(2, 0, 3, 1, 4)  # [n, H, N, d] each
        scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)  # [n, H, 1, N]
        mask = None if attn_mask is None else _pooled_row_mask(attn_mask, H, rows)
        probs = _masked(scores, mask).softmax(dim=-1)  # [n, H, 1, N]
    if leaf_probs:
        probs.requires_grad_(True)
    store.probs[tower].append(probs)
    if mha.training and mha.dropout > 0:
        probs = F.dropout(probs, p=mha.dropout)
    out = _linear((probs @ v).reshape(n, W), mha.out_proj.weight, mha.out_proj.bias)  # [n, W]
    xr = _block_tail(block, x[idx, rows], out, first_order)  # [n, W]
    y = xr.unsqueeze(1).expand(n, N, W)
    return y if mha.batch_first else y.transpose(0, 1)


# ================================================================================================ frozen backward
# The frozen, first-order case with several backward passes over a tower (the image maps of B images x C > 1 texts
# when nothing upstream of the tower needs grad and create_graph=False: every visualisation) does not go through
# autograd: the blocks from the start layer up record, in a forward run without a graph, what their input-gradient
# needs (ln inputs normalised + 1/std, q k v, the probabilities, dGELU/du), the pooled output row becomes the
# graph's leaf (autograd runs only the head: ln_post, proj, normalise, score), and ``_frozen_rollout`` runs the
# backward of the block stack by hand for a group of passes, fused with the rollout (which runs in backward order).
# Weights are frozen, so each linear layer costs one GEMM (no weight gradient); the LayerNorm gamma is folded into
# the weight of the GEMM that feeds it and that weight is centred over the normalised dimension, so the GEMM yields
# ``g - mean(g)``; the LayerNorm's 1/std (per row) is folded into the GEMM's input (dGELU/du for ln_2, the q k v
# gradients for ln_1), so its backward is ``gc - xhat * mean(gc * xhat)``; softmax backward is ``P - A * sum(P)``
# with ``P = dy/dA * A``, which the rollout reuses (``Abar = mean_h clamp(P, 0)``).  Exact: the same gradients as
# autograd to float rounding (tests: ``test_frozen_backward_*``).  Measured (docs/relevance.md, ViT-B/32, 1 thread):
# the GEMMs are ~86 % of its time; the same passes take 1.1-1.25x as long under autograd's vmapped backward.
@dataclass
class _Saved:
    """What a captured block's frozen forward keeps for the hand-written backward (n_q = N, or 1 when pooled)."""

    xhat1: torch.Tensor  # [B, N, W] ln_1 input, normalised
    rstd1: torch.Tensor  # [B, N, 1, 1] ln_1's 1 / std
    q: torch.Tensor  # [B, H, n_q, d] queries times 1/sqrt(d)
    k: torch.Tensor  # [B, H, N, d]
    v: torch.Tensor  # [B, H, N, d]
    probs: torch.Tensor  # [B, H, n_q, N]
    xhat2: torch.Tensor  # [B, n_q, W] ln_2 input, normalised
    slope: torch.Tensor  # [B, n_q, 1, 4W] dGELU/du at the MLP's hidden pre-activation times ln_2's 1 / std
    w_proj: torch.Tensor  # [W, 4W]  mlp.c_proj.weight (d hidden = d out @ w_proj)
    w_fc: torch.Tensor  # [4W, W]  mlp.c_fc.weight * ln_2.gamma, centred over W
    w_out: torch.Tensor  # [W, W]   attn.out_proj.weight
    w_qkv: torch.Tensor  # [3W, W]  attn.in_proj_weight * ln_1.gamma, centred over W
    rows: torch.Tensor | None  # [B] pooled query rows, None when every row is computed


@dataclass
class _Recorder:
    """Records of the blocks >= start layer (in block order) and the pooled output row, the leaf [B, W]."""

    saved: list[_Saved] = field(default_factory=list)
    leaf: torch.Tensor | None = None
    work: dict[str, torch.Tensor] = field(default_factory=dict)  # reused buffers of ``_frozen_rollout``


def _work_buffer(work: dict[str, torch.Tensor] | None, name: str, shape: tuple[int, ...], like: torch.Tensor
                 ) -> torch.Tensor:
    """An uninitialised tensor of ``shape``, reused across layers and pass groups when ``work`` is given: tensors
    above glibc's mmap threshold (32 MB) are otherwise mapped afresh and page-faulted in on every allocation
    (measured: seconds of system time over the C = 100 image passes)."""
    n = math.prod(shape)
    buf = None if work is None else work.get(name)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
        buf = torch.empty(n, dtype=like.dtype, device=like.device)
        if work is not None:
            work[name] = buf
    return buf[:n].view(shape)


def _gelu_and_slope(u: torch.Tensor, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(u), dGELU/du): exact erf GELU, or open_clip's QuickGELU u * sigmoid(1.702 u)."""
    if quick:
        sig = torch.sigmoid(1.702 * u)
        y = u * sig
        return y, sig + 1.702 * y * (1 - sig)
    return F.gelu(u), (0.5 * (1 + torch.erf(u * (1 / math.sqrt(2))))
                       + u * torch.exp(-0.5 * u * u) * (1 / math.sqrt(2 * math.pi)))


def _frozen_block_ok(block: nn.Module) -> bool:
    """The block is one whose input-gradient ``_frozen_rollout`` writes out (else: autograd)."""
    from open_clip.transformer import LayerNorm, LayerNormFp32, QuickGELU

    mha, mlp = block.attn, block.mlp
    lns = (block.ln_1, block.ln_2)
    act = getattr(mlp, "gelu", None)
    W = mha.embed_dim
    dtype = mha.in_proj_weight.dtype
    return (mha.batch_first and not (mha.training and mha.dropout > 0) and mha.in_proj_bias is not None
            and dtype in (torch.float32, torch.float64)
            and type(block.ls_1) is nn.Identity and type(block.ls_2) is nn.Identity
            and all(type(ln) in (nn.LayerNorm, LayerNorm, LayerNormFp32) and tuple(ln.normalized_shape) == (W,)
                    for ln in lns)
            and isinstance(mlp, nn.Sequential) and len(mlp) == 3 and type(mlp.c_fc) is nn.Linear
            and type(mlp.c_proj) is nn.Linear
            and (type(act) is QuickGELU or (type(act) is nn.GELU and act.approximate == "none")))


_FROZEN_ROWS = 8192  # token rows (passes x sequences x tokens) per hand-written backward group (20 x 8 images)


def _frozen_tower_ok(model: nn.Module, tower: str, start_layer: int) -> bool:
    """Every block from the start layer up is one ``_frozen_rollout`` handles."""
    blocks = list(_tower_transformer(model, tower).resblocks)
    s0 = _resolve_start(start_layer, len(blocks), tower)
    from open_clip.transformer import ResidualAttentionBlock

    return all(type(b) is ResidualAttentionBlock and _frozen_block_ok(b) for b in blocks[s0:])


def _frozen_weights(block: nn.Module) -> tuple[torch.Tensor, ...]:
    """(w_proj, w_fc, w_out, w_qkv) of ``_Saved`` (gamma folded in, centred), computed without a graph."""
    W = block.attn.embed_dim

    def fold(weight: torch.Tensor, ln: nn.Module) -> torch.Tensor:
        wg = weight * ln.weight if ln.weight is not None else weight.clone()  # [out, W] * [W]
        return wg - wg.mean(dim=1, keepdim=True)

    with torch.no_grad():
        mha, mlp = block.attn, block.mlp
        return (mlp.c_proj.weight.contiguous(), fold(mlp.c_fc.weight, block.ln_2),
                mha.out_proj.weight.contiguous(), fold(mha.in_proj_weight, block.ln_1).reshape(3 * W, W))


def _normalise_saving(ln: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ln(x) as the stock LayerNorm, plus xhat = (x - mean) * rstd and rstd [..., 1]."""
    y, mean, rstd = torch.native_layer_norm(x, tuple(ln.normalized_shape), ln.weight, ln.bias, ln.eps)
    return y, (x - mean) * rstd, rstd


def _recording_block(block: nn.Module, rec: _Recorder, x: torch.Tensor, rows: torch.Tensor | int | None,
                     attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Block forward without a graph that appends its ``_Saved``. x: [B, N, W] -> [B, N, W]; with ``rows`` (the
    last block, pooled) every output row is the pooled row's value and that row [B, W] becomes ``rec.leaf``."""
    from open_clip.transformer import QuickGELU

    mha: nn.MultiheadAttention = block.attn
    B, N, W = x.shape
    H = mha.num_heads
    d = W // H
    with torch.no_grad():
        h, xhat1, rstd1 = _normalise_saving(block.ln_1, x)  # [B, N, W]
        wq, bq = mha.in_proj_weight, mha.in_proj_bias
        idx = torch.arange(B, device=x.device)
        if rows is None:
            q, k, v = _linear(h, wq, bq).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)  # [B, H, N, d] each
            xq = x
        else:
            rows = _pooled_rows(rows, B, x.device)
            q = _linear(h[idx, rows], wq[:W], bq[:W]).reshape(B, H, 1, d)
            k, v = _linear(h, wq[W:], bq[W:]).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4)  # [B, H, N, d] each
            xq = x[idx, rows].unsqueeze(1)  # [B, 1, W]
        q = q * (1.0 / math.sqrt(d))  # [B, H, n_q, d]
        k, v = k.contiguous(), v.contiguous()
        scores = q @ k.transpose(-2, -1)  # [B, H, n_q, N]
        mask = attn_mask
        if mask is not None:
            mask = _pooled_row_mask(mask, H, rows) if rows is not None \
                else (mask.reshape(B, H, N, N) if mask.dim() == 3 else mask)  # [B, H, n_q | N, N] | [N, N]
        probs = _masked(scores, mask).softmax(dim=-1)  # [B, H, n_q, N]
        n_q = probs.shape[2]
        out = _linear((probs @ v).transpose(1, 2).reshape(B, n_q, W), mha.out_proj.weight, mha.out_proj.bias)
        x1 = xq + out  # [B, n_q, W]
        h2, xhat2, rstd2 = _normalise_saving(block.ln_2, x1)
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        hidden, slope = _gelu_and_slope(_linear(h2, fc.weight, fc.bias), type(block.mlp.gelu) is QuickGELU)
        y = x1 + _linear(hidden, proj.weight, proj.bias)  # [B, n_q, W]
    rec.saved.append(_Saved(xhat1, rstd1.unsqueeze(-1), q, k, v, probs, xhat2, (slope * rstd2).unsqueeze(2),
                            *_frozen_weights(block), None if rows is None else rows))
    if rows is None:
        return y
    rec.leaf = y[:, 0].requires_grad_(True)  # [B, W]
    return rec.leaf.unsqueeze(1).expand(B, N, W)


def _ln_input_grad(gc: torch.Tensor, xhat: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm input-gradient (+ res) from the centred-weight GEMM output, in place in gc.

    gc: [B, n, k, W] = rstd * ((dy * gamma) - mean(dy * gamma)) (rstd folded in upstream); xhat: [B, n, W].
    Returns gc - xhat * mean(gc * xhat) (+ res) = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ res).
    """
    B, n, k, W = gc.shape
    s = torch.bmm(gc.view(B * n, k, W), xhat.view(B * n, W, 1)).view(B, n, k, 1)  # W * mean(gc * xhat)
    out = gc.addcmul_(xhat.unsqueeze(2), s, value=-1.0 / W)
    return out if res is None else out.add_(res)


def _frozen_rollout(saved: Sequence[_Saved], g_top: torch.Tensor, grads_out: list | None = None,
                    work: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Explained rows of R for k backward passes through the recorded blocks, by hand (see above).

    saved: the blocks from the start layer up (the last one pooled); g_top: [k, B, W] dy_j / d(pooled output row).
    Returns [k, B, N] (fp32; fp64 for fp64 models), equal to ``_rollout_batched`` on autograd's dy/dA.
    grads_out: when a list, dy/dA of every block is appended to it, last block first ([k, B, H, n_q, N]; tests).
    work: buffers reused across calls (``_Recorder.work``).  Layout: token rows (b, n, pass) for the GEMMs, [B, H, n, pass, .] for attention, so that every attention
    product is one bmm over (b, h) with the passes folded into its rows or columns (no copies of q, k, v, A).
    """
    k, B, W = g_top.shape
    last = saved[-1]
    _, H, _, N = last.probs.shape
    d = W // H
    dtype = torch.promote_types(last.probs.dtype, torch.float32)
    r = F.one_hot(last.rows, N).to(dtype).unsqueeze(1).expand(B, k, N)  # [B, k, N]
    dout = g_top.transpose(0, 1).unsqueeze(1)  # [B, n_q, k, W] gradient at the block's output rows
    for i in range(len(saved) - 1, -1, -1):
        sv = saved[i]
        n_q = sv.probs.shape[2]
        # MLP and ln_2: dx1 = dout + ln_2 backward of (dGELU * rstd2 * (dout @ w_proj)) @ w_fc
        du = _work_buffer(work, "du", (B * n_q * k, sv.w_proj.shape[1]), g_top)
        du = torch.mm(dout.reshape(-1, W), sv.w_proj, out=du).view(B, n_q, k, -1).mul_(sv.slope)  # [B, n_q, k, 4W]
        dx1 = _ln_input_grad((du.view(-1, du.shape[-1]) @ sv.w_fc).view(B, n_q, k, W), sv.xhat2, dout)
        # attention, heads outside: G = dy/dA = d(out) @ v^T
        do = (dx1.view(-1, W) @ sv.w_out).view(B, n_q, k, H, d).permute(0, 3, 1, 2, 4).contiguous()  # [B,H,n_q,k,d]
        p = (do.view(B, H, n_q * k, d) @ sv.v.transpose(-2, -1)).view(B, H, n_q, k, N)  # G
        if grads_out is not None:
            grads_out.append(p.permute(3, 0, 1, 2, 4).clone())
        probs = sv.probs.unsqueeze(3)  # [B, H, n_q, 1, N]
        p.mul_(probs)  # P = G * A
        abar = p.clamp(min=0).mean(dim=1).to(dtype)  # [B, n_q, k, N]
        r = r + (abar[:, 0] if sv.rows is not None else (r.transpose(1, 2).unsqueeze(-1) * abar).sum(dim=1))
        if i == 0:
            break
        # softmax, q k v (rstd1 folded in while the heads are laid back), ln_1: dx = dx1 (query rows) + ln_1 bwd
        ds = torch.addcmul(p, probs, p.sum(dim=-1, keepdim=True), value=-1)  # [B, H, n_q, k, N]
        rstd1 = sv.rstd1.unsqueeze(-1)  # [B, N, 1, 1, 1]
        if sv.rows is None:
            # q and k: d(ln_1 out) = sum_h dS_h (K_h Wq_h) / sqrt(d) + dS_h^T (Q_h Wk_h): one GEMM over
            # (head, key) / (head, query) per sequence (K = H N) instead of a K = N bmm per head plus the q, k
            # slices of the qkv GEMM; dS is laid out (token, pass, head, token) with rstd1 of the row folded in
            wq = sv.w_qkv[:W].view(H, d, W)
            kw = torch.matmul(sv.k, wq).mul_(1.0 / math.sqrt(d)).view(B, H * N, W)  # [B, (h, key), W]
            qw = torch.matmul(sv.q, sv.w_qkv[W:2 * W].view(H, d, W)).view(B, H * N, W)  # [B, (h, query), W]
            ds_q = _work_buffer(work, "ds_q", (B, N, k, H, N), du)  # [b, query, pass, h, key]
            torch.mul(ds.permute(0, 2, 3, 1, 4), rstd1, out=ds_q)
            gc = _work_buffer(work, "gc1", (B, N * k, W), du)
            torch.bmm(ds_q.view(B, N * k, H * N), kw, out=gc)
            torch.mul(ds.permute(0, 4, 3, 1, 2), rstd1, out=ds_q)  # [b, key, pass, h, query]
            gc.baddbmm_(ds_q.view(B, N * k, H * N), qw)
            dv = (sv.probs.transpose(-2, -1) @ do.view(B, H, N, k * d)).view(B, H, N, k, d)
            dvr = _work_buffer(work, "dv", (B, N, k, H, d), du)
            torch.mul(dv.permute(0, 2, 3, 1, 4), rstd1, out=dvr)
            gc.view(-1, W).addmm_(dvr.view(-1, W), sv.w_qkv[2 * W:])
            dout = _ln_input_grad(gc.view(B, N, k, W), sv.xhat1, dx1)  # [B, N, k, W]
            continue
        slots = 3 if sv.rows is None else 2  # (q,) k, v
        dqkv = _work_buffer(work, "dqkv", (B, N, k, slots, H, d), du)
        dk = (ds.view(B, H, n_q, k * N).transpose(-2, -1) @ sv.q).view(B, H, k, N, d)
        torch.mul(dk.permute(0, 3, 2, 1, 4), rstd1, out=dqkv[:, :, :, slots - 2])
        dv = (sv.probs.transpose(-2, -1) @ do.view(B, H, n_q, k * d)).view(B, H, N, k, d)
        torch.mul(dv.permute(0, 2, 3, 1, 4), rstd1, out=dqkv[:, :, :, slots - 1])
        dq = (ds.view(B, H, n_q * k, N) @ sv.k).view(B, H, n_q, k, d).permute(0, 2, 3, 1, 4)  # [B, n_q, k, H, d]
        if sv.rows is None:
            torch.mul(dq, rstd1 * (1.0 / math.sqrt(d)), out=dqkv[:, :, :, 0])
            gc = (dqkv.view(-1, 3 * W) @ sv.w_qkv).view(B, N, k, W)
            dout = _ln_input_grad(gc, sv.xhat1, dx1)  # [B, N, k, W]
        else:
            idx = torch.arange(B, device=du.device)
            gc = (dqkv.view(-1, 2 * W) @ sv.w_qkv[W:]).view(B, N, k, W)
            gc[idx, sv.rows] += (dq.reshape(B, k, W) * (rstd1[idx, sv.rows, 0] * (1.0 / math.sqrt(d)))) @ sv.w_qkv[:W]
            dout = _ln_input_grad(gc, sv.xhat1, None)  # [B, N, k, W]
            dout[idx, sv.rows] += dx1[:, 0]
    return r.transpose(0, 1)


def _is_patchify(conv: nn.Module) -> bool:
    """A Conv2d that cuts the image into non-overlapping patches (ViT patch embedding)."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and tuple(conv.stride) == tuple(conv.kernel_size)
            and conv.padding in ((0, 0), "valid") and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros")


def _patchify_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a patchify Conv2d as one matmul over the unfolded patches: [B, C, H, W] -> [B, O, gh, gw]."""
    B, Cin, Hh, Ww = x.shape
    kh, kw = conv.kernel_size
    gh, gw = Hh // kh, Ww // kw  # like the convolution, a remainder of rows / columns is dropped
    p = x[:, :, :gh * kh, :gw * kw].reshape(B, Cin, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
    p = p.reshape(B * gh * gw, Cin * kh * kw)  # [B*gh*gw, C*kh*kw], patch pixels in the weight's (c, i, j) order
    y = _linear(p, conv.weight.reshape(conv.out_channels, -1), conv.bias)  # [B*gh*gw, O]
    return y.reshape(B, gh, gw, conv.out_channels).permute(0, 3, 1, 2)  # a view: [B, O, gh, gw]


def _requires_grad(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _text_source_requires_grad(model: nn.Module) -> bool:
    parts = _text_parts(model)
    proj = parts.text_projection
    return (_requires_grad(parts.token_embedding) or _requires_grad(parts.transformer) or _requires_grad(parts.ln_final)
            or parts.positional_embedding.requires_grad or (isinstance(proj, nn.Module) and _requires_grad(proj))
            or (isinstance(proj, torch.Tensor) and proj.requires_grad))


@contextlib.contextmanager
def _relevance_tower(model: nn.Module, tower: str, start_layer: int, *, depth_limit: bool,
                     pooled_rows: torch.Tensor | int | None, first_order: bool = False,
                     recorder: _Recorder | None = None) -> Iterator[AttentionStore]:
    """Run ``tower`` with the block modes above; the store keeps the probabilities of the blocks >= start_layer.

    first_order: the graph is differentiated once only (create_graph=False): activations use a first-order backward.
    recorder: the frozen hand-written backward (needs depth_limit and pooled_rows): the blocks >= start_layer run
    ``_recording_block`` instead (no probabilities in the store; the records and the leaf go to the recorder).
    """
    if recorder is not None and (not depth_limit or pooled_rows is None):
        raise RelevanceError("The frozen backward needs a depth-limited tower read at its pooled row.")
    trunk = _tower_transformer(model, tower)
    if getattr(trunk, "grad_checkpointing", False):
        raise RelevanceError(f"Gradient checkpointing is enabled on the {tower} tower; disable it "
                             f"(model.set_grad_checkpointing(False)) for attention relevance.")
    blocks = list(trunk.resblocks)
    for i, blk in enumerate(blocks):
        _check_block(blk, tower, i)
        if "forward" in vars(blk) or "attention" in vars(blk):
            raise RelevanceError(f"{tower} block {i} is already being captured (nested relevance / capture_attention).")
    s0 = _resolve_start(start_layer, len(blocks), tower)
    conv = getattr(model.visual, "conv1", None) if tower == "visual" else None
    if conv is not None and (not _is_patchify(conv) or "forward" in vars(conv)):
        conv = None
    store = AttentionStore()
    patched: list[nn.Module] = []
    try:
        for i, blk in enumerate(blocks):
            if i < s0:
                mode = "skip" if depth_limit else "plain"
            else:
                mode = "pooled" if i == len(blocks) - 1 and pooled_rows is not None else "capture"
            leaf = depth_limit and i == s0

            def forward(self, q_x, k_x=None, v_x=None, attn_mask=None, _mode=mode, _leaf=leaf):
                if k_x is not None or v_x is not None:
                    raise RelevanceError(f"Cross-attention in a {tower} block is not supported by the relevance engine.")
                if _mode == "skip":
                    with torch.no_grad():
                        return _block_tail(self, q_x, _engine_attention(self, None, self.ln_1(q_x), attn_mask, True))
                if _leaf:  # below: nothing needs grad; the probabilities of this block are the graph's leaves
                    q_x = q_x.detach()
                if recorder is not None:  # frozen, hand-written backward: no graph in the blocks at all
                    return _recording_block(self, recorder, q_x.detach(), pooled_rows if _mode == "pooled" else None,
                                            attn_mask)
                if _mode == "pooled":
                    return _pooled_block(self, store, tower, q_x, pooled_rows, attn_mask, first_order, _leaf)
                keep = store.probs[tower] if _mode == "capture" else None
                with torch.no_grad() if _leaf else contextlib.nullcontext():
                    h = self.ln_1(q_x)
                return _block_tail(self, q_x, _engine_attention(self, keep, h, attn_mask, False, _leaf), first_order)

            blk.forward = types.MethodType(forward, blk)
            patched.append(blk)
        if conv is not None:
            conv.forward = types.MethodType(_patchify_forward, conv)
            patched.append(conv)
        yield store
    finally:
        for blk in patched:
            del blk.forward


def _rollout_batched(probs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rows: torch.Tensor,
                     pooled_last: bool) -> torch.Tensor:
    """Explained rows for k backward passes at once.

    probs: per layer [n, H, N, N] (the last [n, H, 1, N] when pooled_last); grads: per layer [k, n, H, ., N];
    rows: [n] explained row per sequence.  Returns [k, n, N] (fp32, fp64 for fp64 models).
    """
    dtype = torch.promote_types(probs[0].dtype, torch.float32)
    N = probs[0].shape[-1]
    k = grads[0].shape[0]
    r = F.one_hot(rows.long(), N).to(dtype).unsqueeze(0).expand(k, -1, -1)  # [k, n, N]
    last = len(probs) - 1
    for i in range(last, -1, -1):
        abar = (grads[i].to(dtype) * probs[i].to(dtype)).clamp(min=0).mean(dim=-3)  # [k, n, N or 1, N]
        if pooled_last and i == last:  # r is the one-hot row: r @ Abar = Abar[row]
            r = r + abar[..., 0, :]
        else:
            r = r + (r.unsqueeze(-2) @ abar).squeeze(-2)
    return r


def _pass_grads(y: torch.Tensor, inputs: Sequence[torch.Tensor], masks: torch.Tensor, create_graph: bool
                ) -> list[torch.Tensor]:
    """Gradients of k weighted sums of ``y`` ([B, c]; pass j uses masks[j]) w.r.t. ``inputs``: per input [k, ...]."""
    if create_graph or masks.shape[0] == 1:
        per = [torch.autograd.grad(y, inputs, grad_outputs=m, retain_graph=True, create_graph=create_graph)
               for m in masks]
        return [torch.stack([p[i] for p in per]) for i in range(len(inputs))]
    return list(torch.autograd.grad(y, inputs, grad_outputs=masks, retain_graph=True, is_grads_batched=True))


def _sub_batches(k: int, sequences: int, tokens: int, budget_rows: int) -> list[tuple[int, int]]:
    """Split k backward passes so that one batched backward holds at most ``budget_rows`` token rows."""
    return _chunks(k, max(1, budget_rows // max(1, sequences * tokens)))


@dataclass
class Relevance:
    """Result of ``relevance``: maps for the towers asked for, and the score of every pair.

    text: [B, C, L] EOT rows (fp32) or None; image: [B, C, N] CLS rows over the N patches or None;
    similarity: [B, C] the explained score y (detached); text_features: [C, D] unnormalised (attached when the
    prompt embeddings need grad) or None when precomputed text features were passed; image_features: [B, D]
    normalised.
    """

    text: torch.Tensor | None
    image: torch.Tensor | None
    similarity: torch.Tensor
    text_features: torch.Tensor | None
    image_features: torch.Tensor


def relevance(backbone, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None, *,
              towers: Sequence[Tower] | Tower = TOWERS, start_layer_text: int = 0, start_layer_image: int = -1,
              create_graph: bool = False, score: Score = "logit", chunk_size: int | None = 256,
              embeds: torch.Tensor | None = None, eot_index: torch.Tensor | None = None,
              text_features: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
              _normalise_image_features: bool = True) -> Relevance:
    """Text and/or image relevance for every (image, text) pair from ONE forward of each tower.

    Images: ``images`` [B, 3, H, W] CLIP-normalised pixels, or (text relevance only) ``image_features`` [B, D].
    Texts: ``tokens`` [C, L], or ``embeds`` [C, L, W] + ``eot_index`` [C] (learned prompts), or (image relevance
    only) ``text_features`` [C, D].  towers: "text", "visual" or both.  start_layer_*: first layer entering R
    (negative counts from the end); text default 0 = all layers (NTLB), image default -1 = last layer (T's notebook).

    Cost: one forward of each tower (texts cut after their last EOT, exact for a causal tower); blocks below the
    start layer run without a graph when nothing upstream needs grad (backward no deeper than the start layer);
    the last block is computed for the pooled token only.  Text maps need B backward passes over the C texts,
    image maps C passes over the B images; the passes of one tower run as one batched (vmapped) backward, in
    sub-batches of at most ``chunk_size x context_length`` token rows; with several passes over a frozen tower and
    create_graph=False (nothing upstream of it needs grad) they run as a hand-written batched backward instead
    (weights frozen: one GEMM per linear layer, fused with the rollout).  For one pair both maps come from one
    backward.  Exact: equals the plain per-pair rule to float rounding (tests/test_relevance.py).
    create_graph=True keeps G = dy/dA differentiable (second-order losses; the passes then run one by one).
    """
    model = _unwrap(backbone)
    towers = (towers,) if isinstance(towers, str) else tuple(towers)
    if not towers or any(t not in TOWERS for t in towers):
        raise RelevanceError(f"towers must be a non-empty subset of {TOWERS}, got {towers!r}.")
    want_t, want_v = "text" in towers, "visual" in towers
    if sum(x is not None for x in (tokens, embeds, text_features)) != 1:
        raise RelevanceError("Pass exactly one of tokens [C, L], embeds [C, L, W] (+ eot_index) or text_features [C, D].")
    if want_t and text_features is not None:
        raise RelevanceError("Text relevance needs tokens or embeds, not precomputed text_features.")
    if (images is None) == (image_features is None):
        raise RelevanceError("Pass exactly one of images [B, 3, H, W] or image_features [B, D].")
    if want_v and images is None:
        raise RelevanceError("Image relevance needs images [B, 3, H, W], not precomputed image_features.")
    if images is not None and images.dim() != 4:
        raise RelevanceError(f"images must be [B, 3, H, W] CLIP-normalised pixels, got shape {tuple(images.shape)}.")
    if tokens is not None and tokens.dim() != 2:
        raise RelevanceError(f"tokens must be [C, L] token ids, got shape {tuple(tokens.shape)}.")
    scale = _scale(model, score)
    if want_v:
        _check_visual_pool(model)

    # the first-order activation backward pays off when a tower's graph is differentiated in several passes
    # (C passes over the image tower, B over the text tower); one pass would only pay for the saved derivative
    n_texts = next(t for t in (tokens, embeds, text_features) if t is not None).shape[0]
    with torch.enable_grad():
        # ---------------------------------------------------------------- image side
        probs_v: list[torch.Tensor] = []
        rec_v = None
        if want_v:
            src_v = images.requires_grad or _requires_grad(model.visual)
            if not src_v and not create_graph and n_texts > 1 and _frozen_tower_ok(model, "visual", start_layer_image):
                rec_v = _Recorder()  # several passes over a frozen tower: the hand-written backward
            with _relevance_tower(model, "visual", start_layer_image, depth_limit=not src_v, pooled_rows=0,
                                  first_order=not create_graph and n_texts > 1, recorder=rec_v) as sv:
                img = F.normalize(model.encode_image(images), dim=-1)  # [B, D]
            probs_v = sv["visual"]
        elif image_features is not None:
            if image_features.dim() != 2:
                raise RelevanceError(f"image_features must be [B, D], got shape {tuple(image_features.shape)}.")
            img = F.normalize(image_features, dim=-1) if _normalise_image_features else image_features
            src_v = image_features.requires_grad
        else:
            with contextlib.nullcontext() if create_graph else torch.no_grad():
                img = F.normalize(model.encode_image(images), dim=-1)
            src_v = img.requires_grad
        B = img.shape[0]

        # ---------------------------------------------------------------- text side
        parts = None
        if text_features is None:
            try:
                parts = _text_parts(model)
            except RelevanceError:
                if want_t or embeds is not None:
                    raise
        if text_features is None and parts is None:  # image maps only, text tower the engine cannot cut: stock
            with contextlib.nullcontext() if create_graph else torch.no_grad():
                text_features = model.encode_text(tokens)
        if text_features is not None:
            if text_features.dim() != 2:
                raise RelevanceError(f"text_features must be [C, D], got shape {tuple(text_features.shape)}.")
            C, src_t = text_features.shape[0], text_features.requires_grad
            eot = None
        else:
            if embeds is not None:
                if embeds.dim() != 3 or eot_index is None:
                    raise RelevanceError(f"embeds must be [C, L, W] with one eot_index per text; got embeds "
                                         f"{tuple(embeds.shape)} and eot_index {eot_index!r}.")
                eot = torch.as_tensor(eot_index, device=embeds.device).long().reshape(-1)
                if eot.shape[0] != embeds.shape[0]:
                    raise RelevanceError(f"embeds must be [C, L, W] with one eot_index per text; got embeds "
                                         f"{tuple(embeds.shape)} and eot_index {tuple(eot.shape)}.")
                C, L = embeds.shape[:2]
            else:
                eot = text_eot_index(model, tokens)
                C, L = tokens.shape
            src_t = (embeds is not None and embeds.requires_grad) or _text_source_requires_grad(model)
        text_attached = src_t or (create_graph and src_v)
        image_attached = src_v or (create_graph and src_t)

        # several passes over a frozen text tower: the hand-written backward (as for the image tower)
        frozen_t = want_t and not src_t and not create_graph and B > 1 and _frozen_tower_ok(model, "text",
                                                                                             start_layer_text)
        rec_t = None
        budget = (chunk_size or 256) * (parts.positional_embedding.shape[0] if parts is not None else 77)
        rel_t, rel_v, sims_all, feats = [], [], [], []
        for lo, hi in _chunks(C, chunk_size):
            c = hi - lo
            probs_t: list[torch.Tensor] = []
            if text_features is not None:
                t = text_features[lo:hi]
            else:
                e = embeds[lo:hi] if embeds is not None else parts.token_embedding(tokens[lo:hi])  # [c, L, W]
                e_eot = eot[lo:hi]
                L_used = int(e_eot.max()) + 1 if parts.attn_mask is not None else L  # causal: later tokens unused
                if want_t:
                    rec_t = _Recorder() if frozen_t else None
                    with _relevance_tower(model, "text", start_layer_text, depth_limit=not src_t,
                                          pooled_rows=e_eot, first_order=not create_graph and B > 1,
                                          recorder=rec_t) as st:
                        t = encode_text_from_embeddings(model, e[:, :L_used], e_eot)  # [c, D]
                    probs_t = st["text"]
                else:
                    with contextlib.nullcontext() if (create_graph or src_t) else torch.no_grad():
                        t = encode_text_from_embeddings(model, e[:, :L_used], e_eot)
            feats.append(t)
            sims = scale * (img @ F.normalize(t, dim=-1).T)  # [B, c]
            sims_all.append(sims.detach())
            for p in probs_t + probs_v + [r.leaf for r in (rec_t, rec_v) if r is not None]:
                if not p.requires_grad:
                    raise RelevanceError("Attention probabilities do not require grad: call the relevance functions "
                                         "with gradients enabled (not under torch.no_grad / inference_mode).")
            if want_t and want_v and B == 1 and c == 1 and rec_v is None and rec_t is None:  # one pair: one backward
                g = torch.autograd.grad(sims.sum(), probs_t + probs_v, retain_graph=True, create_graph=create_graph)
                g = [x.unsqueeze(0) for x in g]
                nt = len(probs_t)
                rel_t.append(_rollout_batched(probs_t, g[:nt], e_eot, True)[0].unsqueeze(0))  # [1, 1, L_used]
                rel_v.append(_rollout_batched(probs_v, g[nt:], torch.zeros(1, dtype=torch.long), True)[:, :, 1:])
            else:
                if want_t:
                    masks = torch.eye(B, dtype=sims.dtype, device=sims.device)[:, :, None].expand(B, B, c)  # row b
                    rows_t = []
                    for a, z in _sub_batches(B, c, L_used, _FROZEN_ROWS) if rec_t is not None else ():
                        g = _pass_grads(sims, [rec_t.leaf], masks[a:z], False)[0]  # [k, c, W]
                        rows_t.append(_frozen_rollout(rec_t.saved, g, work=rec_t.work))  # [k, c, L_used]
                    for a, z in _sub_batches(B, c, L_used, budget) if rec_t is None else ():
                        g = _pass_grads(sims, probs_t, masks[a:z], create_graph)
                        rows_t.append(_rollout_batched(probs_t, g, e_eot, True))  # [k, c, L_used]
                    rel_t.append(torch.cat(rows_t, dim=0))  # [B, c, L_used]
                if want_v:
                    masks = torch.eye(c, dtype=sims.dtype, device=sims.device)[:, None, :].expand(c, B, c)  # col c
                    zeros = torch.zeros(B, dtype=torch.long, device=img.device)
                    cols = []
                    if rec_v is not None:  # autograd for the head only, then the block stack by hand
                        N_v = rec_v.saved[-1].probs.shape[-1]
                        for a, z in _sub_batches(c, B, N_v, _FROZEN_ROWS):
                            g = _pass_grads(sims, [rec_v.leaf], masks[a:z], False)[0]  # [k, B, W]
                            cols.append(_frozen_rollout(rec_v.saved, g, work=rec_v.work)[:, :, 1:])  # [k, B, N]
                    for a, z in _sub_batches(c, B, probs_v[0].shape[-1], budget) if rec_v is None else ():
                        g = _pass_grads(sims, probs_v, masks[a:z], create_graph)
                        cols.append(_rollout_batched(probs_v, g, zeros, True)[:, :, 1:])  # [k, B, N]
                    rel_v.append(torch.cat(cols, dim=0).transpose(0, 1))  # [B, c, N]
            if want_t and rel_t[-1].shape[-1] < L:
                rel_t[-1] = F.pad(rel_t[-1], (0, L - rel_t[-1].shape[-1]))  # [B, c, L]
            # free this chunk's graph now unless a result has to stay attached (memory bounded by one chunk)
            if want_t and not text_attached:
                rel_t[-1] = rel_t[-1].detach()
            if want_v and not image_attached:
                rel_v[-1] = rel_v[-1].detach()
            if not src_t:
                feats[-1] = feats[-1].detach()

    text_rel = torch.cat(rel_t, dim=1) if want_t else None
    image_rel = torch.cat(rel_v, dim=1) if want_v else None
    if text_rel is not None and not text_attached:
        text_rel = text_rel.detach()
    if image_rel is not None and not image_attached:
        image_rel = image_rel.detach()
    text_feats = torch.cat(feats, dim=0) if parts is not None or text_features is None else None
    return Relevance(text_rel, image_rel, torch.cat(sims_all, dim=1), text_feats, img)


def text_relevance_from_embeddings(backbone, image_features: torch.Tensor, embeds: torch.Tensor,
                                   eot_index: torch.Tensor, *, start_layer: int = 0, create_graph: bool = False,
                                   score: Score = "logit", chunk_size: int | None = None,
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Text relevance for learned prompts (CoOp) built from embeddings (a view of ``relevance``).

    image_features: [B, D] L2-normalised image features (used as given; detach them unless gradients should reach
        the image; they only matter through G = dy/dA when create_graph=True).
    embeds: [C, L, W] token embeddings before the positional embedding; eot_index: [C] pooled position.
    Returns (relevance [B, C, L] = EOT row of R for y = score(x_b, t_c), text features [C, D] unnormalised).

    create_graph=False (CoOp / NTLB, spec §1.7): G is a constant, the attention probabilities A stay attached, so a
    loss on the relevance reaches ``embeds`` through A and the products in R (first-order path).
    create_graph=True: G is differentiable as well (second-order; StyleCLIP / FuseDream).
    chunk_size: texts per text-tower pass (None = all at once).  Each chunk keeps its own graph when the result is
    attached, so chunking bounds peak memory only for detached use.
    """
    out = relevance(backbone, tokens=None, embeds=embeds, eot_index=eot_index, image_features=image_features,
                    towers=("text",), start_layer_text=start_layer, create_graph=create_graph, score=score,
                    chunk_size=chunk_size, _normalise_image_features=False)
    return out.text, out.text_features


def _image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4:
        raise RelevanceError(f"images must be [B, 3, H, W] CLIP-normalised pixels, got shape {tuple(images.shape)}.")
    return F.normalize(model.encode_image(images), dim=-1)  # [B, D]


def text_relevance(backbone, images: torch.Tensor, tokens: torch.Tensor, *, start_layer: int = 0,
                   create_graph: bool = False, score: Score = "logit", chunk_size: int | None = 256) -> torch.Tensor:
    """EOT-row text relevance for every (image, text) pair: [B, 3, H, W] x [C, L] -> [B, C, L] (fp32).

    A view of ``relevance(..., towers=("text",))``.
    ``y = logit_scale.exp() * cos(image_b, text_c)`` by default (as T's notebook, CoOp loss, StyleCLIP EGCLIPLoss);
    ``score="cosine"`` uses the raw cosine (FuseDream explainability_loss).  The scale is not a no-op: it changes the
    mix of first- and higher-order terms of R (spec §1.3).  start_layer=0 uses all text layers (NTLB's choice for
    its losses); Chefer's CLIP notebook (HEAD) uses the last text layer only: pass start_layer=-1 to match it.
    Negative values count from the end (-1 = last layer only).
    create_graph=False returns a result whose graph reaches the text token embeddings only through A (the image
    features are detached); create_graph=True keeps G differentiable so gradients also reach the image pixels.
    For plain visualisation call ``.detach()`` on the result.
    """
    if tokens.dim() != 2:
        raise RelevanceError(f"tokens must be [C, L] token ids, got shape {tuple(tokens.shape)}.")
    return relevance(backbone, images, tokens, towers=("text",), start_layer_text=start_layer,
                     create_graph=create_graph, score=score, chunk_size=chunk_size).text


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

    A view of ``relevance(..., towers=("visual",))``.
    Reshape with ``rel.reshape(B, C, *patch_grid(backbone))``.  start_layer=-1 (default) uses only the last layer
    (T's notebook HEAD and NTLB's spatial conditioning); 0 uses all layers.  Pass ``text_features`` ([C, D],
    normalised or not) instead of ``tokens`` to explain against precomputed / learned texts.
    y = logit_scale * cos by default; ``score="cosine"`` for VQGAN spatial conditioning (spec §4.3).
    create_graph=True keeps G differentiable so a loss on the map reaches the pixels through both A and G.
    """
    if (tokens is None) == (text_features is None):
        raise RelevanceError("Pass exactly one of tokens [C, L] or text_features [C, D].")
    if images.dim() != 4:
        raise RelevanceError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}.")
    return relevance(backbone, images, tokens, towers=("visual",), start_layer_image=start_layer,
                     create_graph=create_graph, score=score, chunk_size=chunk_size, text_features=text_features).image


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
