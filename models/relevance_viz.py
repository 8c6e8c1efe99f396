"""Pictures of relevance maps, as PIL images ready for ``WandbLogger.log_image(key, images=[...])``.

    overlay_relevance(image, rel[N] or [h, w])  -> PIL: bilinear upsample, min-max, colormap, alpha blend
    relevance_heatmap(rel, size)                 -> PIL: the coloured map alone
    token_heat_strip(words, scores)              -> PIL: one coloured cell per token / word with its text and score
    token_strings(tokens[L], tokenizer)          -> list[str]: readable BPE pieces SOS..EOT
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


def _to_map(rel: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[N] (square patch grid) or [h, w] -> float tensor [h, w]."""
    rel = torch.as_tensor(rel).detach().float().cpu()
    if rel.dim() == 1:
        side = math.isqrt(rel.numel())
        if side * side != rel.numel():
            raise ValueError(f"A flat relevance vector must have a square number of patches, got {rel.numel()}; "
                             f"reshape it to the patch grid (models.relevance.patch_grid) first.")
        rel = rel.reshape(side, side)
    if rel.dim() != 2:
        raise ValueError(f"relevance must be [N] or [h, w], got shape {tuple(rel.shape)}.")
    return rel


def _to_pil(image: Image.Image | torch.Tensor | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = torch.as_tensor(image).detach().float().cpu()
    if arr.dim() == 3 and arr.shape[0] in (1, 3):  # [3, H, W] in [0, 1]
        arr = arr.permute(1, 2, 0)
    if arr.dim() != 3:
        raise ValueError(f"image must be PIL, [3, H, W] or [H, W, 3] in [0, 1], got shape {tuple(arr.shape)}.")
    if arr.shape[-1] == 1:
        arr = arr.expand(-1, -1, 3)
    return Image.fromarray((arr.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


# Built-in colour ramps (piecewise linear RGB anchors), used when matplotlib is not installed.
_RAMPS: dict[str, list[tuple[float, float, float]]] = {
    "jet": [(0, 0, 0.5), (0, 0, 1), (0, 0.5, 1), (0, 1, 1), (0.5, 1, 0.5), (1, 1, 0), (1, 0.5, 0), (1, 0, 0),
            (0.5, 0, 0)],
    "Reds": [(1, 0.96, 0.94), (0.99, 0.73, 0.63), (0.98, 0.42, 0.29), (0.80, 0.09, 0.11), (0.40, 0, 0.05)],
    "gray": [(0, 0, 0), (1, 1, 1)],
}


def _colormap(values01: np.ndarray, cmap: str) -> np.ndarray:
    """[...] in [0, 1] -> [..., 3] uint8, with matplotlib's colormap when available, else a built-in ramp."""
    try:
        import matplotlib

        rgba = matplotlib.colormaps[cmap](values01)
        return (rgba[..., :3] * 255).round().astype(np.uint8)
    except ImportError:
        if cmap not in _RAMPS:
            raise ValueError(f"colormap {cmap!r} needs matplotlib (not installed); built-in: {sorted(_RAMPS)}.")
    anchors = np.asarray(_RAMPS[cmap], dtype=np.float64)  # [K, 3]
    grid = np.linspace(0.0, 1.0, len(anchors))
    v = np.clip(values01, 0.0, 1.0)
    rgb = np.stack([np.interp(v, grid, anchors[:, k]) for k in range(3)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def relevance_heatmap(rel: torch.Tensor | np.ndarray, size: tuple[int, int], cmap: str = "jet") -> Image.Image:
    """Relevance [N] or [h, w] -> coloured PIL image of ``size`` = (width, height), bilinear + min-max."""
    m = _to_map(rel)[None, None]  # [1, 1, h, w]
    up = F.interpolate(m, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    up = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
    return Image.fromarray(_colormap(up.numpy(), cmap))


def overlay_relevance(image: Image.Image | torch.Tensor | np.ndarray, rel: torch.Tensor | np.ndarray,
                      alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend the relevance heat map over the image (image: PIL, or [3, H, W] / [H, W, 3] in [0, 1], un-normalised)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    base = _to_pil(image)
    heat = relevance_heatmap(rel, base.size, cmap)
    return Image.blend(base, heat, alpha)


def token_strings(tokens: torch.Tensor, tokenizer) -> list[str]:
    """[L] token ids -> readable pieces from SOS to EOT (open_clip SimpleTokenizer: '</w>' marks a word end)."""
    ids = torch.as_tensor(tokens).tolist()
    eot = max(range(len(ids)), key=lambda i: ids[i])
    dec = getattr(tokenizer, "decoder", None) or getattr(getattr(tokenizer, "tokenizer", None), "decoder", None)
    out = []
    for i in ids[: eot + 1]:
        if dec is not None and i in dec:
            out.append(dec[i].replace("</w>", "").replace("<start_of_text>", "<sos>").replace("<end_of_text>", "<eot>"))
        else:
            out.append(tokenizer.decode([i]) if hasattr(tokenizer, "decode") else str(i))
    return out


def token_heat_strip(words: Sequence[str], scores: torch.Tensor | Sequence[float], cmap: str = "Reds",
                     cell_height: int = 28, min_cell_width: int = 36, show_values: bool = True,
                     normalise: bool = True) -> Image.Image:
    """One coloured cell per token / word, coloured by its score (min-max normalised unless normalise=False,
    then scores are taken as already in [0, 1])."""
    vals = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if len(words) != vals.numel():
        raise ValueError(f"{len(words)} words but {vals.numel()} scores.")
    if normalise and vals.numel():
        lo, hi = vals.min(), vals.max()
        v01 = (vals - lo) / (hi - lo) if hi > lo else torch.zeros_like(vals)
    else:
        v01 = vals.clamp(0, 1)
    colours = _colormap(v01.numpy()[None], cmap)[0] if vals.numel() else np.zeros((0, 3), np.uint8)
    font = ImageFont.load_default()
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(min_cell_width, int(draw_probe.textlength(w, font=font)) + 10) for w in words]
    height = cell_height * (2 if show_values else 1)
    strip = Image.new("RGB", (max(1, sum(widths)), height), "white")
    draw = ImageDraw.Draw(strip)
    x = 0
    for w, width, col, v, v1 in zip(words, widths, colours, vals.tolist(), v01.tolist()):
        draw.rectangle([x, 0, x + width - 1, height - 1], fill=tuple(int(c) for c in col), outline=(200, 200, 200))
        ink = (255, 255, 255) if v1 > 0.6 else (0, 0, 0)
        draw.text((x + 5, 7), w, fill=ink, font=font)
        if show_values:
            draw.text((x + 5, cell_height + 7), f"{v:.2f}", fill=ink, font=font)
        x += width
    return strip
