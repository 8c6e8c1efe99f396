"""Cutouts + augmentations for VQGAN-CLIP (spec styleclip_vqgan.md 5.4, ntlb_coop.md 4.3), in plain torch.

Two cut methods:
- ``"pooling"`` (nerdyrodent "latest" / NTLB spatial notebook): every cutout is (adaptive-avg + adaptive-max)/2 of
  the whole image at ``cut_size``; diversity comes from the augmentations.
- ``"crops"`` (Crowson original): random square crops of size floor(u**cut_pow * (max - min) + min), resampled to
  ``cut_size`` with antialiased bicubic interpolation (the original uses a Lanczos-2 prefilter; same purpose).

Augmentations (re-implemented without kornia): geometric ones (random affine: rotation +-15 deg, translate 0.1,
shear 5 deg; random perspective 0.7 — each with p 0.7) are applied identically to the image and to its masks;
photometric ones (colour jitter 0.1, random erasing scale (0.1, 0.4)) and noise U(0, noise_fac) * randn touch
only the image. Every cutout gets its own draw (the anchor notebook's bug — ``return`` inside the loop, one view
broadcast into ``cutn`` noise copies — is not reproduced).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xclip.models.vqgan import clamp_with_grad


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:  # [B, C, H, W] -> [B, C, size, size]
    return (F.adaptive_avg_pool2d(x, size) + F.adaptive_max_pool2d(x, size)) / 2


def _affine_mats(n: int, degrees: float, translate: float, shear: float, p: float,
                 generator: torch.Generator | None, device) -> torch.Tensor:
    """n random 2x3 affine matrices in normalised coordinates (identity with probability 1 - p): [n, 2, 3]."""
    u = torch.rand(n, 5, generator=generator).to(device) * 2 - 1          # [n, 5] in [-1, 1]
    ang = u[:, 0] * math.radians(degrees)
    sh = u[:, 1] * math.radians(shear)
    tx, ty = u[:, 2] * translate * 2, u[:, 3] * translate * 2             # normalised coords span 2
    cos, sin = torch.cos(ang), torch.sin(ang)
    a = torch.stack([torch.stack([cos, -sin + torch.tan(sh) * cos, tx], -1),
                     torch.stack([sin, cos + torch.tan(sh) * sin, ty], -1)], 1)  # [n, 2, 3]
    keep = (torch.rand(n, generator=generator) < p).to(device).view(n, 1, 1)
    eye = torch.eye(2, 3, device=device).expand(n, 2, 3)
    return torch.where(keep, a, eye)


def _perspective_grid(n: int, size: int, distortion: float, p: float, generator: torch.Generator | None,
                      device) -> torch.Tensor:
    """Sampling grids of random perspective warps (corners moved by up to distortion/2 of the side): [n, S, S, 2]."""
    src = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]], device=device)  # output corners
    jitter = (torch.rand(n, 4, 2, generator=generator).to(device) * 2 - 1) * distortion / 2
    keep = (torch.rand(n, generator=generator) < p).to(device).view(n, 1, 1)
    dst = src + jitter * keep                                                         # [n, 4, 2]
    # solve the homography mapping output corners (src) to input corners (dst): 8 unknowns per sample
    rows = []
    for i in range(4):
        x, y = src[i]
        X, Y = dst[:, i, 0], dst[:, i, 1]
        z = torch.zeros_like(X)
        o = torch.ones_like(X)
        rows.append(torch.stack([x * o, y * o, o, z, z, z, -x * X, -y * X], -1))
        rows.append(torch.stack([z, z, z, x * o, y * o, o, -x * Y, -y * Y], -1))
    A = torch.stack(rows, 1)                                                          # [n, 8, 8]
    b = dst.reshape(n, 8)
    h = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)                            # [n, 8]
    H = torch.cat([h, torch.ones(n, 1, device=device)], 1).view(n, 3, 3)
    lin = torch.linspace(-1, 1, size, device=device)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)              # [1, S*S, 3]
    out = pts @ H.transpose(1, 2)                                                     # [n, S*S, 3]
    return (out[..., :2] / out[..., 2:].clamp_min(1e-6)).view(n, size, size, 2)


class MakeCutouts(nn.Module):
    """image [1, 3, H, W] in [0, 1] (+ masks [1, K, H, W]) -> cutouts [cutn, 3, S, S] (+ masks [cutn, K, S, S])."""

    def __init__(self, cut_size: int, cutn: int, cut_pow: float = 1.0, method: str = "pooling",
                 augment: bool = True, noise_fac: float = 0.1, squash_size: int | None = None):
        super().__init__()
        if method not in ("pooling", "crops"):
            raise ValueError(f"cut_method must be 'pooling' or 'crops', got {method!r}")
        if cutn < 1:
            raise ValueError(f"cutn must be >= 1, got {cutn}")
        self.cut_size, self.cutn, self.cut_pow = cut_size, cutn, cut_pow
        self.method, self.augment, self.noise_fac, self.squash_size = method, augment, noise_fac, squash_size

    def _crops(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        _, _, h, w = x.shape
        max_size, min_size = min(h, w), min(h, w, self.cut_size)
        out = []
        for _ in range(self.cutn):
            u = torch.rand((), generator=g).item()
            size = int(u ** self.cut_pow * (max_size - min_size) + min_size)
            ox = int(torch.randint(0, w - size + 1, (), generator=g))
            oy = int(torch.randint(0, h - size + 1, (), generator=g))
            crop = x[:, :, oy:oy + size, ox:ox + size]
            out.append(F.interpolate(crop, size=(self.cut_size, self.cut_size), mode="bicubic",
                                     align_corners=False, antialias=size > self.cut_size))
        return torch.cat(out)                                                 # [cutn, C, S, S]

    def forward(self, image: torch.Tensor, masks: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(f"MakeCutouts expects one image [1, 3, H, W], got {tuple(image.shape)}")
        k = 0 if masks is None else masks.shape[1]
        x = image if masks is None else torch.cat([image, masks.to(image)], 1)  # [1, 3+K, H, W]
        if self.squash_size:
            x = F.interpolate(x, size=(self.squash_size, self.squash_size), mode="bilinear", align_corners=False)
        if self.method == "pooling":
            x = _pool(x, self.cut_size).expand(self.cutn, -1, -1, -1)           # [cutn, 3+K, S, S]
        else:
            x = self._crops(x, generator)
        dev, n, s = x.device, self.cutn, self.cut_size
        if self.augment:
            theta = _affine_mats(n, 15.0, 0.1, 5.0, 0.7, generator, dev)
            grid = F.affine_grid(theta, [n, x.shape[1], s, s], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            grid = _perspective_grid(n, s, 0.7, 0.7, generator, dev)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        img, msk = x[:, :3], (x[:, 3:3 + k] if k else None)
        if self.augment:
            img = self._photometric(img, generator)
        if self.noise_fac:
            facs = torch.rand(n, 1, 1, 1, generator=generator).to(dev) * self.noise_fac
            noise = torch.randn(img.shape, generator=generator).to(dev)
            img = img + facs * noise
        return clamp_with_grad(img, 0.0, 1.0), msk

    @staticmethod
    def _photometric(img: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """ColorJitter(0.1 brightness/contrast/saturation, p 0.7) + RandomErasing(scale .1-.4, p 0.7): [n,3,S,S]."""
        n, _, s, _ = img.shape
        dev = img.device
        on = (torch.rand(n, 1, 1, 1, generator=g) < 0.7).to(dev).to(img.dtype)
        jit = (torch.rand(n, 3, 1, 1, generator=g).to(dev) * 2 - 1) * 0.1 * on  # [n, 3(b,c,s), 1, 1]
        img = img * (1 + jit[:, 0:1])
        mean = img.mean((1, 2, 3), keepdim=True)
        img = (img - mean) * (1 + jit[:, 1:2]) + mean
        grey = img.mean(1, keepdim=True)
        img = (img - grey) * (1 + jit[:, 2:3]) + grey
        # random erasing: one rectangle per cutout with area fraction U(0.1, 0.4), aspect U(0.3, 3.3)
        area = torch.rand(n, generator=g) * 0.3 + 0.1
        aspect = torch.exp(torch.rand(n, generator=g) * (math.log(3.3) - math.log(0.3)) + math.log(0.3))
        eh = (torch.sqrt(area * aspect) * s).clamp(1, s).long()
        ew = (torch.sqrt(area / aspect) * s).clamp(1, s).long()
        y0 = (torch.rand(n, generator=g) * (s - eh + 1).float()).long()
        x0 = (torch.rand(n, generator=g) * (s - ew + 1).float()).long()
        ar = torch.arange(s)
        box = ((ar.view(1, s, 1) >= y0.view(n, 1, 1)) & (ar.view(1, s, 1) < (y0 + eh).view(n, 1, 1)) &
               (ar.view(1, 1, s) >= x0.view(n, 1, 1)) & (ar.view(1, 1, s) < (x0 + ew).view(n, 1, 1)))
        erase = box & (torch.rand(n, 1, 1, generator=g) < 0.7)                   # [n, S, S]
        return img * (~erase).to(dev).unsqueeze(1).to(img.dtype)
