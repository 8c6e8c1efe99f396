"""Two toy methods on a frozen tiny CLIP, used by the spine tests (CLI, checkpoints, evaluate)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from xclip.lightning_modules.base import FrozenBackboneModule


class ToyProjection(FrozenBackboneModule):
    """Learns a [k, d] matrix pulling random image features towards their paired text features."""

    def __init__(self, backbone: str = "tiny-vit-test", pretrained: str | None = None, k: int = 16,
                 lr: float = 1e-2):
        super().__init__(backbone, pretrained)
        self.save_hyperparameters()
        d = self.backbone.embed_dim
        self.W = torch.nn.Parameter(torch.nn.init.orthogonal_(torch.empty(k, d)))

    def training_step(self, batch, batch_idx):
        (x,) = batch  # [B, 3, H, W]
        with torch.no_grad():
            f = self.backbone.encode_image(x)  # [B, D]
        z = f @ self.W.t()
        loss = ((z - z.mean(0)) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class OtherToy(ToyProjection):
    """A different method class (for 'checkpoint from another method' errors)."""


class ToyData(pl.LightningDataModule):
    def __init__(self, n: int = 16, image_size: int = 32, batch_size: int = 4):
        super().__init__()
        self.n, self.image_size, self.batch_size = n, image_size, batch_size

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(self.n, 3, self.image_size, self.image_size, generator=g)),
                          batch_size=self.batch_size)
