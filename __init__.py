"""xclip: explainability-guided CLIP in PyTorch Lightning.

The curated public API: a notebook can do everything the ``xclip`` command does::

    import xclip
    clip = xclip.build_clip("tiny-vit-world", "synthetic-world")   # any open_clip name + tag / file / local-dir:
    maps = xclip.image_relevance(clip, images, clip.tokenize(["a red star"]))
    xclip.run_suite("world", clip)                                  # an evaluation suite as a function
    module = xclip.load_method_checkpoint("runs/forget/checkpoints/last.ckpt")

Names are imported on first use (``import xclip`` stays fast and pulls in no Lightning or transformers).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"   # the one place: pyproject.toml reads it ([tool.setuptools.dynamic] version)

# public name -> module that defines it (a fixed table written here; never read from input)
_API: dict[str, str] = {
    # the backbone factory
    "build_clip": "xclip.models.clip_backbone",
    "ClipBackbone": "xclip.models.clip_backbone",
    "BackboneError": "xclip.models.clip_backbone",
    # the relevance engine and its pictures
    "relevance": "xclip.models.relevance",
    "text_relevance": "xclip.models.relevance",
    "image_relevance": "xclip.models.relevance",
    "explain": "xclip.models.explain",
    # zero-shot classification (open_clip's classifier builder + prompt ensembles)
    "zero_shot_classifier": "xclip.models.zero_shot",
    "zero_shot_logits": "xclip.models.zero_shot",
    # trainable methods (LightningModules) and their checkpoints
    "CoOp": "xclip.lightning_modules.coop",
    "SpellingProjection": "xclip.lightning_modules.spelling",
    "StyleCLIPMapperModule": "xclip.lightning_modules.styleclip_mapper",
    "ClipPretrain": "xclip.lightning_modules.clip_pretrain",
    "load_method_checkpoint": "xclip.lightning_modules.base",
    "connect": "xclip.lightning_modules.base",
    # datamodules
    "SyntheticWorldDataModule": "xclip.datamodules.synthetic_world",
    "FewShotDataModule": "xclip.datamodules.fewshot",
    "CoOpDatasetDataModule": "xclip.datamodules.coop_datasets",
    "SpellingFeatureDataModule": "xclip.datamodules.feature_cache",
    "LatentsDataModule": "xclip.datamodules.latents",
    # evaluation: every suite as a function, and the evaluation wrapper
    "run_suite": "xclip.evaluate",
    "SUITE_TABLE": "xclip.evaluate",
    "EvalModel": "xclip.evaluation.common",
    # per-sample generation
    "VQGANCLIPConfig": "xclip.generation.vqgan_clip",
    "ZeroCap": "xclip.generation.zerocap",
    "ZeroCapConfig": "xclip.generation.zerocap",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'xclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
