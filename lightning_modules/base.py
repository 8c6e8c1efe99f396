"""Base class for methods trained on top of a frozen CLIP, and checkpoint loading for evaluation.

Checkpoints keep only what is learned (e.g. prompt context, projection W, mapper) plus the backbone's
name/pretrained tag, the method's class path and its hyperparameters. ``load_method_checkpoint`` rebuilds the
module from those with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch

from xclip.models.clip_backbone import ClipBackbone, build_clip
from xclip.utils.io import safe_torch_load

FROZEN_PREFIX = "backbone."
T = TypeVar("T", bound=pl.LightningModule)


class FrozenBackboneModule(pl.LightningModule):
    """A LightningModule holding a frozen ``self.backbone`` (ClipBackbone) that is never checkpointed."""

    strict_loading = False  # the frozen backbone is rebuilt from its spec, not loaded from the checkpoint

    def __init__(self, backbone: str = "tiny-vit-world", pretrained: str | None = "synthetic-world"):
        super().__init__()
        self.backbone: ClipBackbone = build_clip(backbone, pretrained).freeze()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen towers always run in eval mode
        return self

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIX)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(FROZEN_PREFIX)}
        checkpoint["backbone"] = self.backbone.spec()
        checkpoint["method"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _check_learned_keys(self, checkpoint.get("state_dict", {}), "<checkpoint>")


def _check_learned_keys(module: pl.LightningModule, state: dict[str, Any], source: str) -> None:
    expected = {k for k in module.state_dict() if not k.startswith(FROZEN_PREFIX)}
    missing = sorted(expected - set(state))
    if missing:
        raise RuntimeError(f"{source} lacks learned tensors of {type(module).__name__}: {missing[:8]}")


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_method_checkpoint(path: str | Path, expected: type[T] | None = None,
                           map_location: str | torch.device = "cpu", overrides: dict[str, Any] | None = None) -> T:
    """Rebuild a method from its slim checkpoint; errors name the file and what was expected.

    ``overrides`` replaces hyperparameters before the module is built, e.g. a moved generator checkpoint
    path or ``id_lambda=0`` to skip loading a loss network that inference does not use. Learned tensors
    are always loaded from the checkpoint.
    """
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RuntimeError(f"{path} is not a Lightning checkpoint of this framework (no 'state_dict').")
    method = ckpt.get("method")
    if method is None:
        raise RuntimeError(f"{path} has no 'method' entry: it was not written by a method of this framework.")
    cls = _import_class(method)
    if expected is not None and not issubclass(cls, expected):
        raise RuntimeError(f"{path} holds a {cls.__name__} checkpoint, expected {expected.__name__}.")
    # LightningCLI adds bookkeeping keys such as "_class_path"; they are not __init__ arguments.
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    hparams.update(overrides or {})
    module = cls(**hparams)
    _check_learned_keys(module, ckpt["state_dict"], str(path))
    module.load_state_dict(ckpt["state_dict"], strict=False)
    return module.to(map_location).eval()
