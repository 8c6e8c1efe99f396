"""CoOp prompt learner (spec §2.1): learnable context vectors around the class-name tokens.

Prompt layouts (M = n_ctx, n = BPE tokens of the class name):
    end    [SOS][ctx 1..M][class][.][EOT]
    middle [SOS][ctx 1..M/2][class][ctx M/2+1..M][.][EOT]
    front  [SOS][class][ctx 1..M][.][EOT]
The token sequence is always that of ``"X " * M + name + "."``; the other layouts are a per-class permutation
of positions 1..M+n, so the EOT index (``argmax`` of the token ids) is the same for every layout.

Only ``ctx`` is a parameter; the frozen SOS / class / suffix embeddings are non-persistent buffers, rebuilt
from the backbone, so a checkpoint holds the context alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xclip.models.clip_backbone import ClipBackbone

log = logging.getLogger(__name__)
POSITIONS = ("end", "middle", "front")
DEFAULT_N_CTX = 16


@dataclass
class PromptSet:
    """Frozen pieces of the prompts of one list of class names."""
    classnames: list[str]
    tokens: torch.Tensor      # [C, L] token ids of "X X ... X name."
    prefix: torch.Tensor      # [C, 1, W] SOS embedding
    suffix: torch.Tensor      # [C, L-1-M, W] embeddings of name, '.', EOT, padding
    perm: torch.Tensor | None  # [C, L] gather index giving the middle/front layout, None for end
    eot_index: torch.Tensor   # [C]
    name_mask: torch.Tensor   # [C, L] 1 at the class-name token positions of the final layout
    name_lens: list[int]


def clean_classname(name: str) -> str:
    return name.replace("_", " ").strip()


def _bpe_len(backbone: ClipBackbone, text: str) -> int:
    tok = backbone.tokenizer
    if not hasattr(tok, "encode"):
        raise TypeError(f"The tokenizer of {backbone.name!r} ({type(tok).__name__}) has no .encode(); CoOp needs "
                        f"open_clip's SimpleTokenizer to count class-name tokens.")
    return len(tok.encode(text))


class PromptLearner(nn.Module):
    """ctx [M, W] (unified) or [C, M, W] (class-specific); ``forward()`` -> (embeds [C, L, W], eot [C])."""

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], n_ctx: int | None = None,
                 ctx_init: str = "", csc: bool = False, class_token_position: str = "end",
                 init_std: float = 0.02):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position={class_token_position!r}; expected one of {POSITIONS}.")
        if not classnames:
            raise ValueError("PromptLearner needs at least one class name.")
        self.__dict__["backbone"] = backbone  # not a submodule: never saved, never trained
        self.class_token_position = class_token_position
        self.csc = csc
        emb = backbone.model.token_embedding
        width = emb.weight.shape[1]
        ctx_init = (ctx_init or "").strip()
        if ctx_init:
            ids = backbone.tokenize([ctx_init])[0]  # [L]
            phrase_len = _bpe_len(backbone, ctx_init)
            if n_ctx is not None and n_ctx != phrase_len:
                raise ValueError(f"n_ctx={n_ctx} but ctx_init={ctx_init!r} has {phrase_len} tokens; "
                                 f"leave n_ctx unset (null) or make them agree.")
            n_ctx = phrase_len
            with torch.no_grad():
                init = emb(ids[1:1 + n_ctx].to(emb.weight.device)).detach().clone().float()  # [M, W]
            if csc:
                init = init.unsqueeze(0).repeat(len(classnames), 1, 1)  # [C, M, W]
        else:
            n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
            shape = (len(classnames), n_ctx, width) if csc else (n_ctx, width)
            init = torch.randn(shape) * init_std
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}.")
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(init.to(emb.weight.device))
        self.classnames = [clean_classname(c) for c in classnames]
        ps = self.build_prompt_set(self.classnames)
        # training prompts: buffers so they follow .to(device); not persistent (rebuilt from the backbone)
        for name in ("tokens", "prefix", "suffix", "eot_index", "name_mask"):
            self.register_buffer(name, getattr(ps, name), persistent=False)
        self.register_buffer("perm", ps.perm, persistent=False)
        self.name_lens = ps.name_lens
        self._cache: dict[tuple[str, ...], PromptSet] = {}

    # ---- building ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def build_prompt_set(self, classnames: Sequence[str]) -> PromptSet:
        bb = self.backbone
        names = [clean_classname(c) for c in classnames]
        M, L = self.n_ctx, bb.context_length
        name_lens = [_bpe_len(bb, n) for n in names]
        too_long = [n for n, k in zip(names, name_lens) if 1 + M + k + 2 > L]
        if too_long:
            raise ValueError(f"Prompts for {too_long[:3]} exceed the context length {L} with n_ctx={M}.")
        tokens = bb.tokenize([" ".join(["X"] * M) + " " + n + "." for n in names])  # [C, L]
        tokens = tokens.to(self.ctx.device)
        emb = bb.model.token_embedding(tokens).to(self.ctx.dtype)  # [C, L, W]
        eot = tokens.argmax(-1)  # [C]
        C = len(names)
        idx0 = {"end": 1 + M, "middle": 1 + M // 2, "front": 1}[self.class_token_position]
        positions = torch.arange(L, device=tokens.device)
        lens = torch.tensor(name_lens, device=tokens.device)
        name_mask = ((positions >= idx0) & (positions < idx0 + lens[:, None])).float()  # [C, L]
        perm = None
        if self.class_token_position != "end":
            rows = []
            for k in name_lens:
                ctx_pos = list(range(1, 1 + M))
                cls_pos = list(range(1 + M, 1 + M + k))
                if self.class_token_position == "front":
                    order = cls_pos + ctx_pos
                else:
                    half = M // 2
                    order = ctx_pos[:half] + cls_pos + ctx_pos[half:]
                rows.append([0] + order + list(range(1 + M + k, L)))
            perm = torch.tensor(rows, device=tokens.device)  # [C, L]
        return PromptSet(names, tokens, emb[:, :1].clone(), emb[:, 1 + M:].clone(), perm, eot, name_mask,
                         name_lens)

    def prompt_set(self, classnames: Sequence[str] | None = None) -> PromptSet:
        if classnames is None or [clean_classname(c) for c in classnames] == self.classnames:
            return PromptSet(self.classnames, self.tokens, self.prefix, self.suffix, self.perm, self.eot_index,
                             self.name_mask, self.name_lens)
        if self.csc:
            raise ValueError(f"Class-specific contexts were learned for {len(self.classnames)} classes "
                             f"{self.classnames[:3]}...; they cannot prompt other class names {list(classnames)[:3]}.")
        key = tuple(clean_classname(c) for c in classnames)
        ps = self._cache.get(key)
        if ps is None or ps.tokens.device != self.ctx.device:
            ps = self._cache[key] = self.build_prompt_set(key)
        return ps

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, classnames: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompt token embeddings [C, L, W] (before the positional embedding), EOT index [C]."""
        ps = self.prompt_set(classnames)
        C = ps.tokens.shape[0]
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(C, -1, -1)  # [C, M, W]
        embeds = torch.cat([ps.prefix, ctx.to(ps.prefix.dtype), ps.suffix], dim=1)  # [C, L, W] (end layout)
        if ps.perm is not None:
            embeds = torch.gather(embeds, 1, ps.perm[:, :, None].expand(-1, -1, embeds.shape[-1]))
        return embeds, ps.eot_index

    def text_features(self, classnames: Sequence[str] | None = None, normalize: bool = True) -> torch.Tensor:
        """-> [C, D] text features of the prompts (gradients reach ctx).

        With a causal text tower (CLIP's), positions after the last EOT cannot influence any pooled feature, so the
        sequence is cut to ``max(eot) + 1`` tokens: the same features (to float rounding) for a fraction of the
        cost (about 21 of 77 tokens for M=16 and short class names).
        """
        from xclip.models.relevance import encode_text_from_embeddings

        embeds, eot = self(classnames)
        if _causal_text_tower(self.backbone.model):
            embeds = embeds[:, :int(eot.max()) + 1]
        feats = encode_text_from_embeddings(self.backbone, embeds, eot)  # [C, D]
        return F.normalize(feats, dim=-1) if normalize else feats


def _causal_text_tower(model: nn.Module) -> bool:
    """True when the text transformer runs under a causal mask (OpenAI-style CLIP)."""
    src = model.text if hasattr(model, "text") and hasattr(model.text, "transformer") else model
    return getattr(src, "attn_mask", None) is not None
