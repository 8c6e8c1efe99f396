"""Evaluate a checkpoint or a pretrained backbone on named suites; writes JSON (+ W&B tables).

    python evaluate.py --ckpt runs/forget/checkpoints/last.ckpt --suite typographic --out results.json
    python evaluate.py --backbone ViT-B-32 --pretrained openai --suite retrieval --suite ocr_iiit5k
    python evaluate.py --backbone tiny-vit-world --pretrained synthetic-world --projection W.ckpt --suite typographic

Suites are the modules of ``evaluation/`` (see evaluation/common.py for the protocol); `--help` lists them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import sys
import time
from pathlib import Path
from types import ModuleType

from xclip.utils.threads import configure_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("evaluate")


def discover_suites() -> dict[str, ModuleType]:
    """Every module in evaluation/ that defines NAME and run()."""
    from xclip import evaluation

    suites = {}
    for info in sorted(pkgutil.iter_modules(evaluation.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        mod = importlib.import_module(f"xclip.evaluation.{info.name}")
        if hasattr(mod, "run") and hasattr(mod, "NAME"):
            suites[mod.NAME] = mod
    return suites


def build_parser(suites: dict[str, ModuleType]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a checkpoint or pretrained CLIP on named suites.",
        epilog="suites: " + "; ".join(f"{n}: {getattr(m, 'HELP', '')}" for n, m in suites.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", help="checkpoint written by train.py (rebuilds the method and its backbone), or CoOp's "
                                    "prompt_learner/model.pth.tar-N with --backbone/--pretrained")
    src.add_argument("--backbone", default=None, help="open_clip model name (e.g. ViT-B-32, tiny-vit-world)")
    src.add_argument("--pretrained", default=None, help="open_clip tag, local weights file, or shipped tag")
    src.add_argument("--projection", default=None,
                     help="spelling-projection checkpoint whose W is applied to every embedding")
    p.add_argument("--suite", action="append", default=[], metavar="NAME", help="suite to run (repeatable)")
    p.add_argument("--out", default="results.json", help="JSON results file")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", action="store_true", help="log results and tables to W&B (offline without a key)")
    p.add_argument("--wandb_project", default="xclip-eval")
    for name, mod in suites.items():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p.add_argument_group(f"suite {name}"))
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_eval_model(args):
    """Build the EvalModel from --ckpt or --backbone/--pretrained (+ --projection)."""
    from xclip.evaluation.common import EvalModel
    from xclip.models.clip_backbone import build_clip

    method = None
    if args.ckpt:
        from xclip.lightning_modules.base import load_method_checkpoint
        from xclip.models.prompt_learner import is_dassl_prompt_checkpoint

        if is_dassl_prompt_checkpoint(args.ckpt):  # CoOp's own prompt_learner/model.pth.tar-N (+ --backbone)
            from xclip.lightning_modules.coop import load_coop_prompt_checkpoint

            method = load_coop_prompt_checkpoint(args.ckpt, args.backbone, args.pretrained, map_location=args.device)
        else:
            method = load_method_checkpoint(args.ckpt, map_location=args.device)
        backbone = method.backbone
    elif args.backbone:
        backbone = build_clip(args.backbone, args.pretrained, device=args.device)
    else:
        raise SystemExit("evaluate.py: give --ckpt PATH or --backbone NAME [--pretrained TAG]")
    projection = None
    if args.projection:
        from xclip.lightning_modules.spelling import load_projection

        projection = load_projection(args.projection, expected_backbone=backbone.spec(), expected_dim=backbone.embed_dim)
    elif method is not None and hasattr(method, "projection_matrix"):
        projection = method.projection_matrix().detach()
        method = None
    return EvalModel(backbone, projection=projection, method=method).to(args.device)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # utils/threads.py: never more torch threads than free cores
    suites = discover_suites()
    args = build_parser(suites).parse_args(argv)
    if not args.suite:
        raise SystemExit(f"evaluate.py: name at least one --suite; valid suites: {', '.join(suites)}")
    unknown = [s for s in args.suite if s not in suites]
    if unknown:
        raise SystemExit(f"evaluate.py: unknown suite(s) {', '.join(unknown)}; valid suites: {', '.join(suites)}")
    import torch

    from xclip.utils.io import atomic_write_json

    torch.manual_seed(args.seed)
    model = load_eval_model(args)
    results: dict = {"model": {"ckpt": args.ckpt, **model.backbone.spec(),
                               "projection": args.projection}, "suites": {}}
    for name in args.suite:
        t0 = time.time()
        log.info("running suite %s", name)
        res = suites[name].run(model, args)
        res["seconds"] = round(time.time() - t0, 2)
        results["suites"][name] = res
        log.info("%s: %s", name, {k: v for k, v in res.items() if isinstance(v, (int, float))})
    tables = {f"{s}/{t}": tab for s, r in results["suites"].items() for t, tab in r.pop("tables", {}).items()}
    atomic_write_json(results, args.out)
    log.info("wrote %s", args.out)
    if args.wandb:
        _log_wandb(results, tables, args)
    return results


def _log_wandb(results: dict, tables: dict, args) -> None:
    import wandb

    from xclip.utils.wandb_setup import ensure_wandb_mode

    ensure_wandb_mode()
    run = wandb.init(project=args.wandb_project, config=results["model"], job_type="eval",
                     dir=str(Path(args.out).resolve().parent))
    try:
        flat = {f"{s}/{k}": v for s, r in results["suites"].items() for k, v in r.items()
                if isinstance(v, (int, float))}
        run.log(flat)
        for key, tab in tables.items():
            run.log({key: wandb.Table(columns=tab["columns"], data=tab["data"])})
    finally:
        run.finish()


if __name__ == "__main__":
    main()
