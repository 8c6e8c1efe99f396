"""Part coop (NTLB: CoOp + explainability loss): CoOp vs CoOp + the loss, shots x seeds, through `xclip train fit`
with configs/coop/world.yaml on a rendered world image folder (classes = the 20 shapes); test accuracy mean +- std."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xclip.reproduction.common import (
    aggregate,
    build_backbone,
    header,
    mean_std,
    ms,
    package_configs,
    pretrained_arg,
    verdict,
)

log = logging.getLogger("reproduce")
CONFIG = "coop/world.yaml"   # under the package's configs/


@dataclass
class CoopSettings:
    """Part coop (NTLB: CoOp + explainability loss)."""
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    expl_weight: float = 1.0
    """lambda of the explainability loss (the configs' placeholder; the paper's value is UNVERIFIED)"""
    epochs: int = 50
    n_test: int = 20
    """test images per class (20 world shapes)"""
    train_config: str | None = None
    """LightningCLI config (default: configs/coop/world.yaml)"""


# --quick: test sizes (seconds), for the fields left at their defaults (cli.part_settings)
QUICK: dict[str, Any] = {"shots": [1, 2], "seeds": [1, 2], "epochs": 2, "n_test": 2}


def check(s: CoopSettings) -> None:
    """The LightningCLI config exists (before any part starts)."""
    from xclip.generation._cli import check_file

    check_file(s.train_config or package_configs() / CONFIG, "--coop.train_config", "LightningCLI config")


def make_world_folder(root: Path, n_train: int, n_test: int, image_size: int, seed: int = 0) -> Path:
    """ROOT/{train,test}/<shape>/<i>.png: world objects of random colours (classes = the 20 shapes)."""
    from xclip.datamodules.synthetic_world import COLOURS, SHAPES, render_object

    rng = random.Random(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / f"{i:03d}.png"
                img, _ = render_object(shape, rng.choice(list(COLOURS)), rng, image_size=image_size)
                if not path.is_file():
                    img.save(path)
    return root


def gt_classname_score(module, images, labels) -> float:
    """Mean share of the EOT text relevance on the true class's name tokens (the score S[b, y_b] that the NTLB loss
    raises), on test images: losses.explainability.classname_scores of the learned prompts."""
    import torch

    from xclip.losses.explainability import classname_scores
    from xclip.models.relevance import text_relevance_from_embeddings

    pl = module.prompt_learner
    with torch.no_grad():
        embeds, eot = pl()
        feats = module.image_features(images)
    rel, _ = text_relevance_from_embeddings(module.backbone, feats, embeds.detach(), eot)
    return float(classname_scores(rel.detach(), eot, pl.name_mask).gather(1, labels[:, None]).mean())


def run(args, s: CoopSettings, out: Path) -> dict:
    """For every (shots, seed): `xclip train fit --config configs/coop/world.yaml` with expl_weight 0 and lambda,
    then the trainer's test loop on the world test folder (test/acc)."""
    import torch

    from xclip import train
    from xclip.datamodules.synthetic_world import SHAPES
    from xclip.evaluation.world import TEMPLATES
    from xclip.models.zero_shot import zero_shot_classifier

    cfg = Path(s.train_config) if s.train_config else package_configs() / CONFIG
    pre = pretrained_arg(args)
    backbone = build_backbone(args)
    size = backbone.image_size
    n_train = max(s.shots) + 4
    root = make_world_folder(out / "data" / f"coop_world_{size}px_{n_train}train_{s.n_test}test", n_train,
                             s.n_test, size)
    res: dict[str, Any] = {"train_config": str(cfg), "settings": asdict(s), "data": str(root), "runs": [],
                           "table": {}}

    def fit_test(shots: int, seed: int, ew: float) -> dict[str, float]:
        argv = ["fit", "--config", str(cfg), f"--model.init_args.backbone={args.backbone}",
                f"--model.init_args.pretrained={'null' if pre is None else pre}",
                f"--model.init_args.expl_weight={ew}", f"--data.init_args.dataset=imagefolder:{root}",
                f"--data.init_args.shots={shots}", f"--data.init_args.seed={seed}", f"--seed_everything={seed}",
                f"--data.init_args.image_size={size}", f"--data.init_args.data_dir={out / 'data'}",
                f"--trainer.max_epochs={s.epochs}",
                f"--trainer.default_root_dir={out / 'runs' / 'coop' / f'{shots}shot_seed{seed}_ew{ew}'}"]
        t0 = time.time()
        cli = train.main(argv)
        t_fit = time.time() - t0
        (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        test = cli.datamodule.test_set
        idx = list(range(0, len(test), max(1, len(test) // 100)))[:100]     # <= 100 test images, all classes
        xt = torch.stack([test[i][0] for i in idx])
        yt = torch.tensor([test[i][1] for i in idx])
        return {"test_acc": 100.0 * float(metrics["test/acc"]), "seconds_fit": t_fit,
                "gt_classname_score": gt_classname_score(cli.model, xt, yt)}

    # zero-shot baselines on the same test images (one template, the world's prompt ensemble)
    from xclip.datamodules.fewshot import FewShotDataModule

    dm = FewShotDataModule(f"imagefolder:{root}", shots=1, data_dir=str(out / "data"), image_size=size,
                           num_workers=0)
    dm.setup("test")
    xs, ys = zip(*[(x, y) for x, y in dm.test_dataloader()])
    with torch.no_grad():
        feats = backbone.encode_image(torch.cat(xs).to(backbone.device))
    labels = torch.cat(ys)
    names = list(dm.classnames)
    assert sorted(names) == sorted(SHAPES), names
    for key, templates in (("single_template", ["a photo of a {}."]), ("world_ensemble", list(TEMPLATES))):
        cls = zero_shot_classifier(backbone, names, templates)
        res[f"zero_shot_{key}"] = 100.0 * float(((feats @ cls.t()).argmax(-1).cpu() == labels).float().mean())
    for shots in s.shots:
        row = {}
        for method, ew in (("coop", 0.0), ("coop_expl", s.expl_weight)):
            runs = []
            for seed in s.seeds:
                r = {"shots": shots, "seed": seed, "method": method, "expl_weight": ew, **fit_test(shots, seed, ew)}
                res["runs"].append(r)
                runs.append(r)
            agg = aggregate([{k: r[k] for k in ("test_acc", "gt_classname_score")} for r in runs])
            row[method] = agg["test_acc"]
            row[f"{method}_score"] = agg["gt_classname_score"]
        row["gain"] = mean_std([b["test_acc"] - a["test_acc"] for a, b in zip(
            [r for r in res["runs"] if r["shots"] == shots and r["method"] == "coop"],
            [r for r in res["runs"] if r["shots"] == shots and r["method"] == "coop_expl"])])
        res["table"][str(shots)] = row
        log.info("coop %d shots: %.1f vs %.1f", shots, row["coop"]["mean"], row["coop_expl"]["mean"])
    return res


def report(res: dict) -> list[str]:
    """The section of reproduction.md: test accuracy per shot count, CoOp vs + loss, next to ntlb_coop.md §3.6."""
    s = res["settings"]
    lines = header("NTLB: CoOp vs CoOp + explainability loss", res)
    lines += [f"20 world shapes, {s['n_test']} test images per class, `{Path(res['train_config']).name}` "
              f"({s['epochs']} epochs), lambda = {s['expl_weight']}, seeds {s['seeds']} (the few-shot picks and the "
              f"context initialisation; mean ± std). Zero-shot on "
              f"the same test images: 'a photo of a {{}}.' {res['zero_shot_single_template']:.1f} %, the world "
              f"prompt ensemble {res['zero_shot_world_ensemble']:.1f} %.", "",
              "| shots | CoOp | CoOp + expl. loss | gain | class-name relevance score, CoOp / + loss | paper |",
              "|---|---|---|---|---|---|"]
    for shots, row in res["table"].items():
        lines.append(f"| {shots} | {ms(row['coop'])} | {ms(row['coop_expl'])} | {ms(row['gain'])} | "
                     f"{ms(row.get('coop_score'), 3)} / {ms(row.get('coop_expl_score'), 3)} | "
                     "loss helps most with few shots; table cells UNVERIFIED (ntlb_coop.md §3.6) |")
    lines += ["", "Test accuracy in %; the score is the share of the EOT text relevance on the true class name "
              "(what the loss raises; <= 100 test images)."]
    raised = [k for k, row in res["table"].items() if "coop_score" in row and
              row["coop_expl_score"]["mean"] > row["coop_score"]["mean"]]
    if raised:
        lines += ["", f"The loss raises the class-name relevance score at {len(raised)} of {len(res['table'])} shot "
                  f"counts ({', '.join(raised)})."]
    gains = [row["gain"]["mean"] for row in res["table"].values()]
    if len(gains) > 1:
        first = list(res["table"].values())[0]["gain"]
        fewest = ("largest with the fewest shots, as the paper says" if gains[0] == max(gains)
                  else "not largest with the fewest shots") + \
            f"; the {list(res['table'])[0]}-shot gain is positive: {verdict(first['mean'], first['std'])}"
        lines += ["", f"What the world shows: gain at {list(res['table'])[0]} shot(s) {gains[0]:+.1f} vs "
                  f"{gains[-1]:+.1f} at {list(res['table'])[-1]} shots ({fewest})."]
    return lines


def figure(ax, res: dict) -> None:
    """Test accuracy against shots (log2), the zero-shot lines for reference."""
    shots = [int(k) for k in res["table"]]
    for method, label, colour in (("coop", "CoOp", "#999999"), ("coop_expl", "CoOp + expl. loss", "#d62728")):
        ax.errorbar(shots, [res["table"][str(k)][method]["mean"] for k in shots],
                    yerr=[res["table"][str(k)][method]["std"] for k in shots], label=label, color=colour, capsize=2,
                    marker="o")
    ax.axhline(res["zero_shot_single_template"], color="#7f7f7f", ls=":", label="zero-shot, 1 template")
    ax.axhline(res["zero_shot_world_ensemble"], color="#2ca02c", ls="--", label="zero-shot, world ensemble")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class", fontsize=8)
    ax.set_ylabel("test accuracy (%)", fontsize=8)
    ax.set_title("NTLB CoOp on the world", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
