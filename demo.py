"""`make demo`: forget-to-spell on the built-in synthetic world, end to end on a CPU in a few minutes.

    python demo.py --out outputs/demo                       # shipped tiny CLIP (checkpoints/tiny_clip_world.pt)
    python demo.py --out /tmp/d --pretrained none --fast    # random tiny-vit-world, tiny settings (smoke run)

1. builds quintuples (x_i, y_i, x_t, y_t, x_it) from the world (objects, with real/nonsense words written on them),
   caches their frozen-CLIP features (outputs/demo/cache);
2. trains a forget-to-spell projection W (losses L1, L2, L6; Materzynska et al. 2022) through the same
   LightningModule / Trainer path as `train.py fit --config configs/spelling/forget_to_spell_world.yaml`, logging
   to W&B (offline without a key);
3. evaluates zero-shot shape classification on clean objects and on the same objects with a WRONG shape name
   written on them (the world's typographic split), before and after W, plus word reading on the validation
   quintuples; prints a table, writes results.json, a figure (results.png) and the checkpoint of W.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (results.json, results.png, W checkpoint)")
    p.add_argument("--backbone", default="tiny-vit-world")
    p.add_argument("--pretrained", default="synthetic-world",
                   help="'synthetic-world' = the shipped tiny CLIP; a weights file; 'none' = random init")
    p.add_argument("--preset", default="forget_to_spell", help="loss preset (losses/contrastive.py PRESETS)")
    p.add_argument("--k", type=int, default=64, help="projection dim (the world's CLIP has d=128)")
    p.add_argument("--n-train", type=int, default=2000, help="training quintuples")
    p.add_argument("--n-val", type=int, default=400, help="validation quintuples")
    p.add_argument("--n-attack", type=int, default=400, help="objects in the typographic split (clean + attacked)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3,
                   help="Adam lr (paper 1e-4 over ~10k steps/epoch; the demo has ~16 steps/epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reg", type=float, default=0.0, help="gamma of ||I - W W^T||_F")
    p.add_argument("--scale", type=float, default=10.0,
                   help="InfoNCE logit scale (paper/code: 1; 1 loses clean accuracy on the 20-class world)")
    p.add_argument("--paper-negatives", action="store_true",
                   help="keep same-class samples as negatives in L2/L6 (the released code; harmful with 20 classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wandb", action="store_true", help="CSV logger instead of W&B (offline)")
    p.add_argument("--fast", action="store_true", help="tiny settings for a smoke run (~seconds of training)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 is fastest for these tiny matmuls on a busy CPU)")
    args = p.parse_args(argv)
    if args.fast:
        args.n_train, args.n_val, args.n_attack, args.epochs = 256, 128, 60, 3
    return args


def make_logger(args, out: Path):
    if args.no_wandb:
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name="logs")
    from pytorch_lightning.loggers import WandbLogger

    from xclip.utils.wandb_setup import ensure_wandb_mode

    ensure_wandb_mode()
    return WandbLogger(project="spelling-demo", save_dir=str(out), name=f"{args.preset}-k{args.k}",
                       config=vars(args))


def world_datamodule(args, out: Path):
    from xclip.datamodules.feature_cache import SpellingFeatureDataModule

    return SpellingFeatureDataModule(
        source="synthetic-world", n_train=args.n_train, n_val=args.n_val, seed=args.seed, canvas_size=64,
        real_fraction=0.5, word_list="world", word_template="the word {}.", font_size=20,
        cache_dir=str(out / "cache"), batch_size=args.batch_size, encode_batch_size=128, progress=True)


def typographic_eval(backbone, W, n: int, seed: int = 1234) -> dict:
    """Zero-shot shape accuracy (%) on clean / attacked world objects, raw CLIP vs projected by W."""
    import torch

    from xclip.datamodules.feature_cache import encode_pils
    from xclip.datamodules.synthetic_world import class_prompts, typographic_split
    from xclip.lightning_modules.spelling import apply_projection
    from xclip.models.zero_shot import prompt_classifier

    split = typographic_split(n=n, seed=seed, image_size=backbone.image_size)
    prompts = [class_prompts(c) for c in split.classnames]
    feats = {"clean": encode_pils(backbone, split.clean), "attacked": encode_pils(backbone, split.attacked)}
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


def make_figure(res: dict, typo: dict, path: Path, n_examples: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, split, preds = typo["metrics"], typo["split"], typo["preds"]
    fig = plt.figure(figsize=(12, 6.5))
    ax = fig.add_axes([0.06, 0.45, 0.42, 0.48])
    groups = ["clean", "attacked"]
    xs = range(len(groups))
    ax.bar([x - 0.2 for x in xs], [m[f"clip/{g}_acc"] for g in groups], 0.4, label="CLIP", color="#999999")
    ax.bar([x + 0.2 for x in xs], [m[f"projected/{g}_acc"] for g in groups], 0.4, label="forget-to-spell",
           color="#d62728")
    ax.set_xticks(list(xs), ["clean objects", "wrong word written on"])
    ax.set_ylabel("zero-shot shape accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("Typographic attack on the synthetic world")
    ax2 = fig.add_axes([0.56, 0.45, 0.4, 0.48])
    wr = [res["val_clip"].get("im_it_txt_t/real/img2txt", 0), res["val_projected"].get("im_it_txt_t/real/img2txt", 0)]
    ax2.bar(["CLIP", "forget-to-spell"], wr, color=["#999999", "#d62728"])
    ax2.set_ylim(0, 100)
    ax2.set_title("reading the written word (x_it -> y_t top-1 %)")
    names = split.classnames
    for j in range(n_examples):
        i = j * max(1, len(split.labels) // n_examples)
        axi = fig.add_axes([0.04 + j * 0.24, 0.02, 0.2, 0.33])
        axi.imshow(split.attacked[i])
        axi.axis("off")
        axi.set_title(f"true {names[split.labels[i]]}, text '{split.attack_words[i]}'\n"
                      f"CLIP: {names[preds[('clip', 'attacked')][i]]} | W: {names[preds[('projected', 'attacked')][i]]}",
                      fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    for key, label in (("im_it_txt_t/real/img2txt", "word reading x_it->y_t (real)"),
                       ("im_it_txt_t/fake/img2txt", "word reading x_it->y_t (nonsense)"),
                       ("acc_im_it_txt_i", "val quintuples: x_it top-1")):
        rows.append((label, res["val_clip"][key], res["val_projected"][key]))
    for label, a, b in rows:
        t.add_row(label, f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}")
    Console().print(t)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import pytorch_lightning as pl
    import torch

    from xclip.lightning_modules.spelling import SpellingProjection, evaluate_features
    from xclip.utils.io import AtomicCheckpointIO, atomic_write_json

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pl.seed_everything(args.seed, verbose=False)
    pretrained = None if str(args.pretrained).lower() in ("none", "") else args.pretrained
    module = SpellingProjection(args.backbone, pretrained, k=args.k, preset=args.preset, reg=args.reg, lr=args.lr,
                                scale=args.scale, class_aware_negatives=not args.paper_negatives)
    dm = world_datamodule(args, out)
    logger = make_logger(args, out)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger,
                         default_root_dir=str(out), enable_checkpointing=False, num_sanity_val_steps=0,
                         log_every_n_steps=5, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                         check_val_every_n_epoch=max(1, args.epochs // 5))
    try:
        trainer.fit(module, dm)
        ckpt = out / f"{args.preset}.ckpt"
        trainer.save_checkpoint(ckpt)
        W = module.projection_matrix().detach().cpu()
        backbone = module.backbone
        t_train = time.time() - t0
        res = {"backbone": backbone.spec(), "args": vars(args), "checkpoint": str(ckpt),
               "val_clip": evaluate_features(dm.val_features, None),
               "val_projected": evaluate_features(dm.val_features, W)}
        typo = typographic_eval(backbone, W, args.n_attack)
        res["typographic"] = typo["metrics"]
        m = res["typographic"]
        res["summary"] = {
            "clean_before": m["clip/clean_acc"], "clean_after": m["projected/clean_acc"],
            "attacked_before": m["clip/attacked_acc"], "attacked_after": m["projected/attacked_acc"],
            "attacked_gain": m["projected/attacked_acc"] - m["clip/attacked_acc"],
            "clean_drop": m["clip/clean_acc"] - m["projected/clean_acc"],
            "seconds_train": round(t_train, 1), "seconds_total": round(time.time() - t0, 1)}
        for lg in trainer.loggers:
            lg.log_metrics({f"demo/{k}": v for k, v in res["summary"].items()})
        atomic_write_json(res, out / "results.json")
        make_figure(res, typo, out / "results.png")
        print_table(res)
        print(f"wrote {out / 'results.json'}, {out / 'results.png'}, {ckpt} "
              f"({res['summary']['seconds_total']:.0f} s)")
    finally:
        if not args.no_wandb:
            import wandb

            wandb.finish()
    return res


if __name__ == "__main__":
    main()
