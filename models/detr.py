"""A COCO-trained DETR (transformers) as an object detector whose labels are mapped to target class names.

    det = DetrDetector.from_pretrained("facebook/detr-resnet-50", class_names=["dog", "cat"])   # HF id (cache)
    det = DetrDetector.from_pretrained("/models/detr-resnet-50", class_names=[...])              # local dir
    dets = det.detect([pil_image, ...])   # [{"boxes" [n, 4] xyxy px, "scores" [n], "labels" [n] -> class_names}]

A detection whose DETR label name (``model.config.id2label``, lower-cased, or its ``label_map`` alias) is not one
of ``class_names`` is dropped. The score threshold defaults to 0.5, the value the NTLB authors' DETR code keeps
(ntlb_coop.md 4.4); pass 0.0 to rank every query (usual for COCO AP).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn


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
        from transformers import DetrForObjectDetection, DetrImageProcessor

        local = Path(name_or_dir).expanduser()
        src = str(local) if local.is_dir() else name_or_dir
        try:
            model = DetrForObjectDetection.from_pretrained(src)
        except OSError as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True")
            raise OSError(f"DETR {name_or_dir!r} could not be loaded{' (HF_HUB_OFFLINE=1)' if offline else ''}: "
                          f"pass a local folder holding config.json + model.safetensors (save_pretrained), or "
                          f"download it once online into the HF cache. Cause: {e}") from e
        try:
            processor = DetrImageProcessor.from_pretrained(src)
        except OSError:
            processor = DetrImageProcessor()  # the COCO defaults (shortest edge 800, ImageNet mean/std)
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
