"""`make reproduce` / `xclip reproduce`: each paper's headline effect, measured on the built-in world (issue 18 §2).

    xclip reproduce --out results/reproduce                        # every part (<= 60 min on 2 cores)
    xclip reproduce --parts textspan spatial --out /tmp/r          # some parts; the report covers every part in --out
    xclip reproduce --quick true --out /tmp/r                      # test sizes (seconds per part)
    xclip reproduce --pretrained runs/world/tiny_clip_world.pt     # another world CLIP (default: the shipped file)
    xclip reproduce --config configs/reproduce/world.yaml --print_config

Parts (each runs the project's own methods through their public functions / CLI code paths; one module each in
xclip/reproduction/):
- spelling (Materzynska et al.): learn- vs forget-to-spell vs CLIP, with and without R(W), a bottleneck-k sweep;
  W trained on the features cached by the packaged world config (configs/spelling/forget_to_spell_world.yaml),
  scored by the `world` evaluation suite and the spelling validation metrics; seeds -> mean +- std.
- coop (NTLB): CoOp vs CoOp + explainability loss, 1/2/4/8 shots x seeds, through `xclip train fit` with
  configs/coop/world.yaml on a rendered world image folder; test accuracy mean +- std.
- spatial (NTLB VQGAN-CLIP): the `spatial_generation` suite (textual, similarity, similarity2, explainability):
  relevance mass in the box and Otsu precision / recall / F1, over seeds.
- textspan (Gandelsman et al.): the `mean_ablation` suite's accumulated-layer curve, over world data seeds.
- zerocap (Tewel et al.): guided vs unguided CLIP-S and visual arithmetic over colour/shape triples, with the
  world's tiny local GPT-2 (generation/world_lm.py: the world has no real LM).

Each part writes ``<out>/<part>.json`` (atomically) as soon as it finishes, then ``<out>/reproduction.md`` is
rebuilt from every part JSON in ``<out>``, each number next to the paper's (shared/reference specs).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, fields
from pathlib import Path

from xclip.reproduction.common import build_backbone, pretrained_arg
from xclip.reproduction.parts import MODULES, PARTS, QUICK, SETTINGS, Part
from xclip.reproduction.report import write_report
from xclip.utils.threads import configure_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("reproduce")


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from xclip.generate import HelpFormatter

    p = ArgumentParser(prog="xclip reproduce", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", action=ActionConfigFile, help="YAML of these settings (repeatable)")
    p.add_argument("--parts", type=Part, default=list(PARTS), nargs="+", help="parts to run, in this order")
    p.add_argument("--out", type=str, default="results/reproduce",
                   help="output folder: <part>.json, reproduction.md, caches and run folders")
    p.add_argument("--backbone", type=str, default="tiny-vit-world", help="open_clip model name of the world CLIP")
    p.add_argument("--pretrained", type=str | None, default="synthetic-world",
                   help="the CLIP weights: 'synthetic-world' (the shipped checkpoints/tiny_clip_world.pt), a "
                        "weights file, or 'none' (random init, tests)")
    p.add_argument("--quick", type=bool, default=False, help=f"test sizes: {QUICK}")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    for name, cls in SETTINGS.items():
        p.add_class_arguments(cls, name)
    return p


def parse_args(argv: list[str] | None = None):
    return build_parser().parse_args(argv)


def part_settings(args, name: str):
    """The part's settings dataclass, with --quick sizes for every field left at its default."""
    cls = SETTINGS[name]
    given = dict(args[name]) if args[name] is not None else {}
    default = cls()
    values = {}
    for f in fields(cls):
        v = given.get(f.name, getattr(default, f.name))
        if args.quick and f.name in QUICK[name] and v == getattr(default, f.name):
            v = QUICK[name][f.name]
        values[f.name] = v
    return cls(**values)


def check_inputs(args) -> None:
    """Everything a part needs, before any part starts: output folder, config files, the weights file, sizes."""
    from xclip.generation._cli import check_file, check_out_dir

    check_out_dir(args.out)
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    pre = pretrained_arg(args)
    if pre is not None and (os.sep in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        check_file(pre, "--pretrained", "CLIP weights file")
    for name in args.parts:
        s = part_settings(args, name)
        for f in fields(s):
            v = getattr(s, f.name)
            vals = v if isinstance(v, list) else [v]
            if f.name not in ("seeds", "limit") and \
                    any(isinstance(x, int) and not isinstance(x, bool) and x < 1 for x in vals):
                raise SystemExit(f"--{name}.{f.name} must be >= 1, got {v}")
            if isinstance(v, list) and not v:
                raise SystemExit(f"--{name}.{f.name} must not be empty")
    for name in args.parts:
        MODULES[name].check(part_settings(args, name))


def weights_fingerprint(args) -> str | None:
    """sha256 (first 12 hex digits) of the CLIP weights file used, so a report names the exact weights."""
    import hashlib

    from xclip.models.clip_backbone import SHIPPED_WEIGHTS

    pre = pretrained_arg(args)
    if pre is None:
        return None
    path = SHIPPED_WEIGHTS.get((args.backbone, pre), Path(pre))
    if not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def write_part(out: Path, name: str, result: dict) -> Path:
    from xclip.generation._cli import write_json

    path = out / f"{name}.json"
    write_json(result, path)
    return path


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()
    args = parse_args(argv)
    check_inputs(args)
    import torch

    from xclip.models.clip_backbone import BackboneError

    torch.set_num_threads(max(1, args.threads))
    try:
        build_backbone(args)                  # the CLIP loads (name, weights) before any part starts
    except BackboneError as e:
        raise SystemExit(f"error: --backbone {args.backbone} --pretrained {args.pretrained}: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.parts:
        s = part_settings(args, name)
        log.info("reproduce: part %s (%s)", name, asdict(s))
        t0 = time.time()
        res = MODULES[name].run(args, s, out)
        res["meta"] = {"part": name, "seconds": round(time.time() - t0, 1), "quick": bool(args.quick),
                       "backbone": args.backbone, "pretrained": args.pretrained, "threads": args.threads,
                       "weights_sha256": weights_fingerprint(args),
                       "command": f"xclip reproduce --parts {name}" + (" --quick true" if args.quick else "")}
        write_part(out, name, res)
        write_report(out)
        log.info("reproduce: %s done in %.0f s -> %s", name, res["meta"]["seconds"], out / f"{name}.json")
        results[name] = res
    print(f"wrote {write_report(out)}")
    return results

