"""The one CLIP backbone factory of the framework.

    backbone = build_clip("ViT-B-32", "openai")                  # open_clip tag (HF cache / download)
    backbone = build_clip("ViT-B-32", "/ckpts/my_clip.pt")         # local state dict / open_clip checkpoint
    backbone = build_clip("local-dir:/models/my_clip")              # open_clip_config.json + weights
    backbone = build_clip("tiny-vit-world", "synthetic-world")      # the tiny CLIP shipped in this repo
    backbone = build_clip("tiny-vit-test")                          # random tiny model for tests

Offline with weights missing from the cache, it fails at once with a message that says how to supply them.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

# Checkpoints trained by this project and committed to the repo: (model name, tag) -> file.
SHIPPED_WEIGHTS: dict[tuple[str, str], Path] = {
    ("tiny-vit-world", "synthetic-world"): REPO_ROOT / "checkpoints" / "tiny_clip_world.pt",
}

_registered = False


def register_tiny_configs() -> None:
    """Make the JSON architectures in models/model_configs visible to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(TINY_CONFIG_DIR)
        _registered = True


class BackboneError(RuntimeError):
    """Raised when a backbone cannot be built; the message says how to fix it."""


class ClipBackbone(nn.Module):
    """An open_clip CLIP plus everything needed to feed it.

    Attributes: ``model`` (open_clip CLIP), ``preprocess`` (PIL -> tensor eval transform), ``tokenizer``
    (list[str] -> LongTensor[N, context_length]), ``name``, ``pretrained``.
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, name: str,
                 pretrained: str | None):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained

    # ---- metadata -------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this backbone."""
        return {"name": self.name, "pretrained": self.pretrained}

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") and \
            isinstance(self.model.text_projection, torch.Tensor) else int(self.model.visual.output_dim)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    # ---- encoding -------------------------------------------------------------------------------------
    def normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP-normalised pixels."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """list[str] -> LongTensor[N, context_length] on the model's device."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, H, W] (already CLIP-normalised) -> [B, D]."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[N, L] token ids -> [N, D]."""
        return self.model.encode_text(tokens, normalize=normalize)

    def freeze(self) -> "ClipBackbone":
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.model(images, tokens)


# ---- factory ------------------------------------------------------------------------------------------
def _check_model_name(name: str) -> None:
    if name.startswith("local-dir:") or name.startswith("hf-hub:"):
        return
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise BackboneError(
            f"Unknown backbone name {name!r}.{hint} open_clip knows {len(known)} architectures "
            f"(open_clip.list_models()); tiny test/demo architectures live in {TINY_CONFIG_DIR}.")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


def _check_tag_available(name: str, tag: str) -> None:
    """Fail at once (not after a 46 s retry loop) when an open_clip tag cannot be loaded."""
    from open_clip import pretrained as oc_pre

    tags = oc_pre.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise BackboneError(
            f"{tag!r} is neither an existing file nor a known open_clip pretrained tag for {name!r}. "
            f"Known tags: {tags or 'none'}. Pass a local checkpoint path or 'local-dir:PATH' instead.")
    cfg = oc_pre.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    cache_dir = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id = "/".join(hub.strip("/").split("/")[:2])  # "timm/vit_base_patch32_clip_224.openai/"
        files = [cfg.get("hf_hub_filename")] if cfg.get("hf_hub_filename") else \
            ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        cached = any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files if f)
    else:
        cached = False
    if not cached and _offline():
        raise BackboneError(
            f"Pretrained weights {name!r}/{tag!r} are not in the local cache ({cache_dir}) and the hub is "
            f"offline (HF_HUB_OFFLINE=1). Either download them once online (unset HF_HUB_OFFLINE), or pass a "
            f"local file: build_clip({name!r}, '/path/to/open_clip_pytorch_model.bin') / "
            f"--backbone {name} --pretrained /path/to/weights, or 'local-dir:/path/to/folder'.")


def build_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
               **overrides: Any) -> ClipBackbone:
    """Build any open_clip model from a name plus a pretrained tag, a local file or a ``local-dir:`` folder.

    ``overrides`` are passed to open_clip.create_model (e.g. ``embed_dim``, ``vision_cfg``) and are only
    meant for random-init test models.
    """
    register_tiny_configs()
    _check_model_name(name)
    tag = None if pretrained in (None, "", "none", "None") else str(pretrained)
    weights_file: Path | None = None
    if tag is not None and not name.startswith("local-dir:"):
        shipped = SHIPPED_WEIGHTS.get((name, tag))
        if shipped is not None:
            if not shipped.is_file():
                raise BackboneError(f"Shipped weights for {name!r}/{tag!r} missing: expected {shipped}. "
                                    f"Re-create them with `python train.py fit --config configs/world/pretrain_tiny_clip.yaml`.")
            weights_file = shipped
        elif Path(tag).expanduser().exists():
            weights_file = Path(tag).expanduser()
            if not weights_file.is_file():
                raise BackboneError(f"Pretrained path {weights_file} is a folder; use 'local-dir:{weights_file}'.")
        elif "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
            raise BackboneError(f"Checkpoint file not found: {tag!r} (pretrained for backbone {name!r}).")
        else:
            _check_tag_available(name, tag)

    kwargs = dict(overrides)
    try:
        if name.startswith("local-dir:"):
            model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        elif weights_file is not None:
            with _drop_root_log("No pretrained weights loaded"):  # open_clip's notice; the weights follow
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
            load_clip_weights(model, weights_file)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, **kwargs)
    except BackboneError:
        raise
    except RuntimeError as e:  # open_clip's own download errors
        raise BackboneError(f"Could not build {name!r} with pretrained={tag!r}: {e}") from e
    tokenizer = open_clip.get_tokenizer(name.split("local-dir:")[-1] if not name.startswith("local-dir:") else name)
    model.eval()
    backbone = ClipBackbone(model, preprocess, tokenizer, name, tag)
    return backbone.to(device)


@contextlib.contextmanager
def _drop_root_log(prefix: str):
    """Silence root-logger records starting with ``prefix`` inside the block."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (raw, or wrapped in {'state_dict': ...}) strictly, with safe unpickling."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a checkpoint
        raise BackboneError(f"Could not read CLIP weights from {path}: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise BackboneError(f"{path} does not match the architecture: {str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise BackboneError(f"{path} does not match the architecture: missing keys {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                            f"{'...' if len(unexpected) > 5 else ''}.")
