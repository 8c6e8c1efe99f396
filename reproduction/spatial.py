"""Part spatial (NTLB VQGAN-CLIP spatial conditioning): the `spatial_generation` suite (textual, similarity,
similarity2, explainability): relevance mass in the box and Otsu precision / recall / F1, over seeds."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xclip.reproduction.common import aggregate, build_backbone, header, ms


@dataclass
class SpatialSettings:
    """Part spatial (NTLB VQGAN-CLIP spatial conditioning): the spatial_generation suite."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 100
    cutn: int = 8
    size: int = 64
    limit: int | None = None
    """use only the first N of the suite's built-in layouts (64 px boxes: size must stay 64)"""


# --quick: test sizes (seconds), for the fields left at their defaults (cli.part_settings)
QUICK: dict[str, Any] = {"seeds": [0, 1], "steps": 2, "cutn": 2, "limit": 1}


def check(s: SpatialSettings) -> None:
    """Nothing beyond the sizes every part's settings are checked for (reproduction.cli.check_inputs)."""


def run(args, s: SpatialSettings, out: Path) -> dict:
    """The spatial_generation suite once per seed (images under <out>/spatial/seed<S>/); per-method mean +- std."""
    from xclip.evaluation import spatial_generation as sg
    from xclip.evaluation.common import EvalModel, RunContext

    model = EvalModel(build_backbone(args))
    per_seed = []
    for seed in s.seeds:
        d = out / "spatial" / f"seed{seed}"
        r = sg.run(model, sg.Settings(steps=s.steps, cutn=s.cutn, size=s.size, limit=s.limit, out=str(d)),
                   RunContext(seed=seed, out_dir=d))
        r.pop("tables", None)
        per_seed.append(r)
    methods = list(per_seed[0]["methods"])
    return {"settings": asdict(s), "per_seed": per_seed, "n_layouts": per_seed[0]["n_layouts"],
            "methods": {m: aggregate([r["methods"][m] for r in per_seed]) for m in methods}}


def report(res: dict) -> list[str]:
    """The section of reproduction.md: one row per method, next to ntlb_coop.md §4.4."""
    s = res["settings"]
    lines = header("NTLB: spatial conditioning of VQGAN-CLIP", res)
    lines += [f"`spatial_generation` suite: {res['n_layouts']} built-in world layouts, {s['size']} px, {s['steps']} "
              f"steps, cutn {s['cutn']}, random tiny VQGAN, seeds {s['seeds']} (mean ± std). Relevance: last-layer "
              "CLIP relevance of each box's prompt on the generated image, Otsu-binarised against the box.", "",
              "| method | mass in box | precision | recall | F1 |", "|---|---|---|---|---|"]
    labels = {"textual": "textual", "similarity": "similarity-based", "similarity2": "similarity-based 2",
              "explainability": "explainability loss"}
    for m, v in res["methods"].items():
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(ms(v.get(k), 3) for k in
                                                           ("mass_in_box", "precision", "recall", "f1")) + " |")
    if "explainability" in res["methods"] and len(res["methods"]) > 1:
        keys = ("mass_in_box", "precision", "recall", "f1")
        best = [k for k in keys if all(res["methods"]["explainability"][k]["mean"] >= v[k]["mean"]
                                       for v in res["methods"].values())]
        lines += ["", f"The explainability loss is best on {len(best)} of 4 metrics ({', '.join(best) or 'none'})."]
    lines += ["", "Paper (ntlb_coop.md §4.4): the explainability loss beats the baselines on precision / recall / F1 "
              "and AP / AR; all cells UNVERIFIED (no evaluation code in the anchor). AP needs a COCO DETR: not run."]
    return lines


def figure(ax, res: dict) -> None:
    """Bars: mass in box / precision / recall / F1 per method, std error bars."""
    methods = list(res["methods"])
    keys = [("mass_in_box", "mass in box"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1")]
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [res["methods"][m][k]["mean"] for k, _ in keys], width,
               yerr=[res["methods"][m][k]["std"] for k, _ in keys], label=m, capsize=2)
    ax.set_xticks(range(len(keys)), [lab for _, lab in keys], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("NTLB spatial VQGAN-CLIP", fontsize=9)
    ax.legend(fontsize=6)
