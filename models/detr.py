"""A COCO-trained DETR (transformers) as an object detector whose labels are mapped to target class names.

    det = DetrDetector.from_pretrained("facebook/detr-resnet-50", class_names=["dog", "cat"])   # HF id (cache)
    det = DetrDetector.from_pretrained("/models/detr-resnet-50", class_names=[...])              # local dir
    dets = det.detect([pil_image, ...])   # [{"boxes" [n, 4] xyxy px, "scores" [n], "labels" [n] -> class_names}]

Configs are read as published: hub configs written by transformers 4.3x-4.4x carry ``"backbone_kwargs": null``
(and ``"backbone_config": null``), which transformers 5.x's ``DetrConfig`` dereferences (``AttributeError``); those
known-null fields mean "the default" and are dropped before the config is built. Old checkpoints' weight names
(``backbone.conv_encoder``, ``out_proj``, ``fc1``) are renamed by transformers itself. Any failure inside
transformers is re-raised as ``DetrLoadError`` naming the file and what to do. Offline (``HF_HUB_OFFLINE=1`` or no
network), an HF id is served from the HF cache only (no retry loop) or fails at once with the cache path.

A detection whose DETR label name (``model.config.id2label``, lower-cased, or its ``label_map`` alias) is not one
of ``class_names`` is dropped. The score threshold defaults to 0.5, the value the NTLB authors' DETR code keeps
(ntlb_coop.md 4.4); pass 0.0 to rank every query (usual for COCO AP).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from xclip.utils.hub import cached_hub_file, hub_cache_dir, offline_reason

log = logging.getLogger(__name__)
# fields that era configs write as null where transformers 5.x expects a mapping or nothing
NULL_MEANS_DEFAULT = ("backbone_kwargs", "backbone_config")
HOWTO = ("pass a local folder holding config.json + model.safetensors (or pytorch_model.bin) and "
         "preprocessor_config.json, e.g. `huggingface-cli download facebook/detr-resnet-50 --local-dir DIR` where "
         "there is network, then --detection-ap-detector DIR")


class DetrLoadError(OSError):
    """A DETR that cannot be loaded; the message names the file and what to do."""


def sanitize_detr_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A published config.json with the known-null fields (``NULL_MEANS_DEFAULT``) dropped."""
    return {k: v for k, v in raw.items() if not (k in NULL_MEANS_DEFAULT and v is None)}


def _config_path(name_or_dir: str, local_only: bool) -> Path:
    local = Path(name_or_dir).expanduser()
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise DetrLoadError(f"DETR folder {local} has no config.json; {HOWTO}.")
        return path
    cached = cached_hub_file(name_or_dir, "config.json")
    if cached:
        return Path(cached)
    if local_only:
        raise DetrLoadError(f"DETR {name_or_dir!r} is not in the HF cache ({hub_cache_dir()}) and the hub cannot be "
                            f"used ({offline_reason()}); {HOWTO}.")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_dir, "config.json", cache_dir=hub_cache_dir()))
    except Exception as e:  # noqa: BLE001 - unknown repo, network
        raise DetrLoadError(f"DETR {name_or_dir!r}: could not fetch config.json ({type(e).__name__}: {e}); "
                            f"{HOWTO}.") from e


def load_detr_config(path: str | Path):
    """A ``DetrConfig`` from a config.json as published (known-null fields dropped); errors name the file."""
    from transformers import DetrConfig, __version__

    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DetrLoadError(f"{path} is not a readable JSON config: {e}") from e
    if not isinstance(raw, dict) or raw.get("model_type", "detr") != "detr":
        raise DetrLoadError(f"{path} is not a DETR config (model_type {raw.get('model_type') if isinstance(raw, dict) else raw!r}).")
    dropped = [k for k in NULL_MEANS_DEFAULT if k in raw and raw[k] is None]
    if dropped:
        log.info("%s: dropped null %s (written by transformers %s; null means the default)", path, dropped,
                 raw.get("transformers_version", "?"))
    try:
        return DetrConfig.from_dict(sanitize_detr_config(raw))
    except Exception as e:  # noqa: BLE001 - anything transformers raises on a config it does not accept
        raise DetrLoadError(f"{path}: transformers {__version__} cannot build a DetrConfig from it "
                            f"({type(e).__name__}: {e}). Fix the field named above in a copy of the folder, or "
                            f"{HOWTO}.") from e


class DetrDetector(nn.Module):
    def __init__(self, model: nn.Module, processor, class_names: Sequence[str],
                 label_map: dict[str, str] | None = None, threshold: float = 0.5):
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.class_names = [c.lower() for c in class_names]
        self.threshold = threshold
        id2label = {int(k): str(v).lower() for k, v in model.config.id2label.items()}
        alias = {k.lower(): v.lower() for k, v in (label_map or {}).items()}
        bad = sorted(v for v in alias.values() if v not in self.class_names)
        if bad:
            raise ValueError(f"DetrDetector: label_map targets {bad} are not among class_names {self.class_names}")
        index = {c: i for i, c in enumerate(self.class_names)}
        # DETR label id -> index into class_names (-1: dropped)
        lut = torch.full((max(id2label, default=0) + 1,), -1, dtype=torch.long)
        for i, name in id2label.items():
            lut[i] = index.get(alias.get(name, name), -1)
        self.register_buffer("label_lut", lut, persistent=False)
        unmatched = [c for c in self.class_names if c not in {alias.get(n, n) for n in id2label.values()}]
        self.unmatched_classes = unmatched  # target classes DETR can never predict

    @classmethod
    def from_pretrained(cls, name_or_dir: str, class_names: Sequence[str], label_map: dict[str, str] | None = None,
                        threshold: float = 0.5, device: str | torch.device = "cpu") -> "DetrDetector":
        from transformers import DetrForObjectDetection, DetrImageProcessor, __version__

        local = Path(name_or_dir).expanduser()
        src = str(local) if local.is_dir() else name_or_dir
        local_only = local.is_dir() or offline_reason() is not None  # offline: the cache only, no retry loop
        config_path = _config_path(name_or_dir, local_only)
        config = load_detr_config(config_path)
        try:
            model = DetrForObjectDetection.from_pretrained(src, config=config, local_files_only=local_only,
                                                           cache_dir=hub_cache_dir())
        except Exception as e:  # noqa: BLE001 - transformers' own errors, re-raised with the file and a how-to
            raise DetrLoadError(f"DETR weights of {name_or_dir!r} (config {config_path}) could not be loaded by "
                                f"transformers {__version__}: {type(e).__name__}: {str(e)[:400]}. {HOWTO}.") from e
        try:
            processor = DetrImageProcessor.from_pretrained(src, local_files_only=local_only,
                                                           cache_dir=hub_cache_dir())
        except OSError:
            log.warning("DETR %r has no preprocessor_config.json: using DETR's COCO defaults (shortest edge 800, "
                        "longest 1333, ImageNet mean/std)", name_or_dir)
            processor = DetrImageProcessor()
        except Exception as e:  # noqa: BLE001
            raise DetrLoadError(f"preprocessor_config.json of DETR {name_or_dir!r} could not be read by transformers "
                                f"{__version__}: {type(e).__name__}: {e}. Delete it to use DETR's COCO defaults, or "
                                f"{HOWTO}.") from e
        return cls(model, processor, class_names, label_map, threshold).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
        """PIL images -> per image {"boxes" [n, 4] xyxy in the image's pixels, "scores" [n], "labels" [n]}."""
        out: list[dict[str, torch.Tensor]] = []
        for s in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[s:s + batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            sizes = [(im.height, im.width) for im in batch]
            for r in self.processor.post_process_object_detection(outputs, threshold=self.threshold,
                                                                  target_sizes=sizes):
                labels = r["labels"].long().cpu()
                mapped = torch.where(labels < len(self.label_lut), self.label_lut.cpu()[labels.clamp(
                    max=len(self.label_lut) - 1)], torch.full_like(labels, -1))
                keep = mapped >= 0
                out.append({"boxes": r["boxes"].float().cpu()[keep], "scores": r["scores"].float().cpu()[keep],
                            "labels": mapped[keep]})
        return out
