"""StyleCLIP latent residual mappers (spec reference/styleclip_vqgan.md §3.1-3.2).

``Mapper``: PixelNorm over dim 1 (the rows of the W+ slice it gets: a StyleCLIP quirk kept for weight
compatibility), then 4 x EqualLinear(lr_mul 0.01) each with fused leaky ReLU (the last one too).
``LevelsMapper``: Mappers on the coarse (rows 0:4), medium (4:8) and fine (8:) slices of W+; a disabled level
(StyleCLIP's ``--no_coarse_mapper`` / ``--no_medium_mapper`` / ``--no_fine_mapper``) has no parameters and outputs
zeros, exactly as in StyleCLIP. Parameter names match StyleCLIP (``course_mapping`` sic, ``.mapping.{1..4}``),
so the ``mapper.*`` part of a StyleCLIP mapper file loads strictly.

``read_styleclip_mapper`` reads StyleCLIP's own mapper files (``mapper/training/coach.py``: ``{'state_dict':
StyleCLIPMapper.state_dict(), 'opts': vars(opts)}``, so ``mapper.*`` plus the generator as ``decoder.*``) and this
project's mapper checkpoints (``mapper.*`` + ``hyper_parameters``), with ``torch.load(weights_only=True)``; the
levels come from ``opts`` (StyleCLIP) or the hyperparameters, checked against the tensors present.

The edit is ``w_hat = w + 0.1 * mapper(w)`` (``edit``); the 0.1 is outside ``forward`` as in StyleCLIP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xclip.models.stylegan2 import EqualLinear, PixelNorm
from xclip.utils.io import safe_torch_load

LEVEL_SLICES = {"coarse": (0, 4), "medium": (4, 8), "fine": (8, None)}
MODULE_NAMES = {"coarse": "course_mapping", "medium": "medium_mapping", "fine": "fine_mapping"}  # StyleCLIP's
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
    """Coarse/medium/fine mappers on W+ [B, n_latent, D]; a switched-off level has no parameters (StyleCLIP)."""

    def __init__(self, latent_dim: int = 512, coarse: bool = True, medium: bool = True, fine: bool = True):
        super().__init__()
        if not (coarse or medium or fine):
            raise ValueError("LevelsMapper needs at least one of coarse/medium/fine enabled")
        self.enabled = {"coarse": coarse, "medium": medium, "fine": fine}
        # StyleCLIP's attribute names (course_mapping sic); only the enabled levels exist, as in StyleCLIP
        for level, on in self.enabled.items():
            if on:
                setattr(self, MODULE_NAMES[level], Mapper(latent_dim))

    def _module(self, level: str) -> Mapper:
        return getattr(self, MODULE_NAMES[level])

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


# ---- mapper files -----------------------------------------------------------------------------------------
class MapperFileError(RuntimeError):
    """A mapper file that cannot be used; the message names the file, the key and the fix."""


@dataclass
class MapperFile:
    """What a mapper file holds. ``kind``: ``"styleclip"`` (StyleCLIP's ``.pt``) or ``"xclip"`` (train.py fit).

    ``decoder_state``: StyleCLIP's generator tensors (``decoder.*`` stripped; rosinality layout), empty for
    project checkpoints (their generator is rebuilt from ``hyper_parameters``). ``opts``: StyleCLIP's options
    (``description``, ``stylegan_size``, ...) or the project's hyperparameters.
    """

    kind: str
    mapper: LevelsMapper
    opts: dict[str, Any]
    decoder_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def description(self) -> str | None:
        d = self.opts.get("description")
        return str(d) if d is not None else None


def _levels_from_keys(state: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {level: any(k.startswith(MODULE_NAMES[level] + ".") for k in state) for level in LEVEL_SLICES}


def _is_styleclip_file(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and isinstance(ckpt.get("opts"), dict) and isinstance(ckpt.get("state_dict"), dict) \
        and any(str(k).startswith("mapper.") for k in ckpt["state_dict"])


def is_styleclip_mapper_file(ckpt: Any) -> bool:
    """True for an already-loaded StyleCLIP mapper file ``{'state_dict': {'mapper.*', 'decoder.*'}, 'opts': {...}}``."""
    return _is_styleclip_file(ckpt)


def mapper_from_state(ckpt: dict[str, Any], source: str) -> MapperFile:
    """Build the mapper a loaded file describes and load its tensors strictly (see ``read_styleclip_mapper``)."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise MapperFileError(f"{source} holds no 'state_dict': not a StyleCLIP mapper file nor a mapper "
                              f"checkpoint of this project.")
    sub = {k[len("mapper."):]: v for k, v in state.items() if str(k).startswith("mapper.")}
    if not sub:
        raise MapperFileError(f"{source}: no 'mapper.*' tensors in its state_dict (keys: {list(state)[:6]}).")
    styleclip = _is_styleclip_file(ckpt)
    opts = dict(ckpt["opts"] if styleclip else ckpt.get("hyper_parameters") or {})
    found = _levels_from_keys(sub)
    if styleclip:
        if opts.get("work_in_stylespace"):
            raise MapperFileError(f"{source}: opts['work_in_stylespace'] is True (a StyleSpace mapper); only W+ "
                                  f"LevelsMapper files are supported.")
        mapper_type = opts.get("mapper_type", "LevelsMapper")
        if mapper_type != "LevelsMapper":
            raise MapperFileError(f"{source}: opts['mapper_type'] is {mapper_type!r}; only 'LevelsMapper' "
                                  f"(StyleCLIP's default) is supported.")
        levels = {level: not bool(opts.get(f"no_{level}_mapper", False)) for level in LEVEL_SLICES}
        switch = {level: f"opts['no_{level}_mapper']" for level in LEVEL_SLICES}
    else:
        levels = {level: bool(opts.get(level, found[level])) for level in LEVEL_SLICES}
        switch = {level: f"hyper_parameters['{level}']" for level in LEVEL_SLICES}
    for level in LEVEL_SLICES:
        if levels[level] != found[level]:
            raise MapperFileError(
                f"{source}: {switch[level]} says the {level} level is {'on' if levels[level] else 'off'}, but the "
                f"file {'lacks' if levels[level] else 'has'} {MODULE_NAMES[level]}.* tensors; the file is "
                f"inconsistent (written by another mapper class?).")
    if not any(levels.values()):
        raise MapperFileError(f"{source}: every level is switched off.")
    first = next(k for k in sub if k.endswith("mapping.1.weight"))
    mapper = LevelsMapper(int(sub[first].shape[1]), **levels)
    try:
        mapper.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise MapperFileError(f"{source}: mapper tensors do not match a LevelsMapper: {str(e)[:500]}") from e
    decoder = {k[len("decoder."):]: v for k, v in state.items() if str(k).startswith("decoder.")}
    return MapperFile("styleclip" if styleclip else "xclip", mapper, opts, decoder)


def read_styleclip_mapper(path: str | Path) -> MapperFile:
    """Read a StyleCLIP mapper ``.pt`` or a project mapper checkpoint safely and build its mapper."""
    return mapper_from_state(safe_torch_load(path, "StyleCLIP mapper file"), str(path))


def load_styleclip_mapper(path: str | Path, mapper: LevelsMapper | None = None) -> LevelsMapper:
    """The mapper of a StyleCLIP mapper file (levels from its ``opts``); with ``mapper``, the file's tensors are
    loaded into it (its levels must be the file's)."""
    f = read_styleclip_mapper(path)
    if mapper is None:
        return f.mapper
    if mapper.enabled != f.mapper.enabled:
        raise MapperFileError(f"{path}: levels {f.mapper.enabled} differ from the given mapper's {mapper.enabled}; "
                              f"call load_styleclip_mapper(path) to build the file's own mapper.")
    mapper.load_state_dict(f.mapper.state_dict(), strict=True)
    return mapper
