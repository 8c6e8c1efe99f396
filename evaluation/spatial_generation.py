"""Evaluation of VQGAN-CLIP spatial (bbox) conditioning, per method (ntlb_coop.md 4.4, disentangle text-in-image).

For a prompt set of layouts (each a list of (text, box)), every method generates one image per layout (same seed and
steps), then:
1. **saliency P/R/F1**: per (image, text_k, box_k) the last-layer CLIP image relevance (cosine score, not
   soft-binarised) is upsampled to the image, Otsu-binarised and compared with the box (``metrics.saliency.OtsuPRF``);
   ``mass_in_box`` is the share of the (clamped, normalised) relevance inside the box.
2. **detection AP** (optional, ``--spatial_generation.detector``): the images + boxes are written in the
   ``detection_ap`` layout and that suite is run on them (DETR vs the conditioning boxes).
3. **text in image** (optional, ``--spatial_generation.text_prompts``): plain VQGAN-CLIP images for those prompts,
   generated with and without the spelling projection W of the evaluated model (``--projection``), scored by the
   ``text_in_image`` suite (tesseract); without W in the model only the ``no_W`` group is made.

Prompt file (JSON): ``[{"regions": [{"text": "a red circle", "bbox": [left, top, width, height], "label": "circle"}]}]``
with boxes in pixels of the generated image (``--spatial_generation.size``); ``"box": [x0, y0, x1, y1]`` also works.
Without a file a built-in set of synthetic-world layouts is used.

    xclip evaluate --backbone tiny-vit-world --pretrained synthetic-world --suite spatial_generation \
        --spatial_generation.steps 100 --spatial_generation.out runs/spatial_eval

Images, annotations and table.md go to ``--spatial_generation.out`` (default: ``spatial_generation/`` beside the
results JSON).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from xclip.evaluation._images import require
from xclip.evaluation.common import RunContext, read_json_file

log = logging.getLogger(__name__)
NAME = "spatial_generation"
HELP = ("VQGAN-CLIP spatial conditioning per method: saliency P/R/F1 + relevance mass in box, optional DETR AP, "
        "optional text-in-image rate with/without W")

DEFAULT_LAYOUTS: list[dict[str, Any]] = [
    {"regions": [{"text": "a red circle", "bbox": [0, 0, 32, 64], "label": "circle"}]},
    {"regions": [{"text": "a blue square", "bbox": [32, 0, 32, 64], "label": "square"}]},
    {"regions": [{"text": "a green triangle", "bbox": [0, 32, 64, 32], "label": "triangle"}]},
    {"regions": [{"text": "a yellow star", "bbox": [16, 16, 32, 32], "label": "star"},
                 {"text": "a purple heart", "bbox": [0, 0, 16, 16], "label": "heart"}]},
]
Method = Literal["plain", "textual", "similarity", "similarity2", "explainability"]   # generation.vqgan_clip.METHODS


@dataclass
class Settings:
    """Suite spatial_generation."""
    prompts: str | None = None
    """JSON layouts (see the module doc); default: a built-in set of world layouts"""
    methods: list[Method] = field(default_factory=lambda: ["textual", "similarity", "similarity2", "explainability"])
    """generation methods compared"""
    vqgan_config: str = "tiny"
    """taming yaml, or 'tiny' (a random tiny VQGAN)"""
    vqgan_ckpt: str | None = None
    """taming checkpoint for vqgan_config"""
    size: int = 64
    """generated image side (boxes are in these pixels)"""
    steps: int = 100
    cutn: int = 16
    lr: float = 0.1
    spatial_loss: Literal["anchor", "dice", "iou"] = "anchor"
    limit: int | None = None
    """use only the first N layouts"""
    out: str | None = None
    """folder for images, annotations and table.md (default: spatial_generation/ beside the results JSON)"""
    detector: str | None = None
    """DETR (HF id / local folder) for AP; omitted: AP is not computed"""
    detector_threshold: float = 0.5
    text_prompts: list[str] | None = None
    """prompts for the text-in-image rate (with / without W); omitted: skipped"""


def out_dir(s: Settings, ctx: RunContext | None) -> Path:
    return Path(s.out) if s.out else (ctx or RunContext()).out_dir / "spatial_generation"


def check(s: Settings, ctx: RunContext | None = None) -> None:
    from xclip.utils.io import check_writable_dir

    if s.steps < 1 or s.size < 1 or s.cutn < 1:
        raise ValueError(f"--spatial_generation.steps, .size and .cutn must be >= 1 (got {s.steps}, {s.size}, "
                         f"{s.cutn})")
    load_layouts(s.prompts, s.size)
    if s.vqgan_config != "tiny":
        from xclip.models.vqgan import load_vqgan_config

        require(s.vqgan_config, "--spatial_generation.vqgan_config", "a taming VQGAN yaml, or 'tiny'")
        load_vqgan_config(s.vqgan_config)   # a bad yaml fails here, before any suite runs
    elif s.vqgan_ckpt:
        raise ValueError("--spatial_generation.vqgan_ckpt given without --spatial_generation.vqgan_config (the "
                         "taming yaml)")
    if s.vqgan_ckpt:
        require(s.vqgan_ckpt, "--spatial_generation.vqgan_ckpt", "the taming checkpoint of vqgan_config")
    check_writable_dir(out_dir(s, ctx), "--spatial_generation.out")
    if s.text_prompts:
        from xclip.metrics.text_in_image import require_tesseract

        try:
            require_tesseract()
        except RuntimeError as e:
            log.warning("spatial_generation: the text-in-image part will be skipped: %s", e)


# ---------------------------------------------------------------------------------------------------------
def load_layouts(path: str | None, size: int) -> list[list[tuple[str, tuple[float, ...], str]]]:
    """-> per layout a list of (text, (left, top, width, height), label); boxes checked against the image."""
    from xclip.losses.spatial import box_mask

    raw = DEFAULT_LAYOUTS if path is None else _read_layout_file(path)
    out = []
    for i, lay in enumerate(raw):
        regions = lay.get("regions") if isinstance(lay, dict) else None
        if not regions:
            raise ValueError(f"spatial_generation: layout {i} in {path or 'defaults'} has no 'regions' list")
        items = []
        for r in regions:
            if "text" not in r or not ("bbox" in r or "box" in r):
                raise ValueError(f"spatial_generation: {path}: layout {i} region {r!r} needs 'text' and "
                                 f"'bbox' [l, t, w, h] (or 'box' [x0, y0, x1, y1])")
            if "bbox" in r:
                bbox = tuple(float(v) for v in r["bbox"])
            else:
                x0, y0, x1, y1 = (float(v) for v in r["box"])
                bbox = (x0, y0, x1 - x0, y1 - y0)
            try:
                box_mask(bbox, size, size)
            except ValueError as e:
                raise ValueError(f"spatial_generation: {path or 'defaults'}: layout {i} region "
                                 f"{r['text']!r}: {e}") from None
            items.append((str(r["text"]), bbox, str(r.get("label", r["text"]))))
        out.append(items)
    return out


def _read_layout_file(path: str) -> list:
    return read_json_file(path, "spatial_generation", list, "a JSON list of layouts")


def relevance_maps(backbone, image: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Last-layer CLS-row image relevance (cosine score) of one image [3, H, W] in [0, 1] for each text,
    upsampled (bilinear) to the image and clamped >= 0: [K, H, W]."""
    from xclip.models.relevance import image_relevance, patch_grid

    s = backbone.image_size
    h, w = image.shape[-2:]
    x = F.interpolate(image[None].to(backbone.device), size=(s, s), mode="bilinear", align_corners=False,
                      antialias=True)
    x = backbone.normalize_pixels(x)
    rel = image_relevance(backbone, x, backbone.tokenize(list(texts)), start_layer=-1, score="cosine")  # [1, K, N]
    grid = rel[0].reshape(len(texts), 1, *patch_grid(backbone)).float()
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0].clamp_min(0).detach()


def mass_in_box(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass inside its mask: maps, masks [K, H, W] -> [K]."""
    total = maps.sum((-2, -1)).clamp_min(1e-12)
    return (maps * masks.to(maps)).sum((-2, -1)) / total


def run(model, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    from xclip.generation.vqgan_clip import (
        METHODS,
        RegionPrompt,
        VQGANCLIPConfig,
        generate,
        load_vqgan_from_args,
        save_image,
    )
    from xclip.losses.spatial import box_mask
    from xclip.metrics.saliency import OtsuPRF
    from xclip.utils.io import atomic_write_bytes, atomic_write_json

    check(s, ctx)
    ctx = ctx or RunContext()
    size = s.size
    bad = [m for m in s.methods if m not in METHODS]
    if bad:
        raise ValueError(f"spatial_generation: unknown method(s) {bad}; valid: {METHODS}")
    layouts = load_layouts(s.prompts, size)[:s.limit]
    backbone = model.backbone
    device = str(backbone.device)
    vqgan = load_vqgan_from_args(s.vqgan_config, s.vqgan_ckpt, device)
    f = vqgan.downsample_factor
    if size % f:
        raise ValueError(f"spatial_generation: --spatial_generation.size {size} must be a multiple of the VQGAN "
                         f"factor {f}")
    base = VQGANCLIPConfig(width=size, height=size, steps=s.steps, cutn=s.cutn, lr=s.lr,
                           spatial_loss=s.spatial_loss, seed=ctx.seed)
    out = out_dir(s, ctx)
    res: dict[str, Any] = {"n_layouts": len(layouts), "size": size, "steps": base.steps, "cutn": base.cutn,
                           "vqgan": s.vqgan_config, "methods": {}}
    rows = []
    for method in s.methods:
        mdir = out / method
        prf = OtsuPRF()
        masses, ann = [], {}
        for li, layout in enumerate(layouts):
            prompts = [RegionPrompt(t, b) for t, b, _ in layout]
            gen = generate(vqgan, backbone, prompts, replace(base, method=method), progress=False)
            fname = f"img_{li:03d}.png"
            save_image(gen.image, mdir / fname, comment=" | ".join(t for t, _, _ in layout))
            texts = [base.template.format(t) for t, _, _ in layout]
            maps = relevance_maps(backbone, gen.image, texts)                                 # [K, H, W]
            masks = torch.stack([box_mask(b, size, size) for _, b, _ in layout]).bool()      # [K, H, W]
            prf.update(maps.cpu(), masks)
            masses.append(mass_in_box(maps.cpu(), masks))
            ann[fname] = [{"label": lab, "box": [b[0], b[1], b[0] + b[2], b[1] + b[3]]} for _, b, lab in layout]
        atomic_write_json(ann, mdir / "annotations.json")
        scores = {k: float(v) for k, v in prf.compute().items()}
        scores["mass_in_box"] = float(torch.cat(masses).mean())
        if s.detector:
            from xclip.evaluation import detection_ap

            ap = detection_ap.run(model, detection_ap.Settings(dir=str(mdir), detector=s.detector,
                                                               threshold=s.detector_threshold))
            ap.pop("tables", None)
            scores.update({k: v for k, v in ap.items() if k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")})
        res["methods"][method] = scores
        rows.append([method] + [scores.get(k) for k in ("precision", "recall", "f1", "mass_in_box", "AP", "AR100")])
    columns = ["method", "precision", "recall", "f1", "mass_in_box", "AP", "AR100"]
    res["tables"] = {"methods": {"columns": columns, "data": rows}}
    md = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n" + "".join(
        "| " + " | ".join(r[0] if i == 0 else ("-" if v is None else f"{v:.3f}") for i, v in enumerate(r)) + " |\n"
        for r in rows)
    atomic_write_bytes(out / "table.md", md.encode())
    res["table_md"] = str(out / "table.md")
    if not s.detector:
        res["AP_skipped"] = "no --spatial_generation.detector given"
    if s.text_prompts:
        res["text_in_image"] = _text_in_image(model, s.text_prompts, vqgan, base, out / "text_in_image")
    return res


def _text_in_image(model, prompts: Sequence[str], vqgan, base, out: Path) -> dict:
    """Plain VQGAN-CLIP images with and without the model's projection W, scored by the text_in_image suite."""
    from xclip.evaluation import text_in_image
    from xclip.generation.vqgan_clip import RegionPrompt, generate, save_image

    prompts = [p.strip() for p in prompts if p.strip()]
    groups = {"no_W": None}
    if getattr(model, "projection", None) is not None:
        groups["W"] = model.projection
    for group, proj in groups.items():
        for i, text in enumerate(prompts):
            gen = generate(vqgan, model.backbone, [RegionPrompt(text)], replace(base, method="plain", template=""),
                           progress=False, projection=proj)
            save_image(gen.image, out / group / f"img_{i:03d}.png", comment=text)
    try:
        r = text_in_image.run(model, text_in_image.Settings(dir=str(out)))
    except RuntimeError as e:  # tesseract missing
        return {"skipped": str(e), "groups": list(groups)}
    r.pop("tables", None)
    r["groups"] = list(groups)
    return r
