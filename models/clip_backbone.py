"""The one CLIP backbone factory of the framework.

    backbone = build_clip("ViT-B-32", "openai")                  # open_clip tag (HF cache, ~/.cache/clip, download)
    backbone = build_clip("ViT-B-32", "/ckpts/my_clip.pt")         # open_clip checkpoint / state dict
    backbone = build_clip("ViT-B-32", "~/.cache/clip/ViT-B-32.pt") # OpenAI's TorchScript archive or state dict
    backbone = build_clip("local-dir:/models/my_clip")              # open_clip_config.json + weights
    backbone = build_clip("tiny-vit-world", "synthetic-world")      # the tiny CLIP shipped in this repo
    backbone = build_clip("tiny-vit-test")                          # random tiny model for tests

Activation (``activation``, default ``"auto"``). OpenAI's CLIP was trained with QuickGELU; open_clip's ``ViT-B-32``
is built with ``nn.GELU`` (open_clip 3.3 only warns for the ``openai`` tag), which changes features by ~1e-2
relative. ``auto`` builds QuickGELU when anything marks the weights as QuickGELU-trained: a ``-quickgelu``
architecture name (or ``quick_gelu: true`` in its config), open_clip's pretrained config of the tag (``openai``
and the other QuickGELU tags), or a weights file in OpenAI's layout (a TorchScript archive, or a state dict with
OpenAI's integer entries ``input_resolution`` / ``context_length`` / ``vocab_size``). So a plain GELU name with
OpenAI weights is corrected, and one INFO line (logger ``xclip.models.clip_backbone``) says which activation was
built and why. An open_clip-format file converted from OpenAI's weights cannot be told apart by its keys: pass
the ``-quickgelu`` name (``--backbone ViT-B-32-quickgelu`` on every CLI and config) or ``activation="quick_gelu"``.
``activation="gelu"`` against such evidence is an error that names the evidence and the fix.

Offline (``HF_HUB_OFFLINE=1``, or no network: a 3 s connect test) with weights missing from the caches, it fails
at once with a message naming the cache folders and how to pass a file instead.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import open_clip
import torch
from torch import nn

from xclip.utils.hub import cached_hub_file, hub_cache_dir, offline_reason

log = logging.getLogger(__name__)
Activation = Literal["auto", "gelu", "quick_gelu"]
ACTIVATIONS: tuple[str, ...] = ("auto", "gelu", "quick_gelu")
# integer entries of OpenAI's state dicts / TorchScript archives (not tensors of the model)
OPENAI_EXTRA_KEYS: tuple[str, ...] = ("input_resolution", "context_length", "vocab_size")
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pth", ".pt")

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
    (list[str] -> LongTensor[N, context_length]), ``name``, ``pretrained``, ``activation`` (the MLP activation
    the towers were built with: ``"quick_gelu"`` or ``"gelu"``).
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, name: str,
                 pretrained: str | None, activation: Literal["gelu", "quick_gelu"] | None = None):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        self.activation = activation if activation is not None else model_activation(model)

    # ---- metadata -------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this backbone; ``activation`` is added for QuickGELU models, so
        feature caches keyed on the spec never reuse features computed with GELU on the same weights."""
        spec: dict[str, Any] = {"name": self.name, "pretrained": self.pretrained}
        if self.activation == "quick_gelu":
            spec["activation"] = "quick_gelu"
        return spec

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

    @torch.no_grad()
    def encode_pil(self, images: Iterable, batch_size: int = 64,
                   encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """PIL images -> [N, D] float32 CPU embeddings, through ``preprocess`` in batches of ``batch_size``.

        ``encode`` maps a [b, 3, H, W] batch (on the model's device) to embeddings; default: L2-normalised
        ``encode_image`` (an evaluation model passes its projected encoder)."""
        encode = encode or (lambda x: self.encode_image(x, normalize=True))
        feats, batch = [], []
        for img in images:
            batch.append(self.preprocess(img.convert("RGB")))                  # [3, H, W]
            if len(batch) == batch_size:
                feats.append(encode(torch.stack(batch).to(self.device)).float().cpu())
                batch = []
        if batch:
            feats.append(encode(torch.stack(batch).to(self.device)).float().cpu())
        if not feats:
            raise ValueError("encode_pil: no images to encode")
        return torch.cat(feats)                                                 # [N, D]

    def freeze(self) -> "ClipBackbone":
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.model(images, tokens)


# ---- reading weight files ---------------------------------------------------------------------------------
@dataclass
class ClipWeights:
    """A CLIP state dict read from a file, and what the file says about where it comes from.

    ``layout``: ``"open_clip"`` (open_clip's files, this project's), ``"openai"`` (a state dict carrying OpenAI's
    integer entries) or ``"openai-torchscript"`` (the archive OpenAI's ``clip`` package caches, read through
    ``torch.jit.load``). ``extras``: OpenAI's ``input_resolution`` / ``context_length`` / ``vocab_size``.
    """

    state: dict[str, torch.Tensor]
    path: Path
    layout: Literal["open_clip", "openai", "openai-torchscript"] = "open_clip"
    extras: dict[str, int] = field(default_factory=dict)

    @property
    def openai(self) -> bool:
        return self.layout != "open_clip"


def is_torchscript_archive(path: str | Path) -> bool:
    """A TorchScript zip (``<name>/code/...``, ``<name>/constants.pkl``), as opposed to a torch.save zip."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in names)


def _read_torchscript_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive. No Python object is unpickled and no archive code is run: archives
    whose code defines ``__setstate__`` (the only code TorchScript runs while loading) are refused."""
    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            if "/code/" in f"/{n}" and n.endswith(".py") and b"__setstate__" in z.read(n):
                raise BackboneError(f"{path}: this TorchScript archive defines __setstate__ (code run while "
                                    f"loading; OpenAI's CLIP archives have none), refused. Convert it to a state "
                                    f"dict where you trust it: torch.save(torch.jit.load(p).state_dict(), 'w.pt').")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - truncated / foreign archive
        raise BackboneError(f"Could not read the TorchScript archive {path}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return dict(module.state_dict())


def read_clip_weights(path: str | Path) -> ClipWeights:
    """Read CLIP weights of any layout a user may hold, safely (``weights_only=True``, safetensors, TorchScript).

    Accepted: open_clip's state dicts and training checkpoints (``{'state_dict': {'module.' + key: ...}}``),
    safetensors, OpenAI's plain state dict (with its three integer entries) and OpenAI's TorchScript archive.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"Checkpoint file not found: {path}")
    layout: Literal["open_clip", "openai", "openai-torchscript"] = "open_clip"
    if is_torchscript_archive(path):
        state: Any = _read_torchscript_state(path)
        layout = "openai-torchscript"
    else:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated / not a checkpoint
            raise BackboneError(f"Could not read CLIP weights from {path}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise BackboneError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    extras: dict[str, int] = {}
    for key in OPENAI_EXTRA_KEYS:
        if key not in state:
            continue
        v = state.pop(key)
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and not v.is_complex():
            extras[key] = int(v.item())
        elif isinstance(v, int) and not isinstance(v, bool):
            extras[key] = v
        else:
            raise BackboneError(f"{path}: entry {key!r} should be an integer (OpenAI's state dicts carry "
                                f"{', '.join(OPENAI_EXTRA_KEYS)}), got {type(v).__name__} "
                                f"{tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}.")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BackboneError(f"{path}: entries {bad[:5]} are not tensors; expected a CLIP state dict.")
    if extras and layout == "open_clip":
        layout = "openai"
    return ClipWeights(state, path, layout, extras)


def _architecture_values(model: nn.Module) -> dict[str, int | None]:
    size = getattr(model.visual, "image_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {"input_resolution": int(size) if size is not None else None,
            "context_length": getattr(model, "context_length", None),
            "vocab_size": getattr(model, "vocab_size", None)}


def load_weights_into(model: nn.Module, weights: ClipWeights, name: str = "") -> None:
    """Strictly load ``weights`` into an open_clip CLIP; OpenAI's integer entries must match the architecture."""
    arch = _architecture_values(model)
    for key, value in weights.extras.items():
        if arch.get(key) is not None and value != arch[key]:
            raise BackboneError(f"{weights.path}: {key}={value} but the architecture {name or 'built'!r} has "
                                f"{key}={arch[key]}: the file belongs to another CLIP (pass the matching "
                                f"architecture name, e.g. ViT-L-14-336 for input_resolution=336).")
    state = dict(weights.state)
    persistent = set(model.state_dict())
    for buf_name, _ in model.named_buffers():  # e.g. attn_mask: rebuilt by the model, never loaded
        if buf_name not in persistent:
            state.pop(buf_name, None)
    ls = getattr(model, "logit_scale", None)
    if isinstance(ls, torch.Tensor) and "logit_scale" in state and state["logit_scale"].ndim != ls.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(ls.shape)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise BackboneError(f"{weights.path} does not match the architecture: "
                            f"{str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise BackboneError(f"{weights.path} does not match the architecture: missing keys {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                            f"{'...' if len(unexpected) > 5 else ''}.")


def load_clip_weights(model: nn.Module, path: str | Path) -> ClipWeights:
    """Read a weights file of any supported layout and load it strictly into ``model``."""
    weights = read_clip_weights(path)
    load_weights_into(model, weights)
    return weights


# ---- activation -------------------------------------------------------------------------------------------
def model_activation(model: nn.Module) -> Literal["gelu", "quick_gelu"]:
    from open_clip.transformer import QuickGELU

    return "quick_gelu" if any(isinstance(m, QuickGELU) for m in model.modules()) else "gelu"


def _base_name(name: str) -> str:
    return name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name


def choose_activation(activation: str, name: str, cfg_quick_gelu: bool = False, tag: str | None = None,
                      tag_quick_gelu: bool = False, weights: ClipWeights | None = None) -> tuple[bool, str]:
    """(build QuickGELU?, why). ``gelu`` against QuickGELU evidence is an error that names it and the fix."""
    if activation not in ACTIVATIONS:
        raise BackboneError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    evidence = []
    if cfg_quick_gelu:
        evidence.append(f"the architecture {name!r} is configured with quick_gelu")
    if tag_quick_gelu:
        evidence.append(f"open_clip's pretrained config of tag {tag!r} says the weights were trained with QuickGELU")
    if weights is not None and weights.openai:
        what = "a TorchScript archive" if weights.layout == "openai-torchscript" else \
            f"a state dict with OpenAI's integer entries {sorted(weights.extras)}"
        evidence.append(f"{weights.path.name} is in OpenAI's layout ({what}): OpenAI trained CLIP with QuickGELU")
    if activation == "quick_gelu":
        return True, "activation='quick_gelu' was asked for"
    if activation == "gelu":
        if evidence:
            raise BackboneError(
                f"activation='gelu' contradicts the weights: {'; '.join(evidence)}. Running QuickGELU-trained "
                f"weights with GELU changes the features (~1e-2 relative). Use activation='auto' or 'quick_gelu'"
                + (f", or the architecture {_base_name(name)!r} without '-quickgelu' for GELU-trained weights"
                   if cfg_quick_gelu else "") + ".")
        return False, "activation='gelu' was asked for"
    if evidence:
        return True, "; ".join(evidence)
    if weights is not None:
        return False, (f"nothing marks {weights.path.name} as QuickGELU-trained (open_clip layout, architecture "
                       f"{name!r} uses GELU); if it holds OpenAI's weights converted to open_clip's format, pass "
                       f"the architecture '{_base_name(name)}-quickgelu' (or activation='quick_gelu')")
    if tag is not None:
        return False, f"open_clip's pretrained config of tag {tag!r} says GELU"
    return False, f"the architecture {name!r} uses GELU (random weights)"


# ---- finding pretrained weights -----------------------------------------------------------------------------
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


def clip_download_cache() -> Path:
    """Where OpenAI's ``clip`` package and open_clip's URL downloads keep files (``~/.cache/clip``)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def _tag_cfg(name: str, tag: str) -> dict[str, Any]:
    from open_clip import pretrained as oc_pre

    tags = oc_pre.list_pretrained_tags_by_model(name)
    cfg = oc_pre.get_pretrained_cfg(name, tag)
    if not cfg:
        raise BackboneError(
            f"{tag!r} is neither an existing file nor a known open_clip pretrained tag for {name!r}. "
            f"Known tags: {tags or 'none'}. Pass a local checkpoint path or 'local-dir:PATH' instead.")
    return cfg


def _hub_candidates(cfg: dict[str, Any]) -> tuple[str, list[str]]:
    """(repo id, file names open_clip would fetch, safetensors first) for a pretrained cfg's ``hf_hub``."""
    from open_clip import pretrained as oc_pre

    hub = cfg.get("hf_hub", "")
    if not hub:
        return "", []
    repo_id, filename = os.path.split(hub)
    filename = filename or oc_pre.HF_WEIGHTS_NAME
    return repo_id, [*oc_pre._get_safe_alternatives(filename), filename]


def _cached_tag_file(cfg: dict[str, Any]) -> Path | None:
    repo_id, files = _hub_candidates(cfg)
    for f in files:
        hit = cached_hub_file(repo_id, f)
        if hit:
            return Path(hit)
    url = cfg.get("url", "")
    if url:
        local = clip_download_cache() / os.path.basename(url)
        if local.is_file():
            return local
    return None


def _missing_weights_message(name: str, tag: str, cfg: dict[str, Any], reason: str) -> str:
    repo_id, files = _hub_candidates(cfg)
    places = []
    if repo_id:
        places.append(f"HF hub cache {hub_cache_dir()} (repo {repo_id}, file {' or '.join(files)})")
    if cfg.get("url"):
        places.append(f"{clip_download_cache() / os.path.basename(cfg['url'])} (OpenAI's clip package / open_clip "
                      f"URL download)")
    example = os.path.basename(cfg.get("url", "")) or (files[-1] if files else "weights.pt")
    return (f"Pretrained weights {name!r}/{tag!r} are not in the local caches [{'; '.join(places) or 'none'}] and "
            f"the hub cannot be used: {reason}. Fix: download them once where there is network (they land in the "
            f"cache above; copy it over), or pass a file you have: --pretrained /path/to/{example} "
            f"(evaluate/generate/analyze), model.init_args.pretrained: /path/to/{example} in a train config (or "
            f"--model.init_args.pretrained), build_clip({name!r}, '/path/to/{example}') in Python; or a folder "
            f"holding open_clip_config.json + weights as 'local-dir:/path/to/folder'. OpenAI's own files "
            f"(~/.cache/clip/{_base_name(name)}.pt from the clip package, or its state dict) are accepted as the "
            f"file; see docs/byo_weights.md.")


def _cached_hf_hub_dir(name: str) -> Path | None:
    """hf-hub: names: the cached snapshot folder (config + weights) to read locally (no network call), None when
    not cached but the hub is usable; fails at once when neither."""
    from open_clip import pretrained as oc_pre

    repo_id = name[len("hf-hub:"):]
    config = cached_hub_file(repo_id, "open_clip_config.json")
    weights = [f for f in (oc_pre.HF_SAFE_WEIGHTS_NAME, oc_pre.HF_WEIGHTS_NAME) if cached_hub_file(repo_id, f)]
    if config and weights:
        return Path(config).parent
    reason = offline_reason()
    if reason:
        raise BackboneError(
            f"{name!r}: open_clip_config.json and weights of {repo_id} are not in the HF hub cache "
            f"{hub_cache_dir()} and the hub cannot be used: {reason}. Fix: download once online, or copy the repo "
            f"folder here and pass 'local-dir:/path/to/folder'; see docs/byo_weights.md.")
    return None


def _find_weights_in_dir(folder: Path) -> Path:
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                 "model.pth"]
    for f in preferred:
        if (folder / f).is_file():
            return folder / f
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise BackboneError(f"local-dir:{folder} holds no weights file ({', '.join(preferred[:3])}, or one "
                            f"*{'/*'.join(WEIGHT_SUFFIXES)}).")
    raise BackboneError(f"local-dir:{folder} holds several weights files {[p.name for p in found]}; keep one, or "
                        f"name it {preferred[0]}.")


def _read_local_dir(name: str) -> tuple[dict[str, Any], ClipWeights]:
    folder = Path(name[len("local-dir:"):]).expanduser()
    cfg_path = folder / "open_clip_config.json"
    if not cfg_path.is_file():
        raise BackboneError(f"{name!r}: {cfg_path} not found (a local-dir: folder holds open_clip_config.json "
                            f"with 'model_cfg', plus the weights).")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise BackboneError(f"{cfg_path} is not valid JSON: {e}") from e
    model_cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict):
        raise BackboneError(f"{cfg_path} holds no 'model_cfg' mapping.")
    return model_cfg, read_clip_weights(_find_weights_in_dir(folder))


# ---- factory ----------------------------------------------------------------------------------------------
def build_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
               activation: Activation = "auto", **overrides: Any) -> ClipBackbone:
    """Build any open_clip model from a name plus a pretrained tag, a local file or a ``local-dir:`` folder.

    ``activation``: ``"auto"`` (QuickGELU when the name, the tag or the file's layout says the weights were
    trained with it; see the module doc), ``"quick_gelu"`` or ``"gelu"`` (an error against such evidence).
    ``overrides`` are passed to open_clip.create_model (e.g. ``embed_dim``, ``vision_cfg``) and are only
    meant for test models.
    """
    register_tiny_configs()
    _check_model_name(name)
    if activation not in ACTIVATIONS:
        raise BackboneError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    tag = None if pretrained in (None, "", "none", "None") else str(pretrained)
    weights: ClipWeights | None = None
    tag_cfg: dict[str, Any] = {}
    model_cfg: dict[str, Any] = {}
    oc_name = name  # the name open_clip builds from (a cached hf-hub: repo is read as its local snapshot)
    if name.startswith("hf-hub:"):
        snapshot = _cached_hf_hub_dir(name)
        if snapshot is not None:
            oc_name = f"local-dir:{snapshot}"
    if oc_name.startswith("local-dir:"):
        model_cfg, weights = _read_local_dir(oc_name)
    elif name.startswith("hf-hub:"):
        pass  # not cached, hub reachable: open_clip downloads config and weights
    else:
        model_cfg = open_clip.get_model_config(name) or {}
        if tag is not None:
            shipped = SHIPPED_WEIGHTS.get((name, tag))
            if shipped is not None:
                if not shipped.is_file():
                    raise BackboneError(f"Shipped weights for {name!r}/{tag!r} missing: expected {shipped}. Re-create "
                                        f"them with `python train.py fit --config configs/world/pretrain_tiny_clip.yaml`.")
                weights = read_clip_weights(shipped)
            elif Path(tag).expanduser().exists():
                path = Path(tag).expanduser()
                if not path.is_file():
                    raise BackboneError(f"Pretrained path {path} is a folder; use 'local-dir:{path}'.")
                weights = read_clip_weights(path)
            elif "/" in tag or tag.endswith(WEIGHT_SUFFIXES + (".ckpt",)):
                raise BackboneError(f"Checkpoint file not found: {tag!r} (pretrained for backbone {name!r}).")
            else:
                tag_cfg = _tag_cfg(name, tag)
                cached = _cached_tag_file(tag_cfg)
                if cached is not None:
                    log.info("%s/%s: weights from the local cache %s", name, tag, cached)
                    weights = read_clip_weights(cached)
                else:
                    reason = offline_reason()
                    if reason:
                        raise BackboneError(_missing_weights_message(name, tag, tag_cfg, reason))
    quick, why = choose_activation(activation, name, bool(model_cfg.get("quick_gelu")), tag,
                                   bool(tag_cfg.get("quick_gelu")), weights)
    kwargs: dict[str, Any] = dict(overrides, force_quick_gelu=quick)
    if tag_cfg:  # the tag's preprocessing, as open_clip applies it when it loads the tag itself
        kwargs.update(image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
                      image_interpolation=tag_cfg.get("interpolation"), image_resize_mode=tag_cfg.get("resize_mode"))
    try:
        if weights is not None:
            with _drop_root_log("No pretrained weights loaded"):  # open_clip's notice; the weights follow
                if oc_name.startswith("local-dir:"):
                    model, _, preprocess = open_clip.create_model_and_transforms(oc_name, load_weights=False,
                                                                                 **kwargs)
                else:
                    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
            load_weights_into(model, weights, name)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag if not name.startswith("hf-hub:") else None, **kwargs)
    except BackboneError:
        raise
    except (RuntimeError, ValueError, FileNotFoundError, OSError) as e:  # open_clip's own download/config errors
        raise BackboneError(f"Could not build {name!r} with pretrained={tag!r}: {e}") from e
    built = model_activation(model)
    if quick and built != "quick_gelu":
        why += " (but this architecture's towers ignore quick_gelu: built with their own activation)"
    log.info("%s: %s activation: %s", name, "QuickGELU" if built == "quick_gelu" else "GELU", why)
    tokenizer = open_clip.get_tokenizer(oc_name)
    model.eval()
    backbone = ClipBackbone(model, preprocess, tokenizer, name, tag, built)
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
