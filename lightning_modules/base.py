"""Base class for methods trained on top of a frozen CLIP, and checkpoint loading for evaluation.

Checkpoints keep only what is learned (e.g. prompt context, projection W, mapper) plus the backbone's
name/pretrained tag, the method's name and its hyperparameters. ``load_method_checkpoint`` rebuilds the
module from those with ``torch.load(weights_only=True)``.

A checkpoint never decides what code runs: its ``method`` entry is a name looked up in ``METHODS`` (the
project's own method classes, see ``method_table``) or in classes the caller passes in code; nothing is imported
from a string read from a file, and its hyperparameters must be named arguments of that class's ``__init__``.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
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
        checkpoint["method"] = method_name(type(self))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _check_learned_keys(self, checkpoint.get("state_dict", {}), "<checkpoint>")


def connect(model: pl.LightningModule, datamodule: pl.LightningDataModule | None) -> None:
    """The one place where a method and its datamodule meet, in one direction each, by configuration: the
    datamodule's ``classnames`` / ``image_size`` go to a method with ``use_data`` (CoOp builds its prompts), the
    method's frozen ``backbone`` goes to a datamodule with ``use_backbone`` (feature caches encode with it).
    ``xclip train`` calls it once both are built; with a plain ``Trainer`` call it before ``fit``. Neither module
    ever reads the other through the trainer."""
    if datamodule is None:
        return
    if hasattr(model, "use_data"):
        model.use_data(classnames=getattr(datamodule, "classnames", None),
                       image_size=getattr(datamodule, "image_size", None))
    if hasattr(datamodule, "use_backbone") and isinstance(getattr(model, "backbone", None), torch.nn.Module):
        datamodule.use_backbone(model.backbone)


def _check_learned_keys(module: pl.LightningModule, state: dict[str, Any], source: str) -> None:
    expected = {k for k in module.state_dict() if not k.startswith(FROZEN_PREFIX)}
    missing = sorted(expected - set(state))
    if missing:
        raise RuntimeError(f"{source} lacks learned tensors of {type(module).__name__}: {missing[:8]}")


# The project's own methods: stable name (stored in checkpoints) -> (module, class), imported lazily because
# those modules import this one. Extend it by adding a line here; callers with their own classes (tests,
# extensions) pass them in code with ``load_method_checkpoint(..., methods={name: cls})``.
METHODS: dict[str, tuple[str, str]] = {
    "CoOp": ("xclip.lightning_modules.coop", "CoOp"),
    "SpellingProjection": ("xclip.lightning_modules.spelling", "SpellingProjection"),
    "StyleCLIPMapperModule": ("xclip.lightning_modules.styleclip_mapper", "StyleCLIPMapperModule"),
    "ClipPretrain": ("xclip.lightning_modules.clip_pretrain", "ClipPretrain"),
}
# ``method`` strings written by earlier versions (module.class paths) -> table names; mapped, never imported.
LEGACY_METHOD_NAMES: dict[str, str] = {
    f"{prefix}{module.removeprefix('xclip.')}.{cls}": name
    for name, (module, cls) in METHODS.items() for prefix in ("", "xclip.")}


def method_table() -> dict[str, type]:
    """{stable name: class} of the project's own methods (fixed in code)."""
    from xclip.lightning_modules.clip_pretrain import ClipPretrain
    from xclip.lightning_modules.coop import CoOp
    from xclip.lightning_modules.spelling import SpellingProjection
    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule

    return {"CoOp": CoOp, "SpellingProjection": SpellingProjection,
            "StyleCLIPMapperModule": StyleCLIPMapperModule, "ClipPretrain": ClipPretrain}


def method_name(cls: type) -> str:
    """The name a checkpoint stores for ``cls``: its table name, else its class name (caller-provided methods)."""
    for name, (module, qualname) in METHODS.items():
        if cls.__module__ == module and cls.__qualname__ == qualname:
            return name
    return cls.__name__


def resolve_method(method: Any, source: str | Path, expected: type | None = None,
                   methods: Mapping[str, type] | None = None) -> type:
    """The class named by a checkpoint's ``method`` entry, from the fixed table (+ ``methods`` given in code).

    Raises RuntimeError naming ``source`` and the allowed names for an unknown name, and naming both classes
    when the name is not ``expected`` (or a subclass of it). Never imports anything named by ``method``.
    """
    table = method_table()
    for name, cls in (methods or {}).items():
        if name in table and table[name] is not cls:
            raise ValueError(f"methods={{{name!r}: ...}} would replace the project's {name} method")
        table[name] = cls
    if expected is not None:
        table.setdefault(method_name(expected), expected)
    key = LEGACY_METHOD_NAMES.get(method, method) if isinstance(method, str) else None
    cls = table.get(key) if key is not None else None
    if cls is None:
        shown = method if isinstance(method, str) else f"<{type(method).__name__}>"
        if len(shown) > 120:
            shown = shown[:120] + "..."
        if expected is not None:
            raise RuntimeError(f"{source} holds a {shown} checkpoint, expected {expected.__name__} "
                               f"(known methods: {', '.join(sorted(table))}).")
        raise RuntimeError(f"{source}: unknown method {shown!r} in the checkpoint's 'method' entry; allowed "
                           f"methods: {', '.join(sorted(table))}. Only these classes can be rebuilt from a file.")
    if expected is not None and not issubclass(cls, expected):
        raise RuntimeError(f"{source} holds a {cls.__name__} checkpoint, expected {expected.__name__}.")
    return cls


def check_init_kwargs(cls: type, kwargs: Mapping[str, Any], source: str | Path) -> None:
    """Every key must be a named parameter of ``cls.__init__`` (a file cannot inject other arguments)."""
    params = inspect.signature(cls.__init__).parameters
    named = {n for n, p in params.items() if n != "self"
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    unknown = sorted(str(k) for k in kwargs if not isinstance(k, str) or k not in named)
    if unknown:
        raise RuntimeError(f"{source}: hyper_parameters {unknown} are not arguments of {cls.__name__}"
                           f"({', '.join(sorted(named))}); the file was not written by this method.")


def load_method_checkpoint(path: str | Path, expected: type[T] | None = None,
                           map_location: str | torch.device = "cpu", overrides: dict[str, Any] | None = None,
                           methods: Mapping[str, type] | None = None) -> T:
    """Rebuild a method from its slim checkpoint; errors name the file and what was expected.

    The checkpoint's ``method`` name is looked up in the project's method table, extended by ``methods``
    ({name: class}, given in code) and ``expected``; nothing named in the file is imported.
    ``overrides`` replaces hyperparameters before the module is built, e.g. a moved generator checkpoint
    path or ``id_lambda=0`` to skip loading a loss network that inference does not use. Learned tensors
    are always loaded from the checkpoint.
    """
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise RuntimeError(f"{path} is not a Lightning checkpoint of this framework (no 'state_dict').")
    method = ckpt.get("method")
    if method is None:
        raise RuntimeError(f"{path} has no 'method' entry: it was not written by a method of this framework.")
    cls = resolve_method(method, path, expected, methods)
    raw = ckpt.get("hyper_parameters", {})
    if not isinstance(raw, dict):
        raise RuntimeError(f"{path}: 'hyper_parameters' is a {type(raw).__name__}, expected a mapping.")
    # LightningCLI adds bookkeeping keys such as "_class_path"; they are not __init__ arguments.
    hparams = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("_"))}
    hparams.update(overrides or {})
    check_init_kwargs(cls, hparams, path)
    module = cls(**hparams)
    _check_learned_keys(module, ckpt["state_dict"], str(path))
    module.load_state_dict(ckpt["state_dict"], strict=False)
    return module.to(map_location).eval()
