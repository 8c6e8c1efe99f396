"""`make demo` / `xclip demo`: forget-to-spell on the built-in synthetic world, end to end on a CPU in a few minutes.

    xclip demo --out outputs/demo                               # shipped tiny CLIP (checkpoints/tiny_clip_world.pt)
    xclip demo --out /tmp/d --pretrained none --fast true --wandb false   # random tiny-vit-world, tiny settings (smoke)
    xclip demo --config configs/demo/smoke.yaml --out /tmp/d    # the same smoke run as a config
    xclip demo --print_config                                   # the demo's settings (re-readable with --config)

1. trains the packaged config configs/spelling/forget_to_spell_world.yaml through the same LightningCLI path as
   `xclip train fit --config configs/spelling/forget_to_spell_world.yaml` (losses L1, L2, L6; Materzynska et al.
   2022), with the demo's overrides (output folder, cache folder, logger, and the knobs below), logging to W&B
   (offline without a key);
2. evaluates zero-shot shape classification on clean objects and on the same objects with a WRONG shape name
   written on them (the world's typographic split), before and after W, plus word reading on the validation
   quintuples; prints a table, writes results.json, a figure (results.png) and the checkpoint of W into --out.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from xclip.utils.threads import configure_threads
from xclip.utils.wandb_setup import log_images

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("demo")

TRAIN_CONFIG = "spelling/forget_to_spell_world.yaml"   # under the package's configs/
FAST = {"n_train": 256, "n_val": 128, "n_attack": 60, "epochs": 3}


def package_configs() -> Path:
    """The configs/ folder shipped inside the installed package (found from any working directory)."""
    import xclip

    return Path(xclip.__file__).resolve().parent / "configs"


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from xclip.generate import HelpFormatter

    p = ArgumentParser(prog="xclip demo", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", action=ActionConfigFile, help="YAML of these settings (repeatable)")
    p.add_argument("--out", type=str, default="outputs/demo",
                   help="output folder (results.json, results.png, W checkpoint, cache, logs)")
    p.add_argument("--train_config", type=str | None, default=None,
                   help=f"the LightningCLI config trained (default: the package's configs/{TRAIN_CONFIG})")
    p.add_argument("--pretrained", type=str | None, default=None,
                   help="override model.init_args.pretrained: a weights file, or 'none' = random init "
                        "(default: the config's, the shipped tiny CLIP)")
    p.add_argument("--preset", type=str | None, default=None,
                   help="override model.init_args.preset (losses/contrastive.py PRESETS, e.g. forget_to_spell_signed)")
    p.add_argument("--n_train", type=int | None, default=None, help="override data.init_args.n_train")
    p.add_argument("--n_val", type=int | None, default=None, help="override data.init_args.n_val")
    p.add_argument("--epochs", type=int | None, default=None, help="override trainer.max_epochs")
    p.add_argument("--n_attack", type=int | None, default=None,
                   help="objects in the typographic split (clean + attacked); default 400")
    p.add_argument("--fast", type=bool, default=False,
                   help=f"smoke-run sizes {FAST} for every knob not given explicitly")
    p.add_argument("--wandb", type=bool, default=True, help="log to W&B (offline without a key); false: CSV logs")
    p.add_argument("--train_overrides", type=list[str], default=[],
                   help='further `xclip train` overrides, e.g. ["--model.init_args.k=32"]')
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 is fastest for these tiny matmuls on a busy CPU)")
    return p


def parse_args(argv: list[str] | None = None):
    return build_parser().parse_args(argv)


def _knob(args, name: str, default=None):
    v = args[name]
    if v is None and args.fast and name in FAST:
        return FAST[name]
    return default if v is None else v


def train_config_path(args) -> Path:
    return Path(args.train_config) if args.train_config else package_configs() / TRAIN_CONFIG


def train_argv(args) -> list[str]:
    """The `xclip train` command line the demo runs: the config plus the demo's overrides."""
    out = Path(args.out)
    argv = ["fit", "--config", str(train_config_path(args)), f"--trainer.default_root_dir={out}",
            f"--data.init_args.cache_dir={out / 'cache'}"]
    if args.wandb:
        argv.append(f"--trainer.logger.init_args.save_dir={out}")
    else:
        argv.append("--trainer.logger=" + json.dumps({"class_path": "pytorch_lightning.loggers.CSVLogger",
                                                      "init_args": {"save_dir": str(out), "name": "logs"}}))
    if args.pretrained is not None:
        none = str(args.pretrained).lower() in ("none", "null", "")
        argv.append(f"--model.init_args.pretrained={'null' if none else args.pretrained}")
    for name, key in (("preset", "model.init_args.preset"), ("n_train", "data.init_args.n_train"),
                      ("n_val", "data.init_args.n_val"), ("epochs", "trainer.max_epochs")):
        v = _knob(args, name)
        if v is not None:
            argv.append(f"--{key}={v}")
    return argv + list(args.train_overrides)


def check_inputs(args) -> None:
    """The train config, the knobs and the output folder, before anything is built."""
    from xclip.generation._cli import check_file, check_out_dir

    check_file(train_config_path(args), "--train_config", "LightningCLI config")
    for name in ("n_train", "n_val", "epochs", "n_attack", "threads"):
        if args[name] is not None and args[name] < 1:
            raise SystemExit(f"--{name} must be >= 1, got {args[name]}")
    check_out_dir(args.out)


def typographic_eval(backbone, W, n: int, seed: int = 1234) -> dict:
    """Zero-shot shape accuracy (%) on clean / attacked world objects, raw CLIP vs projected by W."""
    import torch

    from xclip.datamodules.synthetic_world import class_prompts, typographic_split
    from xclip.lightning_modules.spelling import apply_projection
    from xclip.models.zero_shot import prompt_classifier

    split = typographic_split(n=n, seed=seed, image_size=backbone.image_size)
    prompts = [class_prompts(c) for c in split.classnames]
    feats = {"clean": backbone.encode_pil(split.clean), "attacked": backbone.encode_pil(split.attacked)}
    labels = torch.tensor(split.labels)
    words = [split.classnames.index(w) for w in split.attack_words]
    out, preds = {}, {}
    for name, w in (("clip", None), ("projected", W)):
        cls = prompt_classifier(backbone, prompts, lambda e: apply_projection(e, w)).float().cpu()   # [C, k]
        for kind, f in feats.items():
            pred = (apply_projection(f, w) @ cls.t()).argmax(1)
            out[f"{name}/{kind}_acc"] = 100.0 * (pred == labels).float().mean().item()
            if kind == "attacked":   # how often the written word wins
                out[f"{name}/attack_success"] = 100.0 * (pred == torch.tensor(words)).float().mean().item()
            preds[(name, kind)] = pred
    return {"metrics": out, "split": split, "preds": preds}


# Bars of the reading panel: (label, metric of evaluate_features) on the validation quintuples.
READING_BARS: tuple[tuple[str, str], ...] = (
    ("word image\nreal", "im_t_txt_t/real/img2txt"), ("word image\nnonsense", "im_t_txt_t/fake/img2txt"),
    ("word on object\nreal", "im_it_txt_t/real/img2txt"), ("word on object\nnonsense", "im_it_txt_t/fake/img2txt"))
COLOURS = {"clip": "#999999", "projected": "#d62728"}


def _bar_pair(ax, labels: list[str], before: list[float], after: list[float], ylabel: str, title: str,
              after_label: str) -> dict:
    """Grouped before/after bars with each value written on its bar (so near-zero bars stay readable)."""
    xs = list(range(len(labels)))
    bars = {}
    for off, name, vals, lab in ((-0.2, "clip", before, "CLIP"), (0.2, "projected", after, after_label)):
        rects = ax.bar([x + off for x in xs], vals, 0.4, label=lab, color=COLOURS[name])
        ax.bar_label(rects, labels=[f"{v:.1f}" for v in vals], padding=2, fontsize=7)
        bars[name] = dict(zip(labels, vals))
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return {"title": title, "bars": bars}


def pick_examples(typo: dict, n: int) -> list[int]:
    """Attacked objects to show: up to half of them ones that W fixes (CLIP wrong, W right), the rest spread over
    the split."""
    labels = typo["split"].labels
    before, after = typo["preds"][("clip", "attacked")], typo["preds"][("projected", "attacked")]
    fixed = [i for i in range(len(labels)) if after[i] == labels[i] and before[i] != labels[i]][:max(1, n // 2)]
    rest = [i for i in range(len(labels)) if i not in fixed]
    step = max(1, len(rest) // max(1, n - len(fixed)))
    return sorted(fixed + rest[::step][:n - len(fixed)])


def make_figure(res: dict, typo: dict, path: Path, n_examples: int = 4, after_label: str = "forget-to-spell") -> dict:
    """The demo figure: accuracy and attack success before/after W, word reading before/after, labelled examples.

    Returns what was drawn ({"panels": [{"title", "bars": {before/after: {label: value}}}], "examples": [...]})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, split, preds = typo["metrics"], typo["split"], typo["preds"]
    fig = plt.figure(figsize=(13, 7.5))
    drawn: dict = {"panels": [], "examples": []}
    ax = fig.add_axes([0.05, 0.50, 0.26, 0.42])
    drawn["panels"].append(_bar_pair(
        ax, ["clean objects", "wrong word\nwritten on"], [m["clip/clean_acc"], m["clip/attacked_acc"]],
        [m["projected/clean_acc"], m["projected/attacked_acc"]], "zero-shot shape accuracy (%)",
        "Typographic attack: shape accuracy", after_label))
    ax = fig.add_axes([0.37, 0.50, 0.14, 0.42])
    drawn["panels"].append(_bar_pair(
        ax, ["attacked\nobjects"], [m["clip/attack_success"]], [m["projected/attack_success"]],
        "prediction = the written class (%)", "Attack success", after_label))
    ax = fig.add_axes([0.57, 0.50, 0.41, 0.42])
    labels = [lab for lab, _ in READING_BARS]
    drawn["panels"].append(_bar_pair(
        ax, labels, [res["val_clip"].get(k, 0.0) for _, k in READING_BARS],
        [res["val_projected"].get(k, 0.0) for _, k in READING_BARS], "image -> its word string, top-1 (%)",
        "Reading the written word (validation quintuples)", after_label))
    names = split.classnames
    for j, i in enumerate(pick_examples(typo, n_examples)):
        axi = fig.add_axes([0.03 + j * 0.245, 0.03, 0.2, 0.34])
        axi.imshow(split.attacked[i])
        axi.set_xticks([])
        axi.set_yticks([])
        true, word = names[split.labels[i]], split.attack_words[i]
        before, after = names[preds[("clip", "attacked")][i]], names[preds[("projected", "attacked")][i]]
        axi.set_title(f"true: {true} | written: '{word}'", fontsize=8)
        for spine in axi.spines.values():
            spine.set_edgecolor("#2ca02c" if after == true else "#d62728")
            spine.set_linewidth(2)
        axi.set_xlabel(f"CLIP: {before} ({'ok' if before == true else 'wrong'})  ->  "
                       f"W: {after} ({'ok' if after == true else 'wrong'})", fontsize=8)
        drawn["examples"].append({"index": i, "true": true, "written": word, "before": before, "after": after})
    fig.suptitle(f"{after_label} on the synthetic world ({res['backbone']['name']}/{res['backbone']['pretrained']})",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = res["typographic"]
    t = Table(title=f"forget-to-spell on the synthetic world ({res['backbone']['name']}/{res['backbone']['pretrained']})")
    t.add_column("metric")
    t.add_column("CLIP", justify="right")
    t.add_column("forget-to-spell", justify="right")
    t.add_column("change", justify="right")
    rows = [("clean shape accuracy", m["clip/clean_acc"], m["projected/clean_acc"]),
            ("attacked shape accuracy", m["clip/attacked_acc"], m["projected/attacked_acc"]),
            ("attack success (word wins)", m["clip/attack_success"], m["projected/attack_success"])]
    for key, label in (("im_t_txt_t/real/img2txt", "word reading x_t->y_t (real)"),
                       ("im_t_txt_t/fake/img2txt", "word reading x_t->y_t (nonsense)"),
                       ("im_it_txt_t/real/img2txt", "word reading x_it->y_t (real)"),
                       ("im_it_txt_t/fake/img2txt", "word reading x_it->y_t (nonsense)"),
                       ("acc_im_it_txt_i", "val quintuples: x_it top-1")):
        rows.append((label, res["val_clip"][key], res["val_projected"][key]))
    for label, a, b in rows:
        t.add_row(label, f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}")
    Console().print(t)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # utils/threads.py: never more torch threads than free cores
    args = parse_args(argv)
    check_inputs(args)
    import torch

    from xclip import train
    from xclip.generation._cli import write_json
    from xclip.lightning_modules.spelling import evaluate_features

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    t0 = time.time()
    argv_train = train_argv(args)
    log.info("training: xclip train %s", " ".join(argv_train))
    try:
        cli = train.main(argv_train)                       # the same LightningCLI path as `xclip train fit`
        module, dm, trainer = cli.model, cli.datamodule, cli.trainer
        ckpt = out / f"{module.hparams.preset}.ckpt"
        trainer.save_checkpoint(ckpt)
        W = module.projection_matrix().detach().cpu()
        backbone = module.backbone
        t_train = time.time() - t0
        res = {"backbone": backbone.spec(), "args": args.as_dict(), "train_argv": argv_train, "checkpoint": str(ckpt),
               "val_clip": evaluate_features(dm.val_features, None),
               "val_projected": evaluate_features(dm.val_features, W)}
        typo = typographic_eval(backbone, W, _knob(args, "n_attack", 400))
        res["typographic"] = typo["metrics"]
        m = res["typographic"]
        res["summary"] = {
            "clean_before": m["clip/clean_acc"], "clean_after": m["projected/clean_acc"],
            "attacked_before": m["clip/attacked_acc"], "attacked_after": m["projected/attacked_acc"],
            "attacked_gain": m["projected/attacked_acc"] - m["clip/attacked_acc"],
            "clean_drop": m["clip/clean_acc"] - m["projected/clean_acc"],
            "attack_success_before": m["clip/attack_success"], "attack_success_after": m["projected/attack_success"],
            "seconds_train": round(t_train, 1), "seconds_total": round(time.time() - t0, 1)}
        for lg in trainer.loggers:
            lg.log_metrics({f"demo/{k}": v for k, v in res["summary"].items()})
        res["figure"] = make_figure(res, typo, out / "results.png")
        write_json(res, out / "results.json")
        log_images(trainer.loggers, "demo/results", [out / "results.png"], captions=["CLIP vs CLIP + W (demo figure)"])
        print_table(res)
        print(f"wrote {out / 'results.json'}, {out / 'results.png'}, {ckpt} "
              f"({res['summary']['seconds_total']:.0f} s)")
    finally:
        if args.wandb:
            import wandb

            wandb.finish()
    return res


if __name__ == "__main__":
    main()
