"""What every evaluation suite receives: an ``EvalModel`` that encodes images and texts.

A suite is a module in ``evaluation/`` listed in ``evaluate.SUITES`` (an explicit table: nothing is imported by a
name read from input) that defines

    NAME: str                                          # `--suite NAME`; also its settings group `--NAME.key`
    HELP: str                                          # one line for `--help`
    @dataclass class Settings                          # its options (the schema jsonargparse reads)
    def check(settings, ctx: RunContext) -> None       # optional: inputs, outputs, tools; before any work starts
    def run(model: EvalModel, settings, ctx: RunContext) -> dict   # JSON-serialisable results

A result may carry a ``"tables"`` entry: {table_name: {"columns": [...], "data": [[...], ...]}} for W&B.
Metrics are fractions in [0, 1] (never percentages).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xclip.models.clip_backbone import ClipBackbone
from xclip.models.zero_shot import zero_shot_classifier


@dataclass
class RunContext:
    """What a suite gets besides its settings: the run's seed and the folder of the results JSON (a suite that
    writes files puts them under ``out_dir`` unless its settings name a folder)."""
    seed: int = 0
    out_dir: Path = Path(".")


class EvalModel(nn.Module):
    """A (frozen) CLIP backbone, optionally with a learned projection W and/or a method module.

    ``projection``: [k, d] matrix applied to normalised embeddings (spelling projections), re-normalised.
    ``method``: a trained module that may override ``class_text_features(classnames)`` (e.g. CoOp prompts).
    """

    def __init__(self, backbone: ClipBackbone, projection: torch.Tensor | None = None,
                 method: nn.Module | None = None, batch_size: int = 256):
        super().__init__()
        self.backbone = backbone.freeze()
        self.register_buffer("projection", projection, persistent=False)
        self.method = method
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(feats, dim=-1)
        if self.projection is not None:
            feats = F.normalize(feats @ self.projection.t().to(feats), dim=-1)
        return feats

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] CLIP-normalised -> [N, D'] (normalised, projected)."""
        out = [self.backbone.encode_image(images[i:i + self.batch_size].to(self.device))
               for i in range(0, len(images), self.batch_size)]
        return self.project(torch.cat(out))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """list of N strings -> [N, D'] (normalised, projected)."""
        return torch.cat([self.encode_text(self.tokenize(texts[i:i + self.batch_size]))
                          for i in range(0, len(texts), self.batch_size)])

    @torch.no_grad()
    def class_text_features(self, classnames: Sequence[str],
                            templates: Sequence[str] = ("a photo of a {}.",)) -> torch.Tensor:
        """Zero-shot classifier [C, D']: prompt-ensembled class embeddings (or the method's own)."""
        if self.method is not None and hasattr(self.method, "class_text_features"):
            return self.project(self.method.class_text_features(list(classnames)))
        return zero_shot_classifier(self, classnames, templates)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.backbone.tokenize(texts)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[N, L] tokens -> [N, D'] (normalised, projected): the text encoder seen by models/zero_shot.py."""
        return self.project(self.backbone.encode_text(tokens))

    def image_transform(self) -> Callable:
        return self.backbone.preprocess


def read_json_file(path: str | Path, suite: str, kind: type, expected: str) -> Any:
    """Load a suite's JSON input; errors name the suite, the file and the ``expected`` layout."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{suite}: {p} not found; expected {expected}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{suite}: {p} is not valid JSON ({e})") from e
    if not isinstance(data, kind):
        raise ValueError(f"{suite}: {p} must hold {expected}; got {type(data).__name__}")
    return data
