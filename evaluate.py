"""Evaluate a checkpoint or a pretrained backbone on named suites; writes JSON (+ W&B tables).

    xclip evaluate --config configs/evaluate/world.yaml
    xclip evaluate --ckpt runs/forget/checkpoints/last.ckpt --suite typographic --out results.json
    xclip evaluate --backbone ViT-B-32 --pretrained openai --suite retrieval ocr_iiit5k --ocr_iiit5k.root /data/IIIT5K
    xclip evaluate --config configs/evaluate/typographic_vitb32.yaml --projection W.ckpt --print_config

One grammar (jsonargparse): ``--config a.yaml`` (repeatable; later files and flags override earlier ones),
``--print_config``, and each suite's settings as the nested group ``--<suite>.<setting>`` (``--retrieval.n 200``,
``--text_in_image.dir gen/``), all snake_case. ``--suite`` takes one or more names (``--suite a b``; repeating the
flag adds to the list). The suites are the modules in ``SUITES`` (protocol in evaluation/common.py).

Before any work: the output file, the model files and every selected suite's inputs and tools are checked. Each
suite's result is written to the JSON (atomically) as soon as it finishes; a suite that fails is recorded with its
error, the others still run, and the command exits non-zero naming it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from xclip.evaluation import (
    detection_ap,
    mean_ablation,
    ocr_iiit5k,
    retrieval,
    saliency_prf,
    spatial_generation,
    text_in_image,
    typographic,
    world,
    zeroshot,
)
from xclip.utils.threads import configure_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("evaluate")

SUITES: tuple[ModuleType, ...] = (world, retrieval, ocr_iiit5k, typographic, text_in_image, saliency_prf,
                                  detection_ap, spatial_generation, mean_ablation, zeroshot)
SUITE_TABLE: dict[str, ModuleType] = {m.NAME: m for m in SUITES}
SuiteName = Literal[tuple(SUITE_TABLE)]  # type: ignore[valid-type]


def run_suite(name: str, model, seed: int = 0, out_dir: str | Path = ".", **settings) -> dict:
    """One evaluation suite from Python (what ``xclip evaluate --suite NAME`` runs), e.g.
    ``xclip.run_suite("world", xclip.build_clip("tiny-vit-world", "synthetic-world"), n=200)``.

    ``model``: a ``ClipBackbone``, a trained method (CoOp, SpellingProjection, ...: anything with ``.backbone``)
    or an ``EvalModel``; ``settings``: the fields of that suite's ``Settings`` dataclass (``--NAME.field``)."""
    import torch

    from xclip.evaluation.common import EvalModel, RunContext
    from xclip.models.clip_backbone import ClipBackbone

    if name not in SUITE_TABLE:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITE_TABLE)}")
    suite = SUITE_TABLE[name]
    if not isinstance(model, EvalModel):
        model = EvalModel(model) if isinstance(model, ClipBackbone) else EvalModel(model.backbone, method=model)
    cfg, ctx = suite.Settings(**settings), RunContext(seed=seed, out_dir=Path(out_dir))
    if hasattr(suite, "check"):
        suite.check(cfg, ctx)
    torch.manual_seed(seed)
    return suite.run(model.eval(), cfg, ctx)


def build_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)   # the settings' field docstrings -> --help
    p = ArgumentParser(prog="xclip evaluate", description="Evaluate a checkpoint or pretrained CLIP on named suites.",
                       epilog="suites: " + "; ".join(f"{m.NAME}: {m.HELP}" for m in SUITES))
    p.add_argument("--config", action=ActionConfigFile, help="YAML config (repeatable), e.g. configs/evaluate/*.yaml")
    p.add_argument("--ckpt", type=str | None, default=None,
                   help="checkpoint written by train (rebuilds the method and its backbone), or CoOp's "
                        "prompt_learner/model.pth.tar-N with --backbone/--pretrained")
    p.add_argument("--backbone", type=str | None, default=None,
                   help="open_clip model name (e.g. ViT-B-32, tiny-vit-world)")
    p.add_argument("--pretrained", type=str | None, default=None,
                   help="open_clip tag, local weights file, or shipped tag")
    p.add_argument("--projection", type=str | None, default=None,
                   help="spelling-projection checkpoint whose W is applied to every embedding")
    p.add_argument("--suite", type=SuiteName, nargs="+", default=[], help="suites to run, in order")
    p.add_argument("--out", type=str, default="results.json", help="JSON results file (rewritten after each suite)")
    p.add_argument("--device", type=str | None, default=None, help="cpu / cuda[:i] (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", type=bool, default=False,
                   help="log results and tables to W&B (offline without a key)")
    p.add_argument("--wandb_project", type=str, default="xclip-eval")
    for m in SUITES:
        p.add_class_arguments(m.Settings, m.NAME, help=f"suite {m.NAME}: {m.HELP}")
    return p


def merge_repeated(argv: list[str], flag: str = "--suite") -> list[str]:
    """``--suite a --suite b c`` -> ``--suite a b c`` (argparse would keep only the last)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        elif argv[i].startswith(flag + "="):
            values.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


def _device(cfg: Namespace) -> str:
    import torch

    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_run(cfg: Namespace, settings: dict, ctx) -> Path:
    """Everything that can be checked before the model is built: output, model files, each suite's inputs/tools.
    Raises SystemExit listing every problem (nothing has run)."""
    from xclip.utils.io import check_writable_file

    problems = []
    try:
        out = check_writable_file(cfg.out, "--out")
    except ValueError as e:
        problems.append(str(e))
        out = Path(cfg.out)
    if not (cfg.ckpt or cfg.backbone):
        problems.append("give --ckpt PATH or --backbone NAME [--pretrained TAG]")
    for flag, path in (("--ckpt", cfg.ckpt), ("--projection", cfg.projection)):
        if path and not Path(path).expanduser().is_file():
            problems.append(f"{flag} {path}: no such file")
    for name, s in settings.items():
        check = getattr(SUITE_TABLE[name], "check", None)
        if check is None:
            continue
        try:
            check(s, ctx)
        except (ValueError, OSError, RuntimeError) as e:
            problems.append(f"suite {name}: {e}")
    if problems:
        raise SystemExit("evaluate: nothing was run; fix first:\n  - " + "\n  - ".join(problems))
    return out


def load_eval_model(cfg: Namespace, device: str):
    """Build the EvalModel from --ckpt or --backbone/--pretrained (+ --projection)."""
    from xclip.evaluation.common import EvalModel
    from xclip.models.clip_backbone import build_clip

    method = None
    if cfg.ckpt:
        from xclip.lightning_modules.base import load_method_checkpoint
        from xclip.models.prompt_learner import is_dassl_prompt_checkpoint

        if is_dassl_prompt_checkpoint(cfg.ckpt):  # CoOp's own prompt_learner/model.pth.tar-N (+ --backbone)
            from xclip.lightning_modules.coop import load_coop_prompt_checkpoint

            method = load_coop_prompt_checkpoint(cfg.ckpt, cfg.backbone, cfg.pretrained, map_location=device)
        else:
            method = load_method_checkpoint(cfg.ckpt, map_location=device)
        backbone = method.backbone
    else:
        backbone = build_clip(cfg.backbone, cfg.pretrained, device=device)
    projection = None
    if cfg.projection:
        from xclip.lightning_modules.spelling import load_projection

        projection = load_projection(cfg.projection, expected_backbone=backbone.spec(), expected_dim=backbone.embed_dim)
    elif method is not None and hasattr(method, "projection_matrix"):
        projection = method.projection_matrix().detach()
        method = None
    return EvalModel(backbone, projection=projection, method=method).to(device)


def main(argv: list[str] | None = None) -> dict:
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # utils/threads.py: never more torch threads than free cores
    from xclip.utils.io import check_config_files

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    check_config_files(argv)  # a bad --config file is named before jsonargparse reads it
    cfg = parser.parse_args(merge_repeated(argv))
    if not cfg.suite:
        raise SystemExit(f"evaluate: name at least one suite (--suite NAME [NAME ...]); valid suites: "
                         f"{', '.join(SUITE_TABLE)}")
    import torch

    from xclip.evaluation.common import RunContext
    from xclip.utils.io import atomic_write_json

    init = parser.instantiate(cfg)
    settings = {name: init[name] for name in dict.fromkeys(cfg.suite)}
    ctx = RunContext(seed=cfg.seed, out_dir=Path(cfg.out).expanduser().parent)
    out = check_run(cfg, settings, ctx)
    torch.manual_seed(cfg.seed)
    device = _device(cfg)
    model = load_eval_model(cfg, device)
    results: dict = {"model": {"ckpt": cfg.ckpt, **model.backbone.spec(), "projection": cfg.projection},
                     "suites": {}}
    tables, failed = {}, {}
    for name, s in settings.items():
        t0 = time.time()
        log.info("running suite %s", name)
        try:
            res = SUITE_TABLE[name].run(model, s, ctx)
        except Exception as e:  # one suite's failure never discards the others: recorded, the rest still run
            log.exception("suite %s failed", name)
            res = {"error": f"{type(e).__name__}: {e}"}
            failed[name] = res["error"]
        res["seconds"] = round(time.time() - t0, 2)
        tables.update({f"{name}/{t}": tab for t, tab in res.pop("tables", {}).items()})
        results["suites"][name] = res
        atomic_write_json(results, out)
        log.info("%s: %s (written to %s)", name, {k: v for k, v in res.items() if isinstance(v, (int, float))}, out)
    if cfg.wandb:
        _log_wandb(results, tables, cfg, out)
    if failed:
        raise SystemExit("evaluate: suite(s) failed: " + "; ".join(f"{n}: {e}" for n, e in failed.items())
                         + f". The results of the other suites are in {out}.")
    return results


def _log_wandb(results: dict, tables: dict, cfg: Namespace, out: Path) -> None:
    import wandb

    from xclip.utils.wandb_setup import ensure_wandb_mode

    ensure_wandb_mode()
    run = wandb.init(project=cfg.wandb_project, config=results["model"], job_type="eval",
                     dir=str(out.resolve().parent))
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
