"""StyleCLIP losses (spec reference/styleclip_vqgan.md §1.2, §1.3, §2, §3.3).

- ``styleclip_resize``: nearest x7 upsample then average pooling to CLIP's input size, computed exactly as a
  separable linear map (no 7x-sized intermediate); no CLIP mean/std normalisation (StyleCLIP quirk, kept).
- ``ClipLoss``: 1 - cos(E_I(resize(x)), E_T(t)) per image (= 1 - logits/100 for OpenAI CLIP).
- ``latent_l2_sum`` (optimisation: squared L2 summed) and ``latent_mse`` (mapper: mean).
- ``IDLoss`` is in models/arcface.py and re-exported here.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from xclip.models.arcface import IDLoss  # noqa: F401  (re-export)
from xclip.models.clip_backbone import ClipBackbone


@lru_cache(maxsize=32)
def _upsample_pool_matrix(size: int, out: int, factor: int = 7) -> torch.Tensor:
    """[out, size] matrix equal to nearest-upsample by ``factor`` then adaptive average pool to ``out``."""
    big = size * factor
    m = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):  # adaptive pool window, as torch computes it
        lo, hi = (i * big) // out, -((-(i + 1) * big) // out)
        for j in range(lo, hi):
            m[i, j // factor] += 1.0 / (hi - lo)
    return m.float()


def styleclip_resize(images: torch.Tensor, clip_size: int, factor: int = 7) -> torch.Tensor:
    """[B, 3, S, S] -> [B, 3, clip_size, clip_size] = AvgPool(Upsample_nearest(x, 7)) (224 from 1024 or 256)."""
    s = images.shape[-1]
    if images.shape[-2] != s:
        raise ValueError(f"styleclip_resize expects square images, got {tuple(images.shape)}")
    m = _upsample_pool_matrix(s, clip_size, factor).to(images.device, images.dtype)  # [out, S]
    return torch.einsum("oh,bchw,pw->bcop", m, images, m)


class ClipLoss(nn.Module):
    """CLIP distance of generator images to one fixed text (tokenised once)."""

    def __init__(self, backbone: ClipBackbone, description: str, normalize_pixels: bool = False):
        super().__init__()
        self.__dict__["backbone"] = backbone  # not a submodule: its owner moves/freezes/checkpoints it
        self.description = description
        self.normalize_pixels = normalize_pixels
        self.register_buffer("tokens", backbone.tokenize([description]).cpu(), persistent=False)  # [1, L]
        with torch.no_grad():
            self.register_buffer("text_features", backbone.encode_text(self.tokens.to(backbone.device)).cpu(),
                                 persistent=False)  # [1, D], unit norm

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Generator images [B, 3, S, S] in [-1, 1] -> CLIP input [B, 3, P, P]."""
        x = styleclip_resize(images, self.backbone.image_size)
        if self.normalize_pixels:  # optional fix of the quirk: map [-1, 1] -> [0, 1] and CLIP-normalise
            x = self.backbone.normalize_pixels((x + 1) / 2)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """-> [B] of 1 - cos."""
        feats = self.backbone.encode_image(self.prepare(images), normalize=True)  # [B, D]
        return 1 - (feats * self.text_features.to(feats)).sum(-1)


def latent_l2_sum(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Squared L2 summed over all entries (the optimisation regulariser)."""
    return (w - w0).pow(2).sum()


def latent_mse(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Mean squared error (the mapper's latent loss, nn.MSELoss)."""
    return F.mse_loss(w, w0)
