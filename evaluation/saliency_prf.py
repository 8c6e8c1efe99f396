"""Explainability-vs-box evaluation of spatially conditioned generation (ntlb_coop.md 4.4, item 1):
Otsu-binarised relevance maps against the conditioning regions -> mean precision, recall, F1 over pairs.

Input file (``--saliency_prf.file``, written with torch.save; loaded with weights_only=True)::

    {"maps":  FloatTensor [N, h, w]      relevance map of pair n (any scale; upsampled bilinearly to H x W),
     "boxes": FloatTensor [N, 4]         x0, y0, x1, y1 in output-image pixels          (or "masks")
     "masks": BoolTensor  [N, H, W]      ground-truth regions                           (either one)
     "image_size": [H, W]                needed with "boxes" (default: the maps' h, w)
     "texts": list[str] (optional)       the condition of each pair, for the table}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from xclip.evaluation._images import require
from xclip.evaluation.common import RunContext

NAME = "saliency_prf"
HELP = "Otsu-binarised relevance maps vs conditioning boxes/masks: precision, recall, F1"
FORMAT = ("a torch.save'd dict with 'maps' [N,h,w] and either 'boxes' [N,4] (x0,y0,x1,y1 pixels, plus "
          "'image_size' [H,W]) or 'masks' [N,H,W] bool; optional 'texts' list[str]")


@dataclass
class Settings:
    """Suite saliency_prf."""
    file: str | None = None
    """maps + regions: a torch.save'd dict with 'maps' [N,h,w] and 'boxes' [N,4] (+ 'image_size') or 'masks'"""
    nbins: int = 256
    """Otsu histogram bins"""


def check(s: Settings, ctx: RunContext | None = None) -> None:
    require(s.file, "--saliency_prf.file", FORMAT)


def load_maps_and_masks(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """-> maps [N, h, w] float, masks [N, H, W] bool, texts. Errors name the file and the key."""
    from xclip.metrics.saliency import boxes_to_masks

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"saliency_prf: {path} not found; expected {FORMAT}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"saliency_prf: could not read {path}: {type(e).__name__}: {e}; expected {FORMAT}") from e
    if not isinstance(data, dict) or "maps" not in data or not ({"boxes", "masks"} & set(data)):
        keys = list(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"saliency_prf: {path} holds {keys}; expected {FORMAT}")
    maps = torch.as_tensor(data["maps"]).float()
    if maps.dim() != 3:
        raise ValueError(f"saliency_prf: {path}['maps'] has shape {tuple(maps.shape)}; expected [N, h, w]")
    if "masks" in data:
        masks = torch.as_tensor(data["masks"]).bool()
        if masks.dim() != 3 or len(masks) != len(maps):
            raise ValueError(f"saliency_prf: {path}['masks'] has shape {tuple(masks.shape)}; expected "
                             f"[{len(maps)}, H, W]")
    else:
        boxes = torch.as_tensor(data["boxes"]).float()
        if boxes.shape != (len(maps), 4):
            raise ValueError(f"saliency_prf: {path}['boxes'] has shape {tuple(boxes.shape)}; expected [{len(maps)}, 4]")
        h, w = (int(s) for s in data.get("image_size", maps.shape[-2:]))
        masks = boxes_to_masks(boxes, h, w)
    empty = (~masks.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"saliency_prf: {path}: regions {empty[:10]} cover no pixel")
    texts = data.get("texts")
    return maps, masks, list(texts) if texts is not None else None


def run(model, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    from xclip.metrics.saliency import OtsuPRF, mask_prf, otsu_binarize

    check(s)
    maps, masks, texts = load_maps_and_masks(s.file)
    metric = OtsuPRF(nbins=s.nbins)
    metric.update(maps, masks)
    res = {k: float(v) for k, v in metric.compute().items()}
    res["n_pairs"] = len(maps)
    up = torch.nn.functional.interpolate(maps[:, None], size=masks.shape[-2:], mode="bilinear",
                                         align_corners=False)[:, 0] if maps.shape[-2:] != masks.shape[-2:] else maps
    prf = mask_prf(otsu_binarize(up, s.nbins), masks)  # [N, 3]
    res["tables"] = {"pairs": {"columns": ["pair", "text", "precision", "recall", "f1"],
                               "data": [[i, texts[i] if texts else "", *map(float, prf[i])] for i in range(len(maps))]}}
    return res
