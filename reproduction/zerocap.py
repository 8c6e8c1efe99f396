"""Part zerocap (Tewel et al.): guided vs unguided CLIP-S and visual arithmetic over colour/shape triples, with the
world's tiny local GPT-2 (generation/world_lm.py: the world has no real LM)."""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xclip.reproduction.common import aggregate, build_backbone, header, ms


@dataclass
class ZerocapSettings:
    """Part zerocap: guided vs unguided CLIP-S, visual arithmetic triples (world LM: generation/world_lm.py)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_images: int = 20
    """captioned world objects per seed"""
    n_triples: int = 20
    """arithmetic triples per seed"""
    lm_steps: int = 600
    """AdamW steps of the world LM (the ZeroCap tests use 60; 600 gives fluent 'a {colour} {shape}.' beams)"""
    beam_size: int = 3
    target_seq_length: int = 4
    top_size: int = 64
    stepsize: float = 1.0
    """the world LM needs a larger step than gpt2-medium's 0.3 (docs/zerocap.md)"""


# --quick: test sizes (seconds), for the fields left at their defaults (cli.part_settings)
QUICK: dict[str, Any] = {"seeds": [0, 1], "n_images": 2, "n_triples": 2, "lm_steps": 5, "beam_size": 2,
                         "target_seq_length": 2, "top_size": 8}


def check(s: ZerocapSettings) -> None:
    """Nothing beyond the sizes every part's settings are checked for (reproduction.cli.check_inputs)."""


def run(args, s: ZerocapSettings, out: Path) -> dict:
    """Guided and unguided captions of world objects (CLIP-S, does the caption name the shape / colour), then
    visual arithmetic over colour/shape triples, per seed."""
    import torch

    from xclip.datamodules.synthetic_world import COLOURS, SHAPES, render_object, to_tensor
    from xclip.generation.world_lm import world_lm
    from xclip.generation.zerocap import ZeroCap, ZeroCapConfig, clip_s

    clip = build_backbone(args)
    lm, tok = world_lm(steps=s.lm_steps)
    kw = dict(beam_size=s.beam_size, target_seq_length=s.target_seq_length, top_size=s.top_size,
              stepsize=s.stepsize)
    guided = ZeroCap(clip, lm, tok, ZeroCapConfig(**kw))
    plain = ZeroCap(clip, lm, tok, ZeroCapConfig(num_iterations=0, **kw))
    arith = ZeroCap(clip, lm, tok, ZeroCapConfig.for_task("arithmetic", **kw))
    colours = list(COLOURS)
    prompts = [(c, sh) for c in colours for sh in SHAPES]
    with torch.no_grad():
        prompt_feats = clip.encode_text(clip.tokenize([f"a {c} {sh}." for c, sh in prompts]))   # [C*S, D]

    def obj(shape: str, colour: str, rng: random.Random) -> torch.Tensor:
        img, _ = render_object(shape, colour, rng, image_size=clip.image_size)
        return to_tensor(img)

    def names(text: str, word: str) -> bool:
        return word in text.lower().replace(".", " ").split()

    per_seed, examples = [], []
    t0 = time.time()
    for seed in s.seeds:
        rng = random.Random(seed)
        objs = [(rng.choice(SHAPES), rng.choice(colours)) for _ in range(s.n_images)]
        images = torch.stack([obj(sh, c, rng) for sh, c in objs])
        caps = {"guided": [], "unguided": []}
        for img in images:
            for key, zc in (("guided", guided), ("unguided", plain)):
                torch.manual_seed(seed)
                caps[key].append(zc.cfg.cond_text + zc.caption(zc.image_target(img[None]))[0].text)
        row = {f"clip_s_{k}": float(clip_s(clip, images, v).mean()) for k, v in caps.items()}
        for key in caps:
            row[f"names_shape_{key}"] = 100.0 * sum(names(t, sh) for t, (sh, _) in zip(caps[key], objs)) / len(objs)
            row[f"names_colour_{key}"] = 100.0 * sum(names(t, c) for t, (_, c) in zip(caps[key], objs)) / len(objs)
        hits = {"both": 0, "shape": 0, "colour": 0, "retrieval": 0}
        for _ in range(s.n_triples):
            s1, s2 = rng.sample(SHAPES, 2)
            c1, c2 = rng.sample(colours, 2)
            # e.g. red star, red circle, blue circle -> a blue star
            trip = torch.stack([obj(s1, c1, rng), obj(s2, c1, rng), obj(s2, c2, rng)])
            target = arith.arithmetic_target(trip, [1, -1, 1])                        # -> a blue star
            torch.manual_seed(seed)
            text = arith.cfg.cond_text + arith.caption(target)[0].text
            hits["both"] += names(text, s1) and names(text, c2)
            hits["shape"] += names(text, s1)
            hits["colour"] += names(text, c2)
            nearest = prompts[int((prompt_feats @ target.to(prompt_feats)).argmax())]
            hits["retrieval"] += nearest == (c2, s1)
            if len(examples) < 8:
                examples.append({"images": [f"{c1} {s1}", f"{c1} {s2}", f"{c2} {s2}"], "weights": [1, -1, 1],
                                 "want": f"{c2} {s1}", "caption": text, "nearest_prompt": " ".join(nearest)})
        for k, v in hits.items():
            row[f"arith_{k}"] = 100.0 * v / s.n_triples
        row["captions"] = {k: v[:4] for k, v in caps.items()}
        per_seed.append(row)
    agg = aggregate([{k: v for k, v in r.items() if k != "captions"} for r in per_seed])
    return {"settings": asdict(s), "lm": "generation/world_lm.py: 2-layer GPT-2 (64 wide, 400-token BPE) trained "
            f"{s.lm_steps} steps on world captions (the ZeroCap tests' LM, which they train 60 steps); the world "
            "has no real LM offline",
            "chance_arith_retrieval": 100.0 / len(prompts), "per_seed": per_seed, "examples": examples,
            "seconds_captioning": time.time() - t0, **agg}


def report(res: dict) -> list[str]:
    """The section of reproduction.md: CLIP-S and arithmetic counts, next to textspan_zerocap.md B5 / B8."""
    s = res["settings"]
    lines = header("ZeroCap: CLIP-guided captioning and visual arithmetic", res)
    lines += [f"LM: {res['lm']}. CLIP-S = 2.5 max(cos, 0) of the world CLIP; {s['n_images']} objects and "
              f"{s['n_triples']} triples per seed, seeds {s['seeds']} (mean ± std); beam {s['beam_size']}, "
              f"{s['target_seq_length']} tokens, top {s['top_size']}, step {s['stepsize']}.", "",
              "| | unguided (LM beam search, beams re-ranked by CLIP) | CLIP-guided | paper (textspan_zerocap.md B8) |",
              "|---|---|---|---|",
              f"| CLIP-S | {ms(res.get('clip_s_unguided'), 3)} | {ms(res.get('clip_s_guided'), 3)} | ZeroCap 0.87 "
              "on COCO (UNVERIFIED) |",
              f"| caption names the shape (%) | {ms(res.get('names_shape_unguided'))} | "
              f"{ms(res.get('names_shape_guided'))} | - |",
              f"| caption names the colour (%) | {ms(res.get('names_colour_unguided'))} | "
              f"{ms(res.get('names_colour_guided'))} | - |", "",
              "Visual arithmetic image(c1 s1) - image(c1 s2) + image(c2 s2), want 'c2 s1' (paper: woman + king - man "
              "-> queen, qualitative; its benchmark numbers UNVERIFIED, B5):", "",
              "| count over triples (%) | value |", "|---|---|",
              f"| caption names c2 and s1 | {ms(res.get('arith_both'))} |",
              f"| caption names s1 | {ms(res.get('arith_shape'))} |",
              f"| caption names c2 | {ms(res.get('arith_colour'))} |",
              f"| nearest of the {round(100 / res['chance_arith_retrieval'])} 'a {{colour}} {{shape}}.' prompts is "
              f"'c2 s1' (no LM; chance {res['chance_arith_retrieval']:.1f}) | {ms(res.get('arith_retrieval'))} |"]
    if res.get("examples"):
        e = res["examples"][0]
        lines += ["", f"Example: {e['images'][0]} - {e['images'][1]} + {e['images'][2]} -> \"{e['caption']}\" "
                  f"(nearest prompt: {e['nearest_prompt']}; wanted {e['want']})."]
    return lines


def figure(ax, res: dict) -> None:
    """Bars: CLIP-S unguided / guided and the arithmetic hit rates."""
    bars = [("clip_s_unguided", "CLIP-S\nunguided", 1.0), ("clip_s_guided", "CLIP-S\nguided", 1.0),
            ("arith_both", "arithmetic:\nnames c2 s1", 0.01), ("arith_retrieval", "arithmetic:\nnearest prompt", 0.01)]
    present = [(k, lab, f) for k, lab, f in bars if k in res]
    ax.bar(range(len(present)), [res[k]["mean"] * f for k, _, f in present],
           yerr=[res[k]["std"] * f for k, _, f in present], capsize=2,
           color=["#999999", "#d62728", "#9467bd", "#8c564b"][:len(present)])
    ax.set_xticks(range(len(present)), [lab for _, lab, _ in present], fontsize=7)
    ax.set_ylabel("CLIP-S / fraction of triples", fontsize=8)
    ax.set_title("ZeroCap (world LM)", fontsize=9)
