"""TEXTSPAN (TextSpan paper §4.1, Algorithm 1; spec A5): per-head greedy text bases.

For one head with contributions C [K, D] (K images) and a pool of unit-norm text embeddings R [M, D]:

1. project the texts onto the span of C's top-``rank`` right singular vectors (SVD of the *uncentred* C);
2. centre C (reconstruction starts at the mean row);
3. m times: pick the text whose projection has the largest std over images, record it, add the data's
   projection on it to the reconstruction, deflate the data *and every text* by that direction
   (texts are not renormalised, so the criterion favours texts with a large remaining in-span component).

    res = textspan(C, R, m=20, rank=80)
    res.indices          # ordered pool indices
    res.reconstruction   # [K, D] mean + projection on the chosen (mutually orthogonal) directions
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


@dataclass
class TextSpanResult:
    indices: list[int]             # pool indices, in selection order
    variances: list[float]         # the std (over images) of the picked direction at each step
    reconstruction: torch.Tensor   # [K, D]


def project_onto_top_singular(data: torch.Tensor, texts: torch.Tensor, rank: int) -> torch.Tensor:
    """texts [M, D] -> their orthogonal projection onto the span of data's top-``rank`` right singular vectors."""
    _, _, vh = torch.linalg.svd(data, full_matrices=False)          # vh: [min(K, D), D]
    v = vh[: min(rank, vh.shape[0])]                                 # [r, D] orthonormal rows
    return (texts @ v.T) @ v


@torch.no_grad()
def textspan(contribs: torch.Tensor, texts: torch.Tensor, m: int, rank: int | None = 80) -> TextSpanResult:
    """Greedy TEXTSPAN for one head. contribs: [K, D]; texts: [M, D] (unit-norm text embeddings).

    ``rank``: the head's output rank for step 1 (None skips the projection).
    """
    if contribs.dim() != 2 or texts.dim() != 2 or contribs.shape[1] != texts.shape[1]:
        raise ValueError(f"textspan: expected contribs [K, D] and texts [M, D] with the same D, got "
                         f"{tuple(contribs.shape)} and {tuple(texts.shape)}")
    if not 1 <= m <= texts.shape[0]:
        raise ValueError(f"textspan: m={m} must be in [1, {texts.shape[0]}] (the pool size)")
    data = contribs.double()
    R = texts.double().clone()
    if rank is not None:
        R = project_onto_top_singular(data, R, rank)
    mean = data.mean(dim=0, keepdim=True)                           # [1, D]
    data = data - mean
    recon = mean.expand_as(data).clone()                            # [K, D]
    chosen: list[int] = []
    stds: list[float] = []
    for _ in range(m):
        proj = data @ R.T                                           # [K, M]
        std = proj.std(dim=0)                                       # [M]
        if chosen:
            std[chosen] = -1.0                                      # already deflated to 0; never re-pick
        j = int(std.argmax())
        t = R[j].clone()                                            # [D]
        tt = (t @ t).clamp_min(1e-30)
        coef = data @ t / tt                                        # [K]
        recon += coef[:, None] * t[None]
        data -= coef[:, None] * t[None]
        R -= ((R @ t) / tt)[:, None] * t[None]
        chosen.append(j)
        stds.append(float(std[j]))
    return TextSpanResult(indices=chosen, variances=stds, reconstruction=recon.to(contribs.dtype))


def load_text_pool(path: str | Path) -> list[str]:
    """One description a line (blank lines skipped). Fails naming the file if it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text pool file not found: {path} (one description per line; the paper's pool "
                                f"is image_descriptions_general.txt, 3,498 lines)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"text pool {path} has no non-empty lines")
    return lines


@torch.no_grad()
def encode_text_pool(backbone, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """[M, D] unit-norm CLIP text embeddings of ``texts`` (backbone: models.clip_backbone.ClipBackbone)."""
    out = [backbone.encode_text(backbone.tokenize(list(texts[i:i + batch_size])), normalize=True).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


def run_textspan_heads(heads: "object", texts: torch.Tensor, pool: Sequence[str], layers: Sequence[int],
                       m: int, rank: int | None = 80, progress: bool = True) -> dict:
    """Run TEXTSPAN for every head of ``layers``.

    ``heads``: an array-like indexable as heads[:, l, h] -> [K, D] (a torch tensor or analysis.store.ShardedArray).
    Returns {"L{l}.H{h}": {"layer", "head", "texts", "indices", "stds", "reconstruction" ([K, D] tensor)}}.
    """
    from xclip.analysis.store import get_head_column

    n_heads = int(heads.shape[2])
    jobs = [(l, h) for l in layers for h in range(n_heads)]
    out: dict = {}
    bar = _progress(progress)
    with bar:
        task = bar.add_task("TEXTSPAN heads", total=len(jobs))
        for l, h in jobs:
            c = get_head_column(heads, l, h)                          # [K, D]
            res = textspan(c, texts, m=m, rank=rank)
            out[f"L{l}.H{h}"] = {"layer": l, "head": h, "texts": [pool[i] for i in res.indices],
                                 "indices": res.indices, "stds": res.variances,
                                 "reconstruction": res.reconstruction}
            bar.advance(task)
    return out


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)


def write_head_texts(results: dict, json_path: str | Path | None = None, md_path: str | Path | None = None) -> None:
    """Write per-head text lists as JSON ({"L{l}.H{h}": {...}}) and/or markdown ("## Layer l, Head h" blocks)."""
    from xclip.utils.io import atomic_write_bytes, atomic_write_json

    clean = {k: {kk: vv for kk, vv in v.items() if kk != "reconstruction"} for k, v in results.items()}
    if json_path is not None:
        atomic_write_json(clean, json_path)
    if md_path is not None:
        lines = ["# TEXTSPAN per-head descriptions", ""]
        for v in clean.values():
            lines.append(f"## Layer {v['layer']}, Head {v['head']}")
            lines.append("")
            lines += [f"{i + 1}. {t}" for i, t in enumerate(v["texts"])]
            lines.append("")
        atomic_write_bytes(md_path, "\n".join(lines).encode("utf-8"))


def dumps(results: dict) -> str:
    return json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "reconstruction"} for k, v in results.items()})
