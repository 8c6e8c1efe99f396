"""xclip: explainability-guided CLIP in PyTorch Lightning.

The curated public API (everything a notebook needs; the CLIs are thin wrappers over it)::

    import xclip
    clip = xclip.build_clip("tiny-vit-world", "synthetic-world")
"""
from __future__ import annotations

__version__ = "0.2.0"

from xclip.models.clip_backbone import BackboneError, ClipBackbone, build_clip

__all__ = ["BackboneError", "ClipBackbone", "build_clip", "__version__"]
