"""Learn-to-spell / forget-to-spell orthogonal projections (Materzynska, Torralba, Bau, CVPR 2022).

One matrix W [k, d] (no bias, orthogonal init) maps every frozen, L2-normalised CLIP embedding (image or text)
to k dims, followed by L2 normalisation (disentangle.md 3.1). It trains on cached quintuple features
(datamodules/feature_cache.py) with weighted symmetric InfoNCE losses L1..L6 + gamma ||I - W W^T||_F
(losses/contrastive.py). Learn-to-spell = {L3, L4, L5}, forget-to-spell = {L1, L2, L6} (3.5).

    python train.py fit --config configs/spelling/forget_to_spell.yaml
    W = load_projection("runs/.../last.ckpt", expected_backbone=backbone.spec())   # [k, d]
    z = apply_projection(backbone.encode_image(x), W)                               # [N, k], normalised
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from xclip.lightning_modules.base import FrozenBackboneModule
from xclip.losses.contrastive import PAIRS, resolve_weights, spelling_objective
from xclip.metrics.spelling import PairedRetrieval, ZeroShotTop1
from xclip.utils.io import safe_torch_load

log = logging.getLogger(__name__)

DEFAULT_K = {"learn": 64, "forget": 256}   # the brief's k (UNVERIFIED, disentangle.md 3.1)
ELEMENTS = ("x_i", "y_i", "x_t", "y_t", "x_it")
# retrieval tasks of the validation suite (5.1): name -> (image side a, gallery side b)
RETRIEVAL_TASKS = {
    "im_t_txt_t": ("x_t", "y_t"),     # reading a clean word image
    "im_it_img_t": ("x_it", "x_t"),
    "im_it_img_i": ("x_it", "x_i"),
    "im_it_txt_t": ("x_it", "y_t"),   # reading the word off a natural image
}


def apply_projection(emb: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
    """emb [..., d] (any CLIP embedding) -> normalise(normalise(emb) W^T) [..., k]; W None -> normalise(emb).

    Shape-aware (disentangle.md 3.6): W is [k, d]; a [d, k] matrix (the README's ``x @ W`` layout) is
    transposed when that is the only way the shapes match.
    """
    emb = F.normalize(emb, dim=-1)
    if W is None:
        return emb
    d = emb.shape[-1]
    if W.shape[1] != d:
        if W.shape[0] == d:
            W = W.t()
        else:
            raise ValueError(f"Projection of shape {tuple(W.shape)} does not fit embeddings of dim {d}.")
    return F.normalize(emb @ W.to(emb).t(), dim=-1)


class SpellingMetrics(nn.Module):
    """The synthetic validation suite (5.1) over projected features; ``compute()`` -> flat {name: float}."""

    def __init__(self):
        super().__init__()
        self.top1 = nn.ModuleDict({n: ZeroShotTop1() for n in ("acc_im_i_txt_i", "acc_im_it_txt_i",
                                                               "acc_im_i_img_word")})
        self.retrieval = nn.ModuleDict({n: PairedRetrieval() for n in RETRIEVAL_TASKS})

    def update(self, z: Mapping[str, torch.Tensor], class_text: torch.Tensor, class_word_img: torch.Tensor | None,
               class_id: torch.Tensor, real: torch.Tensor) -> None:
        """z: projected features per element [B, k]; class_text / class_word_img: projected [C, k]."""
        self.top1["acc_im_i_txt_i"].update(z["x_i"], class_text, class_id)
        self.top1["acc_im_it_txt_i"].update(z["x_it"], class_text, class_id)
        if class_word_img is not None:
            self.top1["acc_im_i_img_word"].update(z["x_i"], class_word_img, class_id)
        for name, (a, b) in RETRIEVAL_TASKS.items():
            self.retrieval[name].update(z[a], z[b], real)

    def compute(self) -> dict[str, float]:
        out = {}
        for name, m in self.top1.items():
            if m.total > 0:
                out[name] = float(m.compute())
        for name, m in self.retrieval.items():
            for key, v in m.compute().items():
                kind, direction = key.split("/")
                out[f"{name}/{kind}/{'img2txt' if direction == 'a2b' else 'txt2img'}"] = float(v)
        return out

    def reset(self) -> None:
        for m in list(self.top1.values()) + list(self.retrieval.values()):
            m.reset()


@torch.no_grad()
def evaluate_features(feats: Mapping[str, torch.Tensor], W: torch.Tensor | None, batch_size: int = 1024
                      ) -> dict[str, float]:
    """Run the validation suite on a whole cached split (the dict of datamodules/feature_cache.py).

    W None = the CLIP baseline (raw normalised features). Returns {metric: %}.
    """
    metrics = SpellingMetrics()
    cls_t = apply_projection(feats["class_text"], W)
    cls_w = apply_projection(feats["class_word_image"], W) if "class_word_image" in feats else None
    n = len(feats["class_id"])
    for s in range(0, n, batch_size):
        z = {e: apply_projection(feats[e][s:s + batch_size], W) for e in ("x_i", "x_t", "x_it", "y_t")}
        metrics.update(z, cls_t, cls_w, feats["class_id"][s:s + batch_size], feats["real"][s:s + batch_size])
    return metrics.compute()


class SpellingProjection(FrozenBackboneModule):
    """W [k, d] trained on cached quintuple features with the losses chosen by ``preset`` + ``l1``..``l6``.

    Args:
        backbone, pretrained: the frozen CLIP (its features must be the ones cached by the datamodule).
        k: output dim; None -> 64 for learn-to-spell presets, 256 for forget-to-spell presets.
        preset: "learn_to_spell" | "forget_to_spell" | "*_review" | None (then give weights with l1..l6).
        l1..l6: per-loss weight overrides (any float, negatives allowed; None keeps the preset's).
        reg: gamma of the orthogonality penalty ||I - W W^T||_F (code default 0).
        scale: logit scale of the InfoNCE losses (code: 1, i.e. temperature 1).
        lr, lr_step, lr_gamma: Adam lr and StepLR stepped every iteration (code: 1e-4, 4000, 0.5).
        normalize_class_matrix: re-normalise projected class prompts in validation (the code does not).
        class_aware_negatives: in L2/L6 (pairs with the class-level y_i), do not use same-class samples as
            negatives (False = the released code; True matters with few classes, e.g. the world's 20).
    """

    def __init__(self, backbone: str = "tiny-vit-world", pretrained: str | None = "synthetic-world",
                 k: int | None = None, preset: str | None = "forget_to_spell",
                 l1: float | None = None, l2: float | None = None, l3: float | None = None,
                 l4: float | None = None, l5: float | None = None, l6: float | None = None,
                 reg: float = 0.0, scale: float = 1.0, lr: float = 1e-4, lr_step: int = 4000,
                 lr_gamma: float = 0.5, normalize_class_matrix: bool = True,
                 class_aware_negatives: bool = False):
        super().__init__(backbone, pretrained)
        self.save_hyperparameters()
        self.loss_weights = resolve_weights(preset, {"L1": l1, "L2": l2, "L3": l3, "L4": l4, "L5": l5, "L6": l6})
        d = self.backbone.embed_dim
        if k is None:
            if preset is None:
                raise ValueError("SpellingProjection: give k when preset is None.")
            k = DEFAULT_K["learn" if preset.startswith("learn") else "forget"]
        if k <= 0:
            raise ValueError(f"SpellingProjection: k must be positive, got k={k}.")
        if k > d:
            log.warning("k=%d > embedding dim d=%d of %s: W W^T cannot be the identity; the orthogonality "
                        "penalty will not reach 0.", k, d, backbone)
        self.k, self.d = int(k), int(d)
        self.W = nn.Parameter(torch.empty(self.k, self.d))         # [k, d]
        nn.init.orthogonal_(self.W)
        self.val_metrics = SpellingMetrics()

    # ---- projection API ----------------------------------------------------------------------------------
    def projection_matrix(self) -> torch.Tensor:
        """W [k, d]: z = normalise(normalise(x) W^T)."""
        return self.W

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """[..., d] CLIP embedding -> [..., k] projected, normalised."""
        return apply_projection(emb, self.W)

    # ---- training ----------------------------------------------------------------------------------------
    def _project_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [e for e in ELEMENTS if e not in batch]
        if missing:
            raise KeyError(f"SpellingProjection batch lacks {missing}; expected quintuple features {ELEMENTS} "
                           f"(use datamodules.feature_cache.SpellingFeatureDataModule).")
        return {e: self.project(batch[e]) for e in ELEMENTS}

    def _class_ids(self, batch) -> torch.Tensor | None:
        return batch.get("class_id") if self.hparams.class_aware_negatives else None

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z = self._project_batch(batch)
        total, parts = spelling_objective(z, self.loss_weights, self.W, self.hparams.reg, self.hparams.scale,
                                          self._class_ids(batch))
        n = len(batch["x_i"])
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k != "reg"}, batch_size=n)
        self.log("train_regularizer", parts["reg"], batch_size=n)
        return total

    def configure_optimizers(self):
        opt = torch.optim.Adam([self.W], lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.hparams.lr_step, gamma=self.hparams.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation (5.1) --------------------------------------------------------------------------------
    def _class_matrices(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        cls = getattr(dm, "val_class_features", None)
        if cls is None or "class_text" not in cls:
            raise RuntimeError("SpellingProjection validation needs the datamodule's `val_class_features` "
                               "({'class_text': [C, d], 'class_word_image': [C, d]}); use "
                               "datamodules.feature_cache.SpellingFeatureDataModule.")
        text = cls["class_text"].to(self.device)
        word = cls.get("class_word_image")
        proj = lambda t: F.normalize(t @ self.W.t(), dim=-1) if self.hparams.normalize_class_matrix \
            else t @ self.W.t()  # noqa: E731  (un-normalised = the released code's quirk, 5.1)
        return proj(F.normalize(text, dim=-1)), (proj(F.normalize(word.to(self.device), dim=-1))
                                                  if word is not None else None)

    def on_validation_epoch_start(self) -> None:
        self._val_cls = self._class_matrices()

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        z = self._project_batch(batch)
        total, _ = spelling_objective(z, self.loss_weights, self.W, self.hparams.reg, self.hparams.scale,
                                      self._class_ids(batch))
        self.log("val/loss", total, batch_size=len(batch["x_i"]))
        self.val_metrics.update(z, *self._val_cls, batch["class_id"], batch["real"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=False)
        self.val_metrics.reset()

    # ---- checkpoint --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["projection"] = {"k": self.k, "d": self.d, "losses": dict(self.loss_weights),
                                    "pairs": {n: list(p) for n, p in PAIRS.items()}}


def load_projection(path: str | Path, expected_backbone: dict | None = None,
                    expected_dim: int | None = None) -> torch.Tensor:
    """W [k, d] from a SpellingProjection checkpoint (or a raw {'W': tensor} file of the released code).

    ``expected_backbone``: the backbone spec ({"name", "pretrained"}) the projection will be applied to; a
    checkpoint trained on another backbone raises. Raw files carry no spec and are accepted with a warning.
    """
    ckpt = safe_torch_load(path, "spelling projection")
    if isinstance(ckpt, torch.Tensor):
        ckpt = {"W": ckpt}
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"{path}: expected a checkpoint dict with a 'W' tensor, got {type(ckpt).__name__}.")
    state = ckpt.get("state_dict", ckpt)
    W = state.get("W") if isinstance(state, dict) else None
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise RuntimeError(f"{path} holds no projection matrix: expected key 'W' (a [k, d] tensor) in "
                           f"{'state_dict' if 'state_dict' in ckpt else 'the file'}; keys: {sorted(state)[:8]}.")
    spec = ckpt.get("backbone")
    if expected_backbone is not None:
        if spec is None:
            log.warning("%s carries no backbone spec; cannot check it matches %s.", path, expected_backbone)
        elif {k: spec.get(k) for k in ("name", "pretrained")} != \
                {k: expected_backbone.get(k) for k in ("name", "pretrained")}:
            raise ValueError(f"{path} was trained on backbone {spec}, but it is being applied to "
                             f"{expected_backbone}. Use the matching --backbone/--pretrained.")
    meta = ckpt.get("projection", {})
    d = meta.get("d")
    if d is not None and W.shape[1] != d and W.shape[0] == d:
        W = W.t()
    if expected_dim is not None and W.shape[1] != expected_dim:
        raise ValueError(f"{path}: projection W has shape {tuple(W.shape)}; expected [k, {expected_dim}] for the "
                         f"{expected_dim}-d embeddings of the backbone it is applied to.")
    return W.detach().float().contiguous()


def fit_on_features(module: SpellingProjection, train_features: dict, val_features: dict | None = None,
                    max_epochs: int = 10, batch_size: int = 128, logger: Any = False,
                    default_root_dir: str | None = None, enable_checkpointing: bool = False,
                    progress: bool = False):
    """Train ``module`` with a pl.Trainer on in-memory cached features (tests, demo, benchmark).

    Returns the Trainer (``trainer.callback_metrics`` holds the last validation metrics).
    """
    import pytorch_lightning as pl

    from xclip.datamodules.feature_cache import CachedFeatureDataModule

    dm = CachedFeatureDataModule(train_features, val_features, batch_size)
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger,
                         enable_checkpointing=enable_checkpointing, enable_progress_bar=progress,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1.0 if val_features is not None else 0, log_every_n_steps=1,
                         default_root_dir=default_root_dir)
    trainer.fit(module, dm)
    return trainer
