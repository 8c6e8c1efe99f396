"""Relevance maps for B images x C texts, as data, one labelled PNG grid and a self-contained HTML page.

    from xclip.models.clip_backbone import build_clip
    from xclip.models.explain import explain, write_grid_png, write_html

    bb = build_clip("tiny-vit-world", "synthetic-world").freeze()
    res = explain(bb, ["a.png", "b.png"], ["a red star", "a blue circle"])   # ExplainResult
    write_grid_png(res, "out/explain.png"); write_html(res, "out/explain.html")

One call of the joint engine (``models.relevance.relevance``) gives both maps for all B x C pairs: one forward of
each tower, batched backward passes.  Displayed per cell: the image relevance (CLS row, bilinear upsample, min-max,
jet, blended 50 % over the image the model saw, as T's notebook ``show_image_relevance``), and the text's tokens
between SOS and EOT coloured by their EOT-row relevance normalised to sum 1 over those tokens (the notebook's text
display), with the cosine similarity and the softmax over the C texts of ``logit_scale * cos`` (the notebook's
"probs").
"""
from __future__ import annotations

import base64
import html
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from xclip.models.relevance import normalise_token_relevance, patch_grid, relevance
from xclip.models.relevance_viz import _colormap, overlay_relevance, token_strings

__all__ = ["ExplainResult", "explain", "load_images", "write_grid_png", "write_html", "grid_png_size", "log_wandb"]

CELL_IN = 2.4  # inches per grid cell (width); image part is square
STRIP_IN = 0.42  # inches of token strip under each image
LABEL_IN = 1.3  # left margin for the image labels
TITLE_IN = 0.7  # top margin for the text headers
DPI = 100


@dataclass
class ExplainResult:
    """All numbers behind an explain grid (B images x C texts).

    images: [B, 3, H, W] in [0, 1] (the crop the model saw); image_relevance: [B, C, h, w] raw CLS-row relevance on
    the patch grid; text_relevance: [B, C, L] raw EOT rows; tokens: [C, L]; similarity: [B, C] cosine;
    probs: [B, C] softmax over the texts of logit_scale * cos.
    """

    texts: list[str]
    labels: list[str]
    images: torch.Tensor
    image_relevance: torch.Tensor
    text_relevance: torch.Tensor
    tokens: torch.Tensor
    token_pieces: list[list[str]]
    similarity: torch.Tensor
    probs: torch.Tensor
    start_layer_text: int
    start_layer_image: int
    n_layers_text: int = 0
    n_layers_image: int = 0

    def token_scores(self, b: int, c: int) -> tuple[list[str], torch.Tensor]:
        """Tokens between SOS and EOT of text c and their relevance for image b, normalised to sum 1."""
        eot = int(self.tokens[c].argmax())
        r = normalise_token_relevance(self.text_relevance[b, c], eot, "styleclip")  # R[eot, 1:eot] / sum
        return self.token_pieces[c][1:eot], r[1:eot]


def load_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Open every image first; a missing / unreadable file raises one ValueError naming all bad paths."""
    bad, out = [], []
    for p in paths:
        p = Path(p)
        try:
            with Image.open(p) as im:
                im.load()
                out.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            bad.append(f"{p}: {'no such file' if not p.exists() else type(e).__name__ + ': ' + str(e)}")
    if bad:
        raise ValueError("Cannot read image(s):\n  " + "\n  ".join(bad))
    return out


def _pixels(backbone, images) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """images (paths / PIL / [B, 3, H, W] in [0, 1]) -> (CLIP-normalised [B, 3, S, S], display [B, 3, S, S], labels)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images tensor must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}.")
        x01 = images.float().clamp(0, 1).to(backbone.device)
        return backbone.normalize_pixels(x01), x01, [f"image {i}" for i in range(len(images))]
    images = list(images)
    labels = [Path(im).name if isinstance(im, (str, Path)) else f"image {i}" for i, im in enumerate(images)]
    paths = [im for im in images if isinstance(im, (str, Path))]
    loaded = iter(load_images(paths))
    pil = [next(loaded) if isinstance(im, (str, Path)) else im.convert("RGB") for im in images]
    x = torch.stack([backbone.preprocess(im) for im in pil]).to(backbone.device)  # [B, 3, S, S] normalised
    mean = torch.tensor(backbone.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=x.device).view(1, 3, 1, 1)
    return x, (x * std + mean).clamp(0, 1), labels


def explain(backbone, images, texts: Sequence[str], *, start_layer_text: int = 0, start_layer_image: int = -1,
            labels: Sequence[str] | None = None, chunk_size: int | None = 256) -> ExplainResult:
    """Both relevance maps for every (image, text) pair with one call of the joint engine.

    images: image paths, PIL images, or a [B, 3, H, W] tensor in [0, 1]; texts: C strings.
    start_layer_*: first layer entering R (negative counts from the end): text 0 = all layers, image -1 = last.
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("explain needs at least one text.")
    x, x01, default_labels = _pixels(backbone, images)
    tokens = backbone.tokenize(texts)  # [C, L]
    out = relevance(backbone, x, tokens, start_layer_text=start_layer_text, start_layer_image=start_layer_image,
                    chunk_size=chunk_size)
    B, C = out.similarity.shape
    scale = float(backbone.model.logit_scale.exp())
    return ExplainResult(
        texts=texts, labels=list(labels) if labels is not None else default_labels, images=x01.cpu(),
        image_relevance=out.image.reshape(B, C, *patch_grid(backbone)).cpu(), text_relevance=out.text.cpu(),
        tokens=tokens.cpu(), token_pieces=[token_strings(t, backbone.tokenizer) for t in tokens.cpu()],
        similarity=(out.similarity / scale).cpu(), probs=out.similarity.softmax(dim=-1).cpu(),
        start_layer_text=start_layer_text, start_layer_image=start_layer_image,
        n_layers_text=len(backbone.model.transformer.resblocks),
        n_layers_image=len(backbone.model.visual.transformer.resblocks))


def _layers(start: int, n: int) -> str:
    s = start + n if start < 0 else start
    return "all layers" if s == 0 else "last layer" if s == n - 1 else f"layers {s}-{n - 1}"


# ------------------------------------------------------------------------------------------------ PNG grid
def grid_png_size(n_images: int, n_texts: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``write_grid_png`` writes for this grid."""
    w = LABEL_IN + n_texts * CELL_IN
    h = TITLE_IN + n_images * (CELL_IN + STRIP_IN) + 0.25
    return int(round(w * DPI)), int(round(h * DPI))


def _draw_strip(ax, pieces: list[str], scores: torch.Tensor) -> None:
    """Tokens as coloured boxes (width by length), score under each; font shrinks for long texts."""
    from matplotlib.patches import Rectangle

    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if not pieces:
        return
    v = scores.float().numpy()
    v01 = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else np.zeros_like(v)
    colours = _colormap(v01[None], "Reds")[0] / 255.0
    chars = np.array([max(len(p), 3) + 1.0 for p in pieces])
    widths = chars / chars.sum()
    fs = float(np.clip(7.5 * 36 / chars.sum(), 4.0, 7.5))
    x = 0.0
    for p, w, col, s, s01 in zip(pieces, widths, colours, v, v01):
        ax.add_patch(Rectangle((x, 0.42), w, 0.56, facecolor=col, edgecolor="white", linewidth=0.8))
        ink = "white" if s01 > 0.6 else "black"
        ax.text(x + w / 2, 0.70, p, ha="center", va="center", fontsize=fs, color=ink)
        ax.text(x + w / 2, 0.18, f"{s:.2f}", ha="center", va="center", fontsize=max(fs - 1.5, 3.5), color="0.3")
        x += w


def render_grid(result: ExplainResult):
    """-> matplotlib Figure: rows images, columns texts; overlay + token strip + scores per cell."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    B, C = result.similarity.shape
    W, H = grid_png_size(B, C)
    fig = plt.figure(figsize=(W / DPI, H / DPI), dpi=DPI)
    left = LABEL_IN / (W / DPI)
    top = 1 - TITLE_IN / (H / DPI)
    bottom = 0.25 / (H / DPI)
    cell_h = (top - bottom) / B
    cell_w = (1 - left) / C
    img_h = cell_h * CELL_IN / (CELL_IN + STRIP_IN)
    pad = 0.06
    for c, text in enumerate(result.texts):
        fig.text(left + (c + 0.5) * cell_w, top + 0.25 * TITLE_IN / (H / DPI),
                 "\n".join(textwrap.wrap(text, 28)[:2]), ha="center", va="bottom", fontsize=9, weight="bold")
    for b in range(B):
        y0 = top - (b + 1) * cell_h
        fig.text(left * 0.5, y0 + cell_h - img_h / 2, "\n".join(textwrap.wrap(result.labels[b], 17)[:4]),
                 ha="center", va="center", fontsize=8, weight="bold", rotation=0)
        best = int(result.similarity[b].argmax())
        for c in range(C):
            x0 = left + c * cell_w
            ax = fig.add_axes([x0 + cell_w * pad, y0 + cell_h - img_h + img_h * 0.13,
                               cell_w * (1 - 2 * pad), img_h * 0.85])
            ax.imshow(np.asarray(_overlay(result, b, c)), interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_color("#d62728" if c == best else "0.7")
                side.set_linewidth(2.0 if c == best else 0.6)
            ax.set_title(f"cos {float(result.similarity[b, c]):.3f}   p {float(result.probs[b, c]):.2f}",
                         fontsize=8, pad=2, color="#d62728" if c == best else "black")
            sx = fig.add_axes([x0 + cell_w * 0.03, y0 + 0.02 * cell_h, cell_w * 0.94,
                               (cell_h - img_h) * 0.9 + img_h * 0.1])
            pieces, scores = result.token_scores(b, c)
            _draw_strip(sx, pieces, scores)
    fig.text(0.5, 0.004, f"image relevance (CLS row): {_layers(result.start_layer_image, result.n_layers_image)}; "
             f"token relevance (EOT row, sum 1): {_layers(result.start_layer_text, result.n_layers_text)}; "
             f"p = softmax over texts; red frame = best text",
             ha="center", va="bottom", fontsize=6.5, color="0.35")
    return fig


def write_grid_png(result: ExplainResult, path: str | Path) -> Path:
    """Render the grid and write it atomically as PNG; returns the path."""
    import matplotlib.pyplot as plt

    from xclip.utils.io import atomic_write_bytes

    fig = render_grid(result)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ------------------------------------------------------------------------------------------------ HTML
def _overlay(result: "ExplainResult", b: int, c: int, size: int = 224) -> Image.Image:
    """The image upsampled (bicubic) to ``size`` first, so the heat map is smooth at display size."""
    from xclip.models.relevance_viz import _to_pil

    base = _to_pil(result.images[b]).resize((size, size), Image.BICUBIC)
    return overlay_relevance(base, result.image_relevance[b, c])


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(result: ExplainResult, size: int = 224) -> str:
    """A self-contained page (images base64-embedded): one table, rows images, columns texts."""
    B, C = result.similarity.shape
    head = "".join(f"<th>{html.escape(t)}</th>" for t in result.texts)
    rows = []
    for b in range(B):
        best = int(result.similarity[b].argmax())
        cells = []
        for c in range(C):
            over = _overlay(result, b, c, size)
            pieces, scores = result.token_scores(b, c)
            v = scores.float().numpy()
            v01 = (v - v.min()) / (v.max() - v.min()) if len(v) and v.max() > v.min() else np.zeros_like(v)
            cols = _colormap(v01[None], "Reds")[0] if len(v) else []
            toks = "".join(
                f'<span class="tok" style="background:rgb({r},{g},{bl});color:{"#fff" if s01 > 0.6 else "#000"}" '
                f'title="{s:.3f}">{html.escape(p)}<sub>{s:.2f}</sub></span>'
                for p, (r, g, bl), s, s01 in zip(pieces, cols, v.tolist(), v01.tolist()))
            cls = ' class="best"' if c == best else ""
            cells.append(f'<td{cls}><img src="{_png_data_uri(over)}" width="{size}" height="{size}" alt="relevance">'
                         f'<div class="score">cos {float(result.similarity[b, c]):.3f} &middot; '
                         f'p {float(result.probs[b, c]):.2f}</div><div>{toks}</div></td>')
        rows.append(f"<tr><th>{html.escape(result.labels[b])}</th>{''.join(cells)}</tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>xclip explain</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:center;max-width:{size + 20}px}}
td.best{{outline:3px solid #d62728}} .score{{font-size:90%;margin:3px}}
.tok{{display:inline-block;padding:1px 3px;margin:1px;border-radius:3px;font-size:85%}}</style></head><body>
<h3>Relevance (Chefer et al.): image {_layers(result.start_layer_image, result.n_layers_image)}, text {_layers(result.start_layer_text, result.n_layers_text)}</h3>
<p>Overlay: CLS-row image relevance, min-max, jet. Tokens: EOT-row relevance between SOS and EOT, normalised to sum 1.
cos = cosine similarity; p = softmax over the texts of logit_scale &middot; cos; red frame = best text per image.</p>
<table><tr><th></th>{head}</tr>
{chr(10).join(rows)}
</table></body></html>
"""


def write_html(result: ExplainResult, path: str | Path) -> Path:
    from xclip.utils.io import atomic_write_bytes

    atomic_write_bytes(path, render_html(result).encode("utf-8"))
    return Path(path)


# ------------------------------------------------------------------------------------------------ W&B
def log_wandb(result: ExplainResult, png: str | Path, project: str, out_dir: str | Path) -> str:
    """Log the grid and a per-pair table to W&B (offline unless a key / WANDB_MODE says otherwise) -> run dir."""
    import wandb

    from xclip.utils.wandb_setup import ensure_wandb_mode

    mode = ensure_wandb_mode()
    run = wandb.init(project=project, dir=str(out_dir), mode=mode, job_type="explain",
                     config={"start_layer_text": result.start_layer_text,
                             "start_layer_image": result.start_layer_image})
    try:
        table = wandb.Table(columns=["image", "text", "cos", "p", "overlay"])
        for b, label in enumerate(result.labels):
            for c, text in enumerate(result.texts):
                over = _overlay(result, b, c)
                table.add_data(label, text, float(result.similarity[b, c]), float(result.probs[b, c]),
                               wandb.Image(over))
        run.log({"explain/grid": wandb.Image(str(png)), "explain/pairs": table})
        return str(run.dir)
    finally:
        run.finish()
