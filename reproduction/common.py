"""What every reproduction part shares: the CLIP it runs on, mean +- std over seeds, and the report's cells."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def package_configs() -> Path:
    import xclip

    return Path(xclip.__file__).resolve().parent / "configs"


def pretrained_arg(args) -> str | None:
    p = args.pretrained
    return None if p is None or str(p).lower() in ("none", "null", "") else str(p)


def build_backbone(args):
    from xclip.models.clip_backbone import build_clip

    return build_clip(args.backbone, pretrained_arg(args)).freeze()


# ------------------------------------------------------------------------------------------------- over seeds
def mean_std(values: list[float]) -> dict[str, Any]:
    """{"mean", "std" (sample, ddof 1; 0 for one value), "n", "values"}."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": sd, "n": n, "values": list(values)}


def aggregate(runs: list[dict[str, float]]) -> dict[str, dict]:
    """Per key present in every run: mean_std over runs."""
    keys = [k for k in runs[0] if all(k in r and isinstance(r[k], (int, float)) for r in runs)]
    return {k: mean_std([float(r[k]) for r in runs]) for k in keys}


# ------------------------------------------------------------------------------------------------- report cells
def ms(d: dict | None, digits: int = 1) -> str:
    """A mean_std dict as 'mean ± std' ('-' when absent, the mean alone for one seed)."""
    if not d:
        return "-"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if d["n"] > 1 else f"{d['mean']:.{digits}f}"


def header(name: str, res: dict) -> list[str]:
    """A part's section title and the line saying how it was run (res["meta"])."""
    size = "quick (test) sizes, not the full protocol" if res["meta"]["quick"] else "full size"
    sha = res["meta"].get("weights_sha256")
    return [f"## {name}", "", f"`{res['meta']['command']}`: {size}; CLIP `{res['meta']['backbone']}` / "
            f"`{res['meta']['pretrained']}`" + (f" (weights sha256 {sha}...)" if sha else "") +
            f"; {res['meta']['seconds']:.0f} s with {res['meta']['threads']} torch thread(s) on a shared machine.", ""]


def verdict(better: float, spread: float) -> str:
    """'yes' / 'no' for an effect of size ``better`` (> 0 = in the claimed direction), 'within the spread' when
    its size is below ``spread`` (the larger std of the two rows compared)."""
    if abs(better) <= spread:
        return "within the spread (no)" if better <= 0 else "within the spread"
    return "yes" if better > 0 else "no"
