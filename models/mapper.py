"""StyleCLIP latent residual mappers (spec reference/styleclip_vqgan.md §3.1-3.2).

``Mapper``: PixelNorm over dim 1 (the rows of the W+ slice it gets: a StyleCLIP quirk kept for weight
compatibility), then 4 x EqualLinear(lr_mul 0.01) each with fused leaky ReLU (the last one too).
``LevelsMapper``: three Mappers on the coarse (rows 0:4), medium (4:8) and fine (8:) slices of W+; a
disabled level outputs zeros. Parameter names match StyleCLIP (``course_mapping`` sic, ``.mapping.{1..4}``),
so the ``mapper.*`` part of a released StyleCLIP mapper checkpoint loads strictly.

The edit is ``w_hat = w + 0.1 * mapper(w)`` (``edit``); the 0.1 is outside ``forward`` as in StyleCLIP.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from xclip.models.stylegan2 import EqualLinear, PixelNorm
from xclip.utils.io import safe_torch_load

LEVEL_SLICES = {"coarse": (0, 4), "medium": (4, 8), "fine": (8, None)}
RESIDUAL_SCALE = 0.1


class Mapper(nn.Module):
    def __init__(self, latent_dim: int = 512, n_layers: int = 4, lr_mul: float = 0.01):
        super().__init__()
        self.mapping = nn.Sequential(PixelNorm(dim=1), *[EqualLinear(latent_dim, latent_dim, lr_mul=lr_mul,
                                                                     activation="fused_lrelu")
                                                         for _ in range(n_layers)])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """[B, k, D] -> [B, k, D]."""
        return self.mapping(w)


class LevelsMapper(nn.Module):
    """Coarse/medium/fine mappers on W+ [B, n_latent, D]; levels can be switched off."""

    def __init__(self, latent_dim: int = 512, coarse: bool = True, medium: bool = True, fine: bool = True):
        super().__init__()
        if not (coarse or medium or fine):
            raise ValueError("LevelsMapper needs at least one of coarse/medium/fine enabled")
        self.enabled = {"coarse": coarse, "medium": medium, "fine": fine}
        # StyleCLIP's attribute names (course_mapping sic), all built so checkpoints always load
        self.course_mapping = Mapper(latent_dim)
        self.medium_mapping = Mapper(latent_dim)
        self.fine_mapping = Mapper(latent_dim)

    def _module(self, level: str) -> Mapper:
        return {"coarse": self.course_mapping, "medium": self.medium_mapping, "fine": self.fine_mapping}[level]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """W+ [B, n_latent, D] -> delta [B, n_latent, D] (zeros for disabled levels)."""
        if w.ndim != 3:
            raise ValueError(f"LevelsMapper expects W+ of shape (B, n_latent, D), got {tuple(w.shape)}")
        parts = []
        for level, (lo, hi) in LEVEL_SLICES.items():
            chunk = w[:, lo:hi]
            if chunk.shape[1] == 0:
                continue
            parts.append(self._module(level)(chunk) if self.enabled[level] else torch.zeros_like(chunk))
        return torch.cat(parts, dim=1)

    def edit(self, w: torch.Tensor, scale: float = RESIDUAL_SCALE) -> torch.Tensor:
        """w_hat = w + 0.1 * M(w)."""
        return w + scale * self(w)


def load_styleclip_mapper(path: str | Path, mapper: LevelsMapper) -> LevelsMapper:
    """Load the ``mapper.*`` tensors of a StyleCLIP mapper checkpoint (``{'state_dict': ..., 'opts': ...}``).

    Also reads the level switches from ``opts`` (``no_coarse_mapper`` etc.) when present.
    """
    ckpt = safe_torch_load(path, "StyleCLIP mapper checkpoint")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise RuntimeError(f"{path} does not hold a state dict")
    sub = {k[len("mapper."):]: v for k, v in state.items() if k.startswith("mapper.")} or state
    try:
        mapper.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: mapper tensors do not match a LevelsMapper: {str(e)[:500]}") from e
    opts = ckpt.get("opts", {}) if isinstance(ckpt, dict) else {}
    if isinstance(opts, dict):
        for level in ("coarse", "medium", "fine"):
            if opts.get(f"no_{level}_mapper"):
                mapper.enabled[level] = False
    return mapper
