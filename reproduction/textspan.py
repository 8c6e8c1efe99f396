"""Part textspan (Gandelsman et al.): the `mean_ablation` suite's accumulated-layer curve over world data seeds, and
the spurious-correlation world (a Waterbirds analogue: TEXTSPAN finds the colour heads, mean-ablating them)."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xclip.reproduction.common import build_backbone, header, mean_std, ms


@dataclass
class TextspanSettings:
    """Part textspan (mean-ablation): the mean_ablation suite on world objects."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n: int = 1000
    """world objects per seed"""
    spurious: bool = True
    """also the spurious-correlation world (colour correlated with the class in the probe's training data)"""
    spurious_classes: list[str] = field(default_factory=lambda: ["star", "flower"])
    spurious_colours: list[str] = field(default_factory=lambda: ["green", "purple"])
    """the spurious property: class i is drawn in colour i with probability spurious_aligned in training"""
    spurious_aligned: float = 0.99
    spurious_n: int = 400
    """probe-training and test objects (test: colour independent of the class) per seed"""
    spurious_heads: int = 2
    """heads mean-ablated: those whose TEXTSPAN texts explain most variance with colour texts"""
    texts_per_head: int = 5


# --quick: test sizes (seconds), for the fields left at their defaults (cli.part_settings)
QUICK: dict[str, Any] = {"seeds": [0, 1], "n": 40, "spurious_n": 40}


def check(s: TextspanSettings) -> None:
    """The spurious world's settings name 2 different world classes / colours, aligned in [0.5, 1]."""
    from xclip.datamodules.synthetic_world import COLOURS, SHAPES

    if not 0.5 <= s.spurious_aligned <= 1:
        raise SystemExit("--textspan.spurious_aligned must be in [0.5, 1]")
    for flag, given, known in (("spurious_classes", s.spurious_classes, SHAPES),
                               ("spurious_colours", s.spurious_colours, list(COLOURS))):
        if len(given) != 2 or len(set(given)) != 2 or any(g not in known for g in given):
            raise SystemExit(f"--textspan.{flag} must be 2 different world names of {list(known)}, got {given}")


def run(args, s: TextspanSettings, out: Path) -> dict:
    """The mean_ablation suite per world data seed (accumulated-layer curve, MLP / CLS ablations), then the
    spurious-correlation world."""
    from xclip.evaluation import mean_ablation
    from xclip.evaluation.common import EvalModel

    model = EvalModel(build_backbone(args))
    L = len(model.backbone.model.visual.transformer.resblocks)
    keep = sorted({k for k in (1, 2, 3, 4) if k < L} or {1})
    per_seed = []
    for seed in s.seeds:
        r = mean_ablation.run(model, mean_ablation.Settings(data=f"world:{s.n}:{seed}", keep_last=keep))
        r.pop("tables", None)
        per_seed.append(r)
    curve = [mean_std([100.0 * r["accumulated_layers"][i] for r in per_seed])
             for i in range(len(per_seed[0]["accumulated_layers"]))]
    scalars = {k: mean_std([100.0 * r[k] for r in per_seed]) for k, v in per_seed[0].items()
               if isinstance(v, float)}
    res = {"settings": asdict(s), "layers": L, "keep_last": keep, "per_seed": per_seed,
           "accumulated_layers": curve, **scalars}
    if s.spurious:
        res["spurious"] = run_spurious_world(model.backbone, s)
    return res


SPURIOUS_POOL_KINDS = ("colour", "shape", "other")


def spurious_text_pool() -> tuple[list[str], list[str]]:
    """TEXTSPAN's text pool for the world: (texts, kind of each: colour / shape / other)."""
    from xclip.datamodules.synthetic_world import COLOURS, SHAPES

    texts, kinds = [], []
    for c in COLOURS:
        for t in (c, f"a {c} object", f"something {c}", f"the colour {c}"):
            texts.append(t)
            kinds.append("colour")
    for sh in SHAPES:
        for t in (f"a {sh}", f"a {sh} shape"):
            texts.append(t)
            kinds.append("shape")
    for t in ("stripes", "a gradient", "dots", "noise", "a big object", "a small object", "on the left",
              "on the right", "at the top", "at the bottom"):
        texts.append(t)
        kinds.append("other")
    return texts, kinds


def run_spurious_world(backbone, s: TextspanSettings) -> dict:
    """Waterbirds on the world (TextSpan A6.1): a linear probe trained on objects whose colour follows the class
    (s.spurious_aligned of the time), tested on objects whose colour does not; TEXTSPAN (on general world objects)
    labels the heads whose top texts explain most variance with colour texts; those heads are mean-ablated
    (analysis.spurious.spurious_report: base, heads ablated, best of 5 random head sets of the same size)."""
    import torch
    import torch.nn.functional as F

    from xclip.analysis.decomposition import decompose_images
    from xclip.analysis.spurious import spurious_report
    from xclip.analysis.textspan import encode_text_pool, run_textspan_heads
    from xclip.datamodules.synthetic_world import COLOURS, SHAPES, render_object, to_tensor

    classes, colours = list(s.spurious_classes), list(s.spurious_colours)   # checked by check_inputs
    visual = backbone.model.visual

    def split(n: int, aligned: float, seed: int):
        rng = random.Random(seed)
        ims, y, g = [], [], []
        for i in range(n):
            c = i % 2
            col = c if rng.random() < aligned else 1 - c
            img, _ = render_object(classes[c], colours[col], rng, image_size=backbone.image_size)
            ims.append(to_tensor(img))
            y.append(c)
            g.append(2 * c + col)
        return torch.stack(ims), torch.tensor(y), torch.tensor(g)

    def decompose(x: torch.Tensor):
        hs, ms = [], []
        for i in range(0, len(x), 128):
            d = decompose_images(visual, x[i:i + 128].to(backbone.device))
            hs.append(d.heads.float().cpu())
            ms.append(d.mlps.float().cpu())
        return torch.cat(hs), torch.cat(ms)                                   # [K, L, H, D], [K, L+1, D]

    group_names = [f"{classes[g // 2]}/{colours[g % 2]}" for g in range(4)]
    pool, kinds = spurious_text_pool()
    texts = encode_text_pool(backbone, pool)                                  # [M, D]
    per_seed = []
    for seed in s.seeds:
        rng = random.Random(10_000 + seed)
        general = torch.stack([to_tensor(render_object(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng,
                                                       image_size=backbone.image_size)[0])
                               for _ in range(s.spurious_n)])
        heads_g, _ = decompose(general)
        L, H = heads_g.shape[1], heads_g.shape[2]
        spans = run_textspan_heads(heads_g, texts, pool, range(L), m=s.texts_per_head, rank=None, progress=False)
        share = {(r["layer"], r["head"]): sum(v for i, v in zip(r["indices"], r["stds"]) if kinds[i] == "colour")
                 / max(sum(r["stds"]), 1e-12) for r in spans.values()}
        colour_heads = sorted(share, key=lambda h: -share[h])[:s.spurious_heads]
        xtr, ytr, _ = split(s.spurious_n, s.spurious_aligned, 2 * seed)
        xte, yte, gte = split(s.spurious_n, 0.5, 2 * seed + 1)
        htr, mtr = decompose(xtr)
        hte, mte = decompose(xte)
        emb = htr.sum((1, 2)) + mtr.sum(1)                                    # [K, D] = the unit-norm embedding
        torch.manual_seed(seed)
        W = torch.zeros(emb.shape[1], 2, requires_grad=True)                 # the probe [D, 2], no bias
        opt = torch.optim.Adam([W], lr=0.05)
        for _ in range(300):
            loss = F.cross_entropy(10 * emb @ W, ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rep = spurious_report(hte, mte, W.detach(), yte, gte, colour_heads, group_names, keep_last=None,
                              ablate_mlps=False, random_trials=5, seed=seed)
        per_seed.append({"colour_heads": [list(h) for h in colour_heads],
                         "colour_share": {f"L{h[0]}.H{h[1]}": v for h, v in share.items()},
                         "head_texts": {k: r["texts"] for k, r in spans.items()},
                         "base": rep["base"], "heads_ablated": rep["heads_ablated"],
                         "random_heads_best": rep.get("random_heads_best")})
    agg = {}
    for key in ("base", "heads_ablated", "random_heads_best"):
        runs = [r[key] for r in per_seed if r[key]]
        if runs:
            agg[key] = {"worst_group": mean_std([100.0 * r["worst_group"] for r in runs]),
                        "mean_group": mean_std([100.0 * r["mean_group"] for r in runs]),
                        "groups": {g: mean_std([100.0 * r["groups"][g] for r in runs]) for g in runs[0]["groups"]}}
    return {"classes": classes, "colours": colours, "aligned": s.spurious_aligned, "heads_total": L * H,
            "per_seed": per_seed, **agg}


def report(res: dict) -> list[str]:
    """The section of reproduction.md: the curve, the ablations and the spurious world, next to textspan_zerocap.md."""
    s = res["settings"]
    lines = header("TextSpan: mean-ablation of attention layers", res)
    lines += [f"`mean_ablation` suite on {s['n']} world objects per seed, seeds {s['seeds']} (mean ± std, %).", "",
              "| attention layers mean-ablated (from the first) | " + " | ".join(
                  str(i) for i in range(len(res["accumulated_layers"]))) + " |",
              "|---|" + "---|" * len(res["accumulated_layers"]),
              "| zero-shot accuracy | " + " | ".join(ms(v) for v in res["accumulated_layers"]) + " |", "",
              "| ablation | accuracy | paper (textspan_zerocap.md A4) |", "|---|---|---|",
              f"| none | {ms(res.get('baseline'))} | ViT-L-14 75.25 |",
              f"| all MLPs | {ms(res.get('mlps_ablated'))} | costs 1-3 points |",
              f"| CLS->CLS terms | {ms(res.get('cls_ablated'))} | costs 1-3 points |"]
    for k in res["keep_last"]:
        lines.append(f"| all attention layers but the last {k} | {ms(res.get(f'all_but_last_{k}'))} | "
                     f"{'almost unchanged (last 4 kept)' if k >= 4 else 'collapses (ablating into the last 4)'} |")
    sp = res.get("spurious")
    if not sp:
        lines += ["", "The spurious-correlation world was not run (`--textspan.spurious false`)."]
        return lines
    a, b = sp["colours"], sp["classes"]
    lines += ["", f"**Spurious-correlation world** (Waterbirds analogue, A6.1): a linear probe on the CLIP embedding "
              f"is trained on {res['settings']['spurious_n']} objects where {b[0]} is {a[0]} and {b[1]} is {a[1]} "
              f"{100 * sp['aligned']:.0f} % of the time, and tested on objects of independent colour (4 groups "
              f"shape/colour). TEXTSPAN ({res['settings']['texts_per_head']} texts per head, on general world "
              f"objects) ranks the {sp['heads_total']} heads by the variance share of colour texts; the top "
              f"{res['settings']['spurious_heads']} are mean-ablated. Colour, not background texture: the world's "
              "renderer draws the background at random (datamodules/synthetic_world.py), colour is a parameter.",
              "", "| | worst group | mean of groups | paper, Waterbirds worst group (A6.1) |", "|---|---|---|---|"]
    paper = {"base": "ViT-B-16 45.6, L-14 47.7, H-14 37.2", "heads_ablated": "57.5, 72.9, 43.3",
             "random_heads_best": "'top-random' baseline, average UNVERIFIED"}
    labels = {"base": "probe, nothing ablated", "heads_ablated": "colour heads (TEXTSPAN) mean-ablated",
              "random_heads_best": "best of 5 random head sets of the same size"}
    for key, label in labels.items():
        if key in sp:
            lines.append(f"| {label} | {ms(sp[key]['worst_group'])} | {ms(sp[key]['mean_group'])} | {paper[key]} |")
    heads = [", ".join(f"L{h[0]}.H{h[1]}" for h in r["colour_heads"]) for r in sp["per_seed"]]
    lines += ["", f"Colour heads found per seed: {'; '.join(heads)}."]
    if "heads_ablated" in sp and "base" in sp:
        d = sp["heads_ablated"]["worst_group"]["mean"] - sp["base"]["worst_group"]["mean"]
        rnd = sp.get("random_heads_best", {}).get("worst_group", {}).get("mean")
        verdict = ("reproduces the paper's direction" if d > 0 and (rnd is None or
                   sp["heads_ablated"]["worst_group"]["mean"] > rnd) else "does not reproduce the paper's effect")
        lines.append(f"Worst group {d:+.1f} points with the colour heads ablated"
                     + (f" (best random head set: {rnd - sp['base']['worst_group']['mean']:+.1f})" if rnd is not None
                        else "") + f": the world {verdict}.")
    return lines


def figure(ax, res: dict) -> None:
    """Zero-shot accuracy against the number of attention layers mean-ablated from the first."""
    curve = res["accumulated_layers"]
    ax.errorbar(range(len(curve)), [c["mean"] for c in curve], yerr=[c["std"] for c in curve], marker="o",
                capsize=2, color="#1f77b4")
    ax.set_xticks(range(len(curve)))
    ax.set_xlabel("attention layers mean-ablated (from the first)", fontsize=8)
    ax.set_ylabel("zero-shot accuracy (%)", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title("TextSpan mean-ablation", fontsize=9)
