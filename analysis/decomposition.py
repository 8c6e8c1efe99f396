"""Direct-effect decomposition of an open_clip ViT image embedding into layers, heads and tokens (TextSpan A3).

For a pre-LN ViT the CLS row of the last residual stream is

    r = e + sum_l A_l + sum_l M_l                                  # e: ln_pre output at CLS

and A_l splits exactly into per-(source token j, head h) pieces a^{l,h}_{0,j} W_O^h v^{l,h}_j + b_O/(N*H).
``ln_post`` is linearised with the mean and std of the *full* residual r (recorded from the real forward pass
and then treated as constants); every summand c carries a share ``s`` of the centring term and of the bias:

    contrib(c) = [ gamma * (c - s*mu) / sigma + s*beta ] @ proj / ||embedding||

with s = 1/(2L+1) for the layer-level terms (embedding, MLPs) and s = 1/((2L+1) N H) for each (token, head)
piece (the anchor's ``K``-share convention, spec A3.3). All contributions then sum to the unit-normalised image
embedding ``F.normalize(encode_image(x))``.

The stock forward runs unchanged; forward hooks (returning None) only *read* the block inputs / outputs, and
the CLS attention row is recomputed explicitly from the block's own weights and checked against the stock
attention output.

    dec = decompose_images(backbone.model.visual, images)       # images: [B, 3, H, W], CLIP-normalised
    dec.heads      # [B, L, H, D]  per-head contributions (source tokens summed)
    dec.tokens     # [B, L, N, D]  per-source-token contributions (heads summed); token 0 = CLS->CLS
    dec.mlps       # [B, L+1, D]   index 0 = embedding term (ln_pre at CLS), 1..L = MLPs
    dec.embedding  # [B, D]        the normalised image embedding
    dec.total()    # [B, D]        sum of all contributions (== embedding up to float error)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class DecompositionError(ValueError):
    """The model cannot be decomposed with the direct-effect formulas (unsupported architecture)."""


@dataclass
class Decomposition:
    heads: torch.Tensor          # [B, L, H, D]
    tokens: torch.Tensor         # [B, L, N, D]
    mlps: torch.Tensor           # [B, L+1, D]
    embedding: torch.Tensor      # [B, D] normalised image embedding from the stock forward
    norm: torch.Tensor           # [B]    ||encode_image(x, normalize=False)||
    per_token_head: torch.Tensor | None = None   # [B, L, N, H, D] when requested
    meta: dict = field(default_factory=dict)

    @property
    def cls_attn(self) -> torch.Tensor:
        """[B, L, D] the CLS->CLS term (source token 0, heads summed) of every layer."""
        return self.tokens[:, :, 0]

    def total(self) -> torch.Tensor:
        """[B, D] sum of every contribution: heads + MLPs + embedding term."""
        return self.heads.sum(dim=(1, 2)) + self.mlps.sum(dim=1)


def check_supported(visual: nn.Module) -> None:
    """Fail early, naming the attribute, when ``visual`` is not a plain open_clip VisionTransformer."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise DecompositionError(f"decomposition needs an open_clip VisionTransformer, got "
                                 f"{type(visual).__name__} (ResNet towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise DecompositionError("visual.attn_pool is set (CoCa-style attentional pooling): unsupported")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise DecompositionError(f"visual.pool_type={visual.pool_type!r}: only 'tok' (CLS) pooling is supported")
    if visual.proj is None:
        raise DecompositionError("visual.proj is None: the direct effect needs the output projection")
    for i, blk in enumerate(visual.transformer.resblocks):
        if type(blk) is not ResidualAttentionBlock:
            raise DecompositionError(f"visual.transformer.resblocks.{i} is {type(blk).__name__}; only the default "
                                     f"ResidualAttentionBlock is supported")
        if hasattr(blk, "ln_1_kv"):
            raise DecompositionError(f"visual.transformer.resblocks.{i} is a cross-attention block")
    if not isinstance(visual.ln_post, nn.LayerNorm):
        raise DecompositionError(f"visual.ln_post is {type(visual.ln_post).__name__}, expected a LayerNorm")


def num_layers_heads(visual: nn.Module) -> tuple[int, int]:
    blocks = visual.transformer.resblocks
    return len(blocks), int(blocks[0].attn.num_heads)


def _layerscale(module: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """[W] the per-channel gain of an open_clip LayerScale (ones for nn.Identity)."""
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        return torch.ones(width, dtype=like.dtype, device=like.device)
    return gamma.to(like)


def _cls_attention_pieces(blk: nn.Module, x_ln: torch.Tensor) -> torch.Tensor:
    """Per-(source token, head) pieces of the CLS row of ``blk``'s attention output, before LayerScale.

    x_ln: [B, N, W] ln_1 output. Returns [B, N, H, W]; summing over (N, H) gives attn(x_ln)[:, 0] exactly
    (the out-projection bias is split evenly, b_O / (N*H) per piece).
    """
    attn: nn.MultiheadAttention = blk.attn
    B, N, W = x_ln.shape
    H = attn.num_heads
    hd = W // H
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3, dim=0)          # each [W, W]
    if attn.in_proj_bias is not None:
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3, dim=0)
    else:
        b_q = b_k = b_v = None
    q = F.linear(x_ln[:, :1], w_q, b_q).view(B, 1, H, hd)         # [B, 1, H, hd]
    k = F.linear(x_ln, w_k, b_k).view(B, N, H, hd)                # [B, N, H, hd]
    v = F.linear(x_ln, w_v, b_v).view(B, N, H, hd)                # [B, N, H, hd]
    scores = torch.einsum("bqhd,bnhd->bhn", q, k) / hd ** 0.5     # [B, H, N]
    a = scores.softmax(dim=-1)                                    # [B, H, N]
    w_o = attn.out_proj.weight.view(W, H, hd)                     # [W_out, H, hd]
    ov = torch.einsum("bnhd,whd->bnhw", v, w_o)                   # [B, N, H, W]
    pieces = ov * a.permute(0, 2, 1).unsqueeze(-1)                # [B, N, H, W]
    if attn.out_proj.bias is not None:
        pieces = pieces + attn.out_proj.bias / (N * H)
    return pieces


class _Recorder:
    """Forward hooks that only read: ln_pre output, each block's ln_1 output / ls_1 output / ls_2 output,
    and ln_post's input."""

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.store: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def _save(self, key: str, use_input: bool = False):
        def hook(_mod, inputs, output):
            self.store[key] = inputs[0] if use_input else output
            return None
        return hook

    def __enter__(self) -> "_Recorder":
        v = self.visual
        self.handles.append(v.ln_pre.register_forward_hook(self._save("ln_pre")))
        self.handles.append(v.ln_post.register_forward_hook(self._save("ln_post_in", use_input=True)))
        for i, blk in enumerate(v.transformer.resblocks):
            self.handles.append(blk.ln_1.register_forward_hook(self._save(f"ln_1.{i}")))
            self.handles.append(blk.ls_1.register_forward_hook(self._save(f"attn.{i}")))
            self.handles.append(blk.ls_2.register_forward_hook(self._save(f"mlp.{i}")))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@torch.no_grad()
def decompose_images(visual: nn.Module, images: torch.Tensor, per_token_head: bool = False,
                     check_tol: float | None = 1e-3) -> Decomposition:
    """Decompose the normalised embeddings of ``images`` ([B, 3, H, W], CLIP-normalised).

    ``per_token_head``: also return the full [B, L, N, H, D] tensor (memory: B*L*N*H*D floats).
    ``check_tol``: relative tolerance of the internal check that the recomputed CLS attention row matches the
    stock forward (None disables it).
    """
    check_supported(visual)
    if visual.training:
        raise DecompositionError("visual is in training mode (patch dropout / dropout active); call .eval()")
    L, H = num_layers_heads(visual)
    with _Recorder(visual) as rec:
        out = visual(images)                                       # [B, D] stock forward (unnormalised)
    if isinstance(out, tuple):
        out = out[0]
    st = rec.store
    r_in = st["ln_post_in"]
    r = r_in[:, 0] if r_in.dim() == 3 else r_in                    # [B, W] residual at CLS
    ln_post: nn.LayerNorm = visual.ln_post
    W = r.shape[-1]
    mu = r.mean(dim=-1, keepdim=True)                              # [B, 1]
    sigma = (r.var(dim=-1, unbiased=False, keepdim=True) + ln_post.eps).sqrt()   # [B, 1]
    gamma = ln_post.weight if ln_post.weight is not None else torch.ones(W, dtype=r.dtype, device=r.device)
    beta = ln_post.bias if ln_post.bias is not None else torch.zeros(W, dtype=r.dtype, device=r.device)
    proj = visual.proj                                             # [W, D]
    norm = out.norm(dim=-1)                                        # [B]
    # the per-image constant part, split by shares: (beta - gamma*mu/sigma) @ proj / norm    [B, D]
    const = ((beta - gamma * mu / sigma) @ proj) / norm[:, None]
    scale = (gamma / sigma) / 1.0                                  # [B, W]

    def lin(c: torch.Tensor, share: float) -> torch.Tensor:
        """c: [B, ..., W] -> [B, ..., D]; the linearised ln_post + proj + 1/norm with a ``share`` of the const."""
        extra = c.dim() - 2
        s = scale.view(scale.shape[0], *([1] * extra), W)
        n = norm.view(-1, *([1] * (extra + 1)))
        k = const.view(const.shape[0], *([1] * extra), -1)
        return (c * s) @ proj / n + share * k

    base_share = 1.0 / (2 * L + 1)
    mlps = [lin(st["ln_pre"][:, 0], base_share)]                   # [B, D]
    heads, tokens, full = [], [], []
    for i, blk in enumerate(visual.transformer.resblocks):
        x_ln = st[f"ln_1.{i}"]                                     # [B, N, W]
        N = x_ln.shape[1]
        pieces = _cls_attention_pieces(blk, x_ln)                  # [B, N, H, W]
        pieces = pieces * _layerscale(blk.ls_1, W, pieces)
        if check_tol is not None:
            ref = st[f"attn.{i}"][:, 0]                            # [B, W]
            err = (pieces.sum(dim=(1, 2)) - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            if err > check_tol:
                raise DecompositionError(f"recomputed CLS attention of resblocks.{i} differs from the stock "
                                         f"forward (relative error {float(err):.2e} > {check_tol})")
        c = lin(pieces, base_share / (N * H))                      # [B, N, H, D]
        heads.append(c.sum(dim=1))
        tokens.append(c.sum(dim=2))
        if per_token_head:
            full.append(c)
        mlps.append(lin(st[f"mlp.{i}"][:, 0], base_share))
    return Decomposition(
        heads=torch.stack(heads, dim=1), tokens=torch.stack(tokens, dim=1), mlps=torch.stack(mlps, dim=1),
        embedding=F.normalize(out, dim=-1), norm=norm,
        per_token_head=torch.stack(full, dim=1) if per_token_head else None,
        meta={"layers": L, "heads": H, "tokens": int(st["ln_1.0"].shape[1]), "width": W,
              "dim": int(proj.shape[1])})


def iter_decompositions(visual: nn.Module, batches: Iterator[torch.Tensor], device: str | torch.device = "cpu",
                        **kwargs) -> Iterator[Decomposition]:
    """Decompose a stream of image batches ([B, 3, H, W] each), one Decomposition per batch."""
    for images in batches:
        yield decompose_images(visual, images.to(device), **kwargs)


# ---- whole datasets -> chunked store ------------------------------------------------------------------------
STORE_ARRAYS = ("heads", "mlps", "cls_attn", "embedding", "labels")


def decompose_to_store(backbone, data, out_dir, batch_size: int = 32, shard_rows: int = 1024,
                       tokens: bool = False, resume: bool = True, progress: bool = True) -> dict:
    """Decompose every image of ``data`` (analysis.datasets.LabelledImages) into ``out_dir``.

    Arrays (analysis.store): heads [K, L, H, D], mlps [K, L+1, D], cls_attn [K, L, D], embedding [K, D],
    labels [K] (+ groups [K]; + tokens [K, L, N, D] with ``tokens=True``, large!), and classifier.pt ([D, C] from
    the data's class prompts) + meta.json. An interrupted run resumes after its last complete shard.
    """
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from xclip.analysis.datasets import build_classifier
    from xclip.analysis.store import ShardedWriter
    from xclip.utils.io import atomic_torch_save, atomic_write_json

    out_dir = Path(out_dir)
    visual = backbone.model.visual
    check_supported(visual)
    L, H = num_layers_heads(visual)
    D = int(visual.output_dim)
    N = int(visual.grid_size[0] * visual.grid_size[1] + 1)
    shapes = {"heads": (L, H, D), "mlps": (L + 1, D), "cls_attn": (L, D), "embedding": (D,), "labels": ()}
    dtypes = {"labels": "int64"}
    if data.groups is not None:
        shapes["groups"], dtypes["groups"] = (), "int64"
    if tokens:
        shapes["tokens"] = (L, N, D)
    writers = {k: ShardedWriter(out_dir, k, s, dtype=dtypes.get(k, "float32"), shard_rows=shard_rows,
                                resume=resume) for k, s in shapes.items()}
    start = min(w.rows_done for w in writers.values())
    if any(w.rows_done != start for w in writers.values()):   # arrays out of step: redo from the common point
        writers = {k: ShardedWriter(out_dir, k, s, dtype=dtypes.get(k, "float32"), shard_rows=shard_rows,
                                    resume=False) for k, s in shapes.items()}
        start = 0
    K = len(data)
    meta = {"backbone": backbone.spec(), "layers": L, "heads": H, "dim": D, "tokens": N, "images": K,
            "classnames": list(data.classnames), "group_names": data.group_names,
            "linearisation": "ln_post with the full residual's mean/std; K-share of centring and bias (spec A3.3)"}
    atomic_write_json(meta, out_dir / "meta.json")
    atomic_torch_save(build_classifier(backbone, data.class_prompts), out_dir / "classifier.pt")
    device = backbone.device
    bar = Progress(TextColumn("decompose"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    with bar:
        task = bar.add_task("decompose", total=K, completed=start)
        row = start
        for images in data.batches(batch_size, start=start):
            b = images.shape[0]
            dec = decompose_images(visual, images.to(device))
            parts = {"heads": dec.heads, "mlps": dec.mlps, "cls_attn": dec.cls_attn, "embedding": dec.embedding,
                     "labels": data.labels[row:row + b]}
            if "groups" in writers:
                parts["groups"] = data.groups[row:row + b]
            if tokens:
                parts["tokens"] = dec.tokens
            for k, w in writers.items():
                w.append(parts[k])
            row += b
            bar.advance(task, b)
    for w in writers.values():
        w.close()
    return meta


def load_store(out_dir) -> dict:
    """{"heads", "mlps", "cls_attn", "embedding", "labels", ("groups", "tokens") -> ShardedArray,
    "classifier": [D, C] tensor, "meta": dict}."""
    from pathlib import Path

    from xclip.analysis.store import ShardedArray
    from xclip.utils.io import read_json, safe_torch_load

    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{out_dir} is not a decomposition store (no meta.json); run `analyze.py decompose`")
    res: dict = {"meta": read_json(out_dir / "meta.json", "store meta"),
                 "classifier": safe_torch_load(out_dir / "classifier.pt", "classifier")}
    for k in (*STORE_ARRAYS, "groups", "tokens"):
        if (out_dir / f"{k}.json").is_file():
            res[k] = ShardedArray(out_dir, k)
    return res
