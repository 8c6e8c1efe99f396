"""Evaluation of VQGAN-CLIP spatial (bbox) conditioning, per method (ntlb_coop.md 4.4, disentangle text-in-image).

For a prompt set of layouts (each a list of (text, box)), every method generates one image per layout (same seed and
steps), then:
1. **saliency P/R/F1**: per (image, text_k, box_k) the last-layer CLIP image relevance (cosine score, not
   soft-binarised) is upsampled to the image, Otsu-binarised and compared with the box (``metrics.saliency.OtsuPRF``);
   ``mass_in_box`` is the share of the (clamped, normalised) relevance inside the box.
2. **detection AP** (optional, ``--spatial-generation-detector``): the images + boxes are written in the
   ``detection_ap`` layout and that suite is run on them (DETR vs the conditioning boxes).
3. **text in image** (optional, ``--spatial-generation-text-prompts``): plain VQGAN-CLIP images for those prompts,
   generated with and without the spelling projection W of the evaluated model (``--projection``), scored by the
   ``text_in_image`` suite (tesseract); without W in the model only the ``no_W`` group is made.

Prompt file (JSON): ``[{"regions": [{"text": "a red circle", "bbox": [left, top, width, height], "label": "circle"}]}]``
with boxes in pixels of the generated image (``--spatial-generation-size``); ``"box": [x0, y0, x1, y1]`` also works.
Without a file a built-in set of synthetic-world layouts is used.

    python evaluate.py --backbone tiny-vit-world --pretrained synthetic-world --suite spatial_generation \
        --spatial-generation-steps 100 --spatial-generation-out runs/spatial_eval
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from xclip.evaluation.common import read_json_file

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
DEFAULT_METHODS = "textual,similarity,similarity2,explainability"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    a = parser.add_argument
    a("--spatial-generation-prompts", default=None, help="JSON layouts (see module doc); default: built-in set")
    a("--spatial-generation-methods", default=DEFAULT_METHODS, help="comma-separated generation methods")
    a("--spatial-generation-vqgan-config", default="tiny", help="taming yaml, or 'tiny' (random tiny VQGAN)")
    a("--spatial-generation-vqgan-ckpt", default=None, help="taming ckpt for --spatial-generation-vqgan-config")
    a("--spatial-generation-size", type=int, default=64, help="generated image side (boxes are in these pixels)")
    a("--spatial-generation-steps", type=int, default=100)
    a("--spatial-generation-cutn", type=int, default=16)
    a("--spatial-generation-lr", type=float, default=0.1)
    a("--spatial-generation-spatial-loss", default="anchor", choices=("anchor", "dice", "iou"))
    a("--spatial-generation-limit", type=int, default=None, help="use only the first N layouts")
    a("--spatial-generation-out", default="runs/spatial_generation", help="images, annotations, table")
    a("--spatial-generation-detector", default=None,
      help="DETR (HF id / local folder) for AP; omitted: AP is not computed")
    a("--spatial-generation-detector-threshold", type=float, default=0.5)
    a("--spatial-generation-text-prompts", default=None,
      help="'|'-separated prompts for the text-in-image rate (with / without W); omitted: skipped")


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


def run(model, args) -> dict:
    from xclip.generation.vqgan_clip import (METHODS, RegionPrompt, VQGANCLIPConfig, generate, load_vqgan_from_args,
                                       save_image)
    from xclip.losses.spatial import box_mask
    from xclip.metrics.saliency import OtsuPRF
    from xclip.utils.io import atomic_write_bytes, atomic_write_json

    size = args.spatial_generation_size
    methods = [m.strip() for m in args.spatial_generation_methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"spatial_generation: unknown method(s) {bad}; valid: {METHODS}")
    layouts = load_layouts(args.spatial_generation_prompts, size)[:args.spatial_generation_limit]
    backbone = model.backbone
    device = str(backbone.device)
    vqgan = load_vqgan_from_args(args.spatial_generation_vqgan_config, args.spatial_generation_vqgan_ckpt, device)
    f = vqgan.downsample_factor
    if size % f:
        raise SystemExit(f"spatial_generation: --spatial-generation-size {size} must be a multiple of the VQGAN "
                         f"factor {f}")
    base = VQGANCLIPConfig(width=size, height=size, steps=args.spatial_generation_steps,
                           cutn=args.spatial_generation_cutn, lr=args.spatial_generation_lr,
                           spatial_loss=args.spatial_generation_spatial_loss, seed=args.seed)
    out = Path(args.spatial_generation_out)
    res: dict[str, Any] = {"n_layouts": len(layouts), "size": size, "steps": base.steps, "cutn": base.cutn,
                           "vqgan": args.spatial_generation_vqgan_config, "methods": {}}
    rows = []
    for method in methods:
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
        if args.spatial_generation_detector:
            from xclip.evaluation import detection_ap

            ns = argparse.Namespace(detection_ap_dir=str(mdir), detection_ap_detector=args.spatial_generation_detector,
                                    detection_ap_predictions=None,
                                    detection_ap_threshold=args.spatial_generation_detector_threshold,
                                    detection_ap_label_map=None, detection_ap_backend="faster_coco_eval",
                                    device=device)
            ap = detection_ap.run(model, ns)
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
    if not args.spatial_generation_detector:
        res["AP_skipped"] = "no --spatial-generation-detector given"
    if args.spatial_generation_text_prompts:
        res["text_in_image"] = _text_in_image(model, args, vqgan, base, out / "text_in_image")
    return res


def _text_in_image(model, args, vqgan, base, out: Path) -> dict:
    """Plain VQGAN-CLIP images with and without the model's projection W, scored by the text_in_image suite."""
    from xclip.evaluation import text_in_image
    from xclip.generation.vqgan_clip import RegionPrompt, generate, save_image

    prompts = [p.strip() for p in args.spatial_generation_text_prompts.split("|") if p.strip()]
    groups = {"no_W": None}
    if getattr(model, "projection", None) is not None:
        groups["W"] = model.projection
    for group, proj in groups.items():
        for i, text in enumerate(prompts):
            gen = generate(vqgan, model.backbone, [RegionPrompt(text)], replace(base, method="plain", template=""),
                           progress=False, projection=proj)
            save_image(gen.image, out / group / f"img_{i:03d}.png", comment=text)
    try:
        ns = argparse.Namespace(text_in_image_dir=str(out), text_in_image_thresholds="0.0,0.25",
                                text_in_image_psm=7, text_in_image_upscale_below=128, text_in_image_limit=None)
        r = text_in_image.run(model, ns)
    except RuntimeError as e:  # tesseract missing
        return {"skipped": str(e), "groups": list(groups)}
    r.pop("tables", None)
    r["groups"] = list(groups)
    return r
