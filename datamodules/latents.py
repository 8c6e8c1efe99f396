"""StyleCLIP mapper data: inverted W+ latents from ``.pt`` files, or z seeds when no files are given.

Spec reference/styleclip_vqgan.md §3.5. A latent file holds one tensor (N, n_latent, style_dim), e.g. e4e's
``train_faces.pt`` (N, 18, 512) for a 1024 px generator; n_latent = 2*log2(size) - 2. Without files the
datamodule yields z ~ N(0, I) vectors [style_dim]; the LightningModule maps them through the generator's
mapping network with truncation 0.7 around its own ``mean_latent`` (StyleCLIP's fallback crashes, issue #125).
A batch is therefore either W+ [B, n_latent, D] or z [B, D].
"""
from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from xclip.datamodules.resumable import ResumableLoader, is_distributed
from xclip.utils.io import safe_torch_load


def n_latent_for(size: int) -> int:
    return 2 * int(math.log2(size)) - 2


def load_latents(path: str | Path, generator_size: int = 1024, style_dim: int = 512) -> torch.Tensor:
    """Read and validate a W+ latent file -> [N, n_latent, style_dim] float32."""
    obj = safe_torch_load(path, "latent file")
    if isinstance(obj, dict):  # accept {'latents': tensor} / {'w': tensor}
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one latent tensor, got a dict with keys {list(obj)[:8]}")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor of shape (N, n_latent, style_dim), got {type(obj).__name__}")
    expected = (n_latent_for(generator_size), style_dim)
    if obj.ndim != 3 or tuple(obj.shape[1:]) != expected:
        hint = " (add the batch dimension: latents.unsqueeze(0))" if tuple(obj.shape) == expected else ""
        raise ValueError(f"{path}: latent tensor has shape {tuple(obj.shape)}; expected (N, {expected[0]}, "
                         f"{expected[1]}) for a {generator_size} px generator with style_dim {style_dim}{hint}")
    if not torch.isfinite(obj).all():
        raise ValueError(f"{path}: latent tensor contains NaN/inf values")
    return obj.float()


class LatentsDataModule(pl.LightningDataModule):
    def __init__(self, train_path: str | None = None, test_path: str | None = None, generator_size: int = 1024,
                 style_dim: int = 512, batch_size: int = 2, test_batch_size: int = 1, num_workers: int = 0,
                 n_train_samples: int = 5000, n_test_samples: int = 1000, max_val_batches: int = 201,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _z_seeds(self, n: int, offset: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.hparams.seed + offset)
        return torch.randn(n, self.hparams.style_dim, generator=g)  # [n, D]

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if h.train_path:
            train = load_latents(h.train_path, h.generator_size, h.style_dim)
        else:
            train = self._z_seeds(h.n_train_samples, 0)
        if h.test_path:
            test = load_latents(h.test_path, h.generator_size, h.style_dim)
        else:
            test = self._z_seeds(h.n_test_samples, 1)
        test = test[: h.max_val_batches * h.test_batch_size]
        self.train_set, self.val_set = TensorDataset(train), TensorDataset(test)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if is_distributed(self):
            return DataLoader(self.train_set, batch_size=h.batch_size, shuffle=True, drop_last=True,
                              num_workers=h.num_workers)
        # (seed, epoch) order, independent of the global RNG, resumable mid-epoch (datamodules/resumable.py)
        return ResumableLoader(self.train_set, batch_size=h.batch_size, shuffle=True, drop_last=True,
                               num_workers=h.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.test_batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)
