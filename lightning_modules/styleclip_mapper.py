"""StyleCLIP latent mapper training (spec reference/styleclip_vqgan.md §3).

    python train.py fit --config configs/styleclip/mapper_purple_hair.yaml

Learned: a LevelsMapper (coarse/medium/fine switchable). Frozen and never checkpointed: CLIP (``backbone``),
the StyleGAN2 generator and the ArcFace net; they are rebuilt from the hyperparameters (generator checkpoint
path, or the seed of a random test generator). Loss = clip_lambda * CLIP(x_hat) + latent_l2_lambda *
MSE(w_hat, w) + id_lambda * ID(x_hat, x), with w_hat = w + 0.1 * M(w), x = G(w), x_hat = G(w_hat),
``randomize_noise=False`` (defaults 1.0 / 0.8 / 0.1).

Optimiser (``optimizer``): ``"ranger"`` (default, as StyleCLIP: RAdam + Lookahead k 6 / alpha 0.5 + gradient
centralisation, betas (0.95, 0.999), eps 1e-5, lr 0.5; ``utils/optim.py``) or ``"adam"``. Ranger's eps 1e-5
dominates the denominator when gradients are tiny (the random test models), hence ``ranger_eps``.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pytorch_lightning.loggers import WandbLogger

from xclip.datamodules.latents import n_latent_for
from xclip.lightning_modules.base import FrozenBackboneModule
from xclip.losses.styleclip import ClipLoss, IDLoss, latent_mse
from xclip.models.arcface import load_arcface
from xclip.models.mapper import RESIDUAL_SCALE, LevelsMapper
from xclip.models.stylegan2 import build_generator
from xclip.utils.optim import Ranger
from xclip.utils.wandb_setup import log_images

NOT_CHECKPOINTED = ("generator.", "id_loss.")
OPTIMIZERS = ("ranger", "adam")


class StyleCLIPMapperModule(FrozenBackboneModule):
    def __init__(self, backbone: str = "ViT-B-32", pretrained: str | None = "openai",
                 description: str = "a person with purple hair",
                 generator_checkpoint: str | None = None, generator_size: int = 1024, style_dim: int = 512,
                 n_mlp: int = 8, channel_multiplier: int = 2, channel_max: int = 512, generator_seed: int = 0,
                 coarse: bool = True, medium: bool = True, fine: bool = True,
                 clip_lambda: float = 1.0, latent_l2_lambda: float = 0.8, id_lambda: float = 0.1,
                 arcface_checkpoint: str | None = None, optimizer: Literal["ranger", "adam"] = "ranger",
                 lr: float = 0.5, ranger_k: int = 6, ranger_alpha: float = 0.5, ranger_eps: float = 1e-5,
                 truncation: float = 0.7, n_mean_latent: int = 4096, image_log_every_n_steps: int = 100,
                 n_log_images: int = 4):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if id_lambda > 0 and not arcface_checkpoint:
            raise ValueError(f"id_lambda={id_lambda} needs arcface_checkpoint (model_ir_se50.pth); "
                             f"set id_lambda: 0 for edits meant to change identity or when no ArcFace is available")
        super().__init__(backbone, pretrained)
        self.save_hyperparameters()
        self.generator = build_generator(generator_checkpoint, generator_size, style_dim, n_mlp,
                                         channel_multiplier, channel_max, seed=generator_seed)
        self.mapper = LevelsMapper(style_dim, coarse=coarse, medium=medium, fine=fine)
        self.clip_loss = ClipLoss(self.backbone, description)
        self.id_loss = IDLoss(load_arcface(arcface_checkpoint)) if id_lambda > 0 else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed + 1)
            mean = self.generator.latent_avg if getattr(self.generator, "latent_avg", None) is not None \
                else self.generator.mean_latent(n_mean_latent)
        self.register_buffer("mean_latent", mean.reshape(1, style_dim), persistent=False)  # [1, D]
        self._register_state_dict_hook(_drop_frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self.generator.eval()
        if self.id_loss is not None:
            self.id_loss.eval()
        return self

    # ---- edit -----------------------------------------------------------------------------------------
    def to_w_plus(self, batch: torch.Tensor) -> torch.Tensor:
        """z [B, D] (no latent files) -> truncated W+; W+ [B, n_latent, D] passes through."""
        if batch.ndim == 2:
            with torch.no_grad():
                w = self.generator.get_latent(batch)
                w = self.mean_latent + self.hparams.truncation * (w - self.mean_latent)
            return w.unsqueeze(1).repeat(1, self.generator.n_latent, 1)
        expected = (n_latent_for(self.generator.size), self.generator.style_dim)
        if tuple(batch.shape[1:]) != expected:
            raise ValueError(f"latent batch of shape {tuple(batch.shape)}; expected (B, {expected[0]}, {expected[1]}) "
                             f"for a {self.generator.size} px generator")
        return batch

    def edit(self, w: torch.Tensor) -> torch.Tensor:
        """w_hat = w + 0.1 * M(w)."""
        return w + RESIDUAL_SCALE * self.mapper(w)

    def render(self, w: torch.Tensor) -> torch.Tensor:
        return self.generator([w], input_is_latent=True, randomize_noise=False)[0]

    def losses(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        h = self.hparams
        w_hat = self.edit(w)
        with torch.no_grad():
            x = self.render(w)
        x_hat = self.render(w_hat)
        out = {"clip": self.clip_loss(x_hat).mean(), "latent_l2": latent_mse(w_hat, w)}
        loss = h.clip_lambda * out["clip"] + h.latent_l2_lambda * out["latent_l2"]
        if self.id_loss is not None:
            out["id"] = self.id_loss(x_hat, x)
            loss = loss + h.id_lambda * out["id"]
        out["loss"] = loss
        return out, x, x_hat

    # ---- loops ----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (latents,) = batch
        out, x, x_hat = self.losses(self.to_w_plus(latents))
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=latents.shape[0])
        every = self.hparams.image_log_every_n_steps
        if every and self.global_step % every == 0:
            self._log_pairs("train/edits", x, x_hat)
        return out["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        (latents,) = batch
        out, x, x_hat = self.losses(self.to_w_plus(latents))
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=latents.shape[0], sync_dist=True)
        if batch_idx == 0:
            self._log_pairs("val/edits", x, x_hat)

    def _log_pairs(self, key: str, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Before | after grid, one row per sample, to W&B (rank 0)."""
        if not isinstance(self.logger, WandbLogger) or not self.trainer.is_global_zero:
            return
        from torchvision.utils import make_grid

        n = min(self.hparams.n_log_images, x.shape[0])
        pairs = torch.stack([x[:n], x_hat[:n]], 1).flatten(0, 1).detach().float().cpu()  # [2n, 3, H, W]
        grid = make_grid(pairs.clamp(-1, 1).add(1).div(2), nrow=2)  # [3, H', W'] in [0, 1]
        log_images(self.logger, key, [grid], captions=[f"before | after: {self.hparams.description}"],
                   step=self.global_step)  # -> uint8 (wandb would cast the [0, 1] floats to 0 = black)

    def configure_optimizers(self):
        params = list(self.mapper.parameters())
        h = self.hparams
        if h.optimizer == "ranger":  # StyleCLIP's default: betas (0.95, 0.999), eps 1e-5, GC on
            return Ranger(params, lr=h.lr, eps=h.ranger_eps, k=h.ranger_k, alpha=h.ranger_alpha)
        return torch.optim.Adam(params, lr=h.lr)


def _drop_frozen(module, state_dict: dict[str, Any], prefix: str, local_metadata) -> None:
    """State-dict hook: the frozen generator / ArcFace are rebuilt from hparams, never stored."""
    for key in [k for k in state_dict if k[len(prefix):].startswith(NOT_CHECKPOINTED)]:
        del state_dict[key]
