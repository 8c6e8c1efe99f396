"""CoOp prompt learner (spec §2.1): learnable context vectors around the class-name tokens.

Prompt layouts (M = n_ctx, n = BPE tokens of the class name):
    end    [SOS][ctx 1..M][class][.][EOT]
    middle [SOS][ctx 1..M/2][class][ctx M/2+1..M][.][EOT]
    front  [SOS][class][ctx 1..M][.][EOT]
The token sequence is always that of ``"X " * M + name + "."``; the other layouts are a per-class permutation
of positions 1..M+n, so the EOT index (``argmax`` of the token ids) is the same for every layout.

Only ``ctx`` is a parameter; the frozen SOS / class / suffix embeddings are non-persistent buffers, rebuilt
from the backbone, so a checkpoint holds the context alone.

``read_dassl_prompt_checkpoint`` reads CoOp's own released prompt files (``prompt_learner/model.pth.tar-N``, written
by Dassl's ``save_checkpoint``) without running any class named in the file.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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


def clean_ctx_init(phrase: str) -> str:
    """CoOp's ``CTX_INIT`` cleaning: ``_`` -> space (so ``a_photo_of_a`` works from a shell), outer spaces dropped."""
    return (phrase or "").replace("_", " ").strip()


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
        ctx_init = clean_ctx_init(ctx_init)
        if ctx_init:
            ids = backbone.tokenize([ctx_init])[0]  # [L]
            phrase_len = _bpe_len(backbone, ctx_init)
            if n_ctx is not None and n_ctx != phrase_len:
                raise ValueError(f"n_ctx={n_ctx} but ctx_init={ctx_init!r} has {phrase_len} tokens; "
                                 f"leave n_ctx unset (null) or make them agree.")
            n_ctx = phrase_len
            with torch.no_grad():
                init = emb(ids[1:1 + n_ctx].to(emb.weight.device)).detach().clone().float()  # [M, W]
            if csc:  # CoOp ignores CSC here (one generic context); we give each class its own copy of the phrase
                log.info("ctx_init=%r with csc=True: one context per class, each initialised from the phrase "
                         "(CoOp would ignore CSC and learn one generic context; set csc=false for that).", ctx_init)
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


# ---- CoOp's released prompt files (Dassl checkpoints) ---------------------------------------------------------------
class DasslPickledObject:
    """Inert stand-in for an object pickled inside a Dassl checkpoint (its LR scheduler's successor and that
    scheduler's optimizer): the unpickled state is kept as a plain dict, no method of the original class runs."""

    original = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {"_state": state}

    def __repr__(self) -> str:
        return f"<pickled {self.original}: {sorted(getattr(self, 'state', {}))}>"


def _pickled(name: str) -> type:
    return type(name.rsplit(".", 1)[-1] + "Record", (DasslPickledObject,), {"original": name})


def _defaultdict_as_dict(default_factory: Any = None, *args: Any) -> dict:
    """collections.defaultdict(dict) in the optimizer state -> a plain dict (the factory is never called)."""
    return {}


_NOT_CALLABLE = object()  # stands for builtins.dict, which only appears as the defaultdict factory
# Exactly the globals a CoOp checkpoint holds besides tensors: Dassl's warm-up scheduler state dict keeps its
# successor (torch's CosineAnnealingLR, CoOp's only schedule), which keeps its optimizer (SGD, CoOp's only
# optimizer), whose state is a defaultdict(dict).  Each maps to an inert record; nothing else is accepted.
DASSL_CHECKPOINT_GLOBALS: tuple[tuple[Any, str], ...] = (
    (_pickled("torch.optim.lr_scheduler.CosineAnnealingLR"), "torch.optim.lr_scheduler.CosineAnnealingLR"),
    (_pickled("torch.optim.sgd.SGD"), "torch.optim.sgd.SGD"),
    (_defaultdict_as_dict, "collections.defaultdict"),
    (_NOT_CALLABLE, "builtins.dict"),
)
DASSL_FILE_RE = re.compile(r"(^model\.pth\.tar-\d+$)|(^model-best\.pth\.tar$)")


@dataclass
class DasslPromptCheckpoint:
    """What a CoOp prompt file holds: ``ctx`` [M, W] (generic) or [C, M, W] (class-specific), in float32."""
    path: Path
    ctx: torch.Tensor
    token_prefix: torch.Tensor | None  # [C, 1, W] SOS embedding of the training prompts (CoOp never loads it)
    token_suffix: torch.Tensor | None  # [C, L-1-M, W] class name, '.', EOT, padding
    epoch: int | None
    stored_dtype: torch.dtype
    extra: dict = field(default_factory=dict)  # val_result and the keys of optimizer / scheduler

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[-2])

    @property
    def csc(self) -> bool:
        return self.ctx.dim() == 3

    @property
    def n_cls(self) -> int | None:
        ref = self.token_prefix if self.token_prefix is not None else self.token_suffix
        return int(ref.shape[0]) if ref is not None else (int(self.ctx.shape[0]) if self.csc else None)


def read_dassl_prompt_checkpoint(path: str | Path) -> DasslPromptCheckpoint:
    """Read a CoOp prompt checkpoint (``{'state_dict': {ctx, token_prefix, token_suffix}, 'epoch', 'optimizer',
    'scheduler', 'val_result'}``) with ``torch.load(weights_only=True)``; the torch scheduler / optimizer objects
    that Dassl's scheduler state dict pickles become inert records (DASSL_CHECKPOINT_GLOBALS), any other class is
    refused with its name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CoOp prompt checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(DASSL_CHECKPOINT_GLOBALS)):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", msg)
        hint = (f"it pickles {m.group(1)}, which is not among the classes a CoOp checkpoint holds "
                f"({', '.join(n for _, n in DASSL_CHECKPOINT_GLOBALS)}); it is refused rather than run"
                if m else "truncated or not a torch file?")
        raise RuntimeError(f"Could not read CoOp prompt checkpoint {path} ({hint}): {type(e).__name__}: "
                           f"{msg.splitlines()[0] if msg else ''}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise RuntimeError(f"{path} is not a Dassl/CoOp checkpoint: expected a dict with 'state_dict', got "
                           f"{type(ckpt).__name__} with keys {sorted(ckpt)[:8] if isinstance(ckpt, dict) else ''}.")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
    ctx = state.get("ctx")
    if not isinstance(ctx, torch.Tensor) or ctx.dim() not in (2, 3) or not ctx.is_floating_point():
        raise RuntimeError(f"{path}: state_dict['ctx'] must be a float tensor [M, W] or [C, M, W]; state_dict keys "
                           f"are {sorted(state)[:8]} (ctx: {getattr(ctx, 'shape', type(ctx).__name__)}).")
    prefix, suffix = state.get("token_prefix"), state.get("token_suffix")
    for name, t in (("token_prefix", prefix), ("token_suffix", suffix)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != ctx.shape[-1]):
            raise RuntimeError(f"{path}: state_dict[{name!r}] should be [C, n, {ctx.shape[-1]}], got "
                               f"{getattr(t, 'shape', type(t).__name__)}.")
    epoch = ckpt.get("epoch")
    extra = {"val_result": ckpt.get("val_result"),
             "optimizer_keys": sorted(ckpt["optimizer"]) if isinstance(ckpt.get("optimizer"), dict) else None,
             "scheduler_keys": sorted(ckpt["scheduler"]) if isinstance(ckpt.get("scheduler"), dict) else None}
    return DasslPromptCheckpoint(path, ctx.detach().float().contiguous(),
                                 None if prefix is None else prefix.detach().float(),
                                 None if suffix is None else suffix.detach().float(),
                                 int(epoch) if isinstance(epoch, int) else None, ctx.dtype, extra)


def is_dassl_prompt_checkpoint(path: str | Path) -> bool:
    """True for a file that looks like CoOp's ``model.pth.tar-N`` / ``model-best.pth.tar`` (by name, or by the
    globals it pickles: only those of DASSL_CHECKPOINT_GLOBALS beyond torch's own). Reads no tensors, runs nothing."""
    path = Path(path)
    if DASSL_FILE_RE.match(path.name):
        return True
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return False
    allowed = {n for _, n in DASSL_CHECKPOINT_GLOBALS}
    return unsafe <= allowed and bool(unsafe & {"torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.sgd.SGD"})


def check_prompt_file_backbone(ckpt: DasslPromptCheckpoint, backbone: ClipBackbone, atol: float = 2e-3) -> None:
    """The file's SOS embedding (token_prefix) must be this backbone's: a prompt trained on another CLIP (RN50 vs
    ViT-B-32 have the same width) would otherwise load without a word."""
    emb = backbone.model.token_embedding.weight
    if ckpt.ctx.shape[-1] != emb.shape[1]:
        raise ValueError(f"{ckpt.path}: context width {ckpt.ctx.shape[-1]} != {backbone.name}'s token width "
                         f"{emb.shape[1]}; the prompt was learned on another CLIP.")
    L = backbone.context_length
    if ckpt.token_suffix is not None and 1 + ckpt.n_ctx + ckpt.token_suffix.shape[1] != L:
        raise ValueError(f"{ckpt.path}: 1 + n_ctx ({ckpt.n_ctx}) + suffix ({ckpt.token_suffix.shape[1]}) tokens != "
                         f"{backbone.name}'s context length {L}.")
    if ckpt.token_prefix is None:
        return
    sos = int(backbone.tokenize([""])[0, 0])
    ours = emb[sos].detach().float().cpu()
    diff = (ckpt.token_prefix[:, 0] - ours).abs().max().item()
    if diff > atol * max(1.0, ours.abs().max().item()):
        raise ValueError(f"{ckpt.path}: its SOS embedding (token_prefix) differs from {backbone.name}/"
                         f"{backbone.pretrained}'s by {diff:.3g}: the prompt was learned on another CLIP. Give the "
                         f"backbone it was trained with (CoOp's folders say it: rn50_*, vit_b32_*, ...).")
