"""`make reproduce` / `xclip reproduce`: each paper's headline effect, measured on the built-in world (issue 18 §2).

    xclip reproduce --out results/reproduce                        # every part (<= 60 min on 2 cores)
    xclip reproduce --parts textspan spatial --out /tmp/r          # some parts; the report covers every part in --out
    xclip reproduce --quick true --out /tmp/r                      # test sizes (seconds per part)
    xclip reproduce --pretrained runs/world/tiny_clip_world.pt     # another world CLIP (default: the shipped file)
    xclip reproduce --config configs/reproduce/world.yaml --print_config

Parts (each runs the project's own methods through their public functions / CLI code paths):
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

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

from xclip.utils.threads import configure_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("reproduce")

Part = Literal["spelling", "coop", "spatial", "textspan", "zerocap"]
PARTS: tuple[str, ...] = ("spelling", "coop", "spatial", "textspan", "zerocap")
SPELLING_CONFIG = "spelling/forget_to_spell_world.yaml"   # under the package's configs/
COOP_CONFIG = "coop/world.yaml"


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class SpellingSettings:
    """Part spelling (Disentangling visual and written concepts)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_train: int = 2000
    """train quintuples (the packaged world config's)"""
    n_val: int = 400
    epochs: int = 30
    k: int = 64
    reg: float = 1.0
    """gamma of R(W) = ||I - W W^T||_F in the 'with R(W)' rows (the paper's value is not in our sources)"""
    k_sweep: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    """bottleneck sizes of the forget-to-spell sweep (with R(W))"""
    n_attack: int = 400
    """objects in the world suite's typographic split"""
    words: int = 200
    """word images per reading split of the world suite"""
    train_config: str | None = None
    """LightningCLI config giving the data and method settings (default: configs/spelling/forget_to_spell_world.yaml)"""


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


@dataclass
class SpatialSettings:
    """Part spatial (NTLB VQGAN-CLIP spatial conditioning): the spatial_generation suite."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 100
    cutn: int = 8
    size: int = 64
    limit: int | None = None
    """use only the first N of the suite's built-in layouts (64 px boxes: size must stay 64)"""


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


SETTINGS: dict[str, type] = {"spelling": SpellingSettings, "coop": CoopSettings, "spatial": SpatialSettings,
                             "textspan": TextspanSettings, "zerocap": ZerocapSettings}
# --quick: sizes for tests (a field still at its default takes the quick value; explicit other values win)
QUICK: dict[str, dict[str, Any]] = {
    "spelling": {"seeds": [0, 1], "n_train": 96, "n_val": 48, "epochs": 2, "k_sweep": [16, 64], "n_attack": 20,
                 "words": 10},
    "coop": {"shots": [1, 2], "seeds": [1, 2], "epochs": 2, "n_test": 2},
    "spatial": {"seeds": [0, 1], "steps": 2, "cutn": 2, "limit": 1},
    "textspan": {"seeds": [0, 1], "n": 40, "spurious_n": 40},
    "zerocap": {"seeds": [0, 1], "n_images": 2, "n_triples": 2, "lm_steps": 5, "beam_size": 2,
                "target_seq_length": 2, "top_size": 8},
}


def package_configs() -> Path:
    import xclip

    return Path(xclip.__file__).resolve().parent / "configs"


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


def pretrained_arg(args) -> str | None:
    p = args.pretrained
    return None if p is None or str(p).lower() in ("none", "null", "") else str(p)


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
    if "textspan" in args.parts:
        from xclip.datamodules.synthetic_world import COLOURS, SHAPES

        ts = part_settings(args, "textspan")
        if not 0.5 <= ts.spurious_aligned <= 1:
            raise SystemExit("--textspan.spurious_aligned must be in [0.5, 1]")
        for flag, given, known in (("spurious_classes", ts.spurious_classes, SHAPES),
                                   ("spurious_colours", ts.spurious_colours, list(COLOURS))):
            if len(given) != 2 or len(set(given)) != 2 or any(g not in known for g in given):
                raise SystemExit(f"--textspan.{flag} must be 2 different world names of {list(known)}, got {given}")
    if "spelling" in args.parts:
        s = part_settings(args, "spelling")
        check_file(s.train_config or package_configs() / SPELLING_CONFIG, "--spelling.train_config",
                   "LightningCLI config")
    if "coop" in args.parts:
        s = part_settings(args, "coop")
        check_file(s.train_config or package_configs() / COOP_CONFIG, "--coop.train_config", "LightningCLI config")


# ------------------------------------------------------------------------------------------------- helpers
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


def build_backbone(args):
    from xclip.models.clip_backbone import build_clip

    return build_clip(args.backbone, pretrained_arg(args)).freeze()


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


# ------------------------------------------------------------------------------------------------- spelling
def run_spelling(args, s: SpellingSettings, out: Path) -> dict:
    """CLIP vs learn / forget-to-spell (with and without R(W)) and a k sweep, on features cached by the world
    config's datamodule (built through `xclip train`'s LightningCLI), scored by the `world` suite."""
    import pytorch_lightning as pl
    import torch

    from xclip import train
    from xclip.evaluation import world
    from xclip.evaluation.common import EvalModel
    from xclip.lightning_modules.base import connect
    from xclip.lightning_modules.spelling import SpellingProjection, evaluate_features, fit_on_features

    cfg = Path(s.train_config) if s.train_config else package_configs() / SPELLING_CONFIG
    pre = pretrained_arg(args)
    argv = ["--config", str(cfg), f"--model.init_args.backbone={args.backbone}",
            f"--model.init_args.pretrained={'null' if pre is None else pre}",
            f"--data.init_args.n_train={s.n_train}", f"--data.init_args.n_val={s.n_val}",
            f"--data.init_args.cache_dir={out / 'cache' / 'spelling'}", "--data.init_args.progress=false",
            "--trainer.logger=false", f"--trainer.default_root_dir={out / 'runs' / 'spelling'}"]
    cli = train.main(argv, run=False)
    base_hp = {k: v for k, v in dict(cli.model.hparams).items() if not k.startswith("_")}
    dm = cli.datamodule
    connect(cli.model, dm)
    dm.setup("fit")
    backbone = cli.model.backbone
    wset = world.Settings(n=s.n_attack, words=s.words)

    def score(W: torch.Tensor | None) -> dict[str, float]:
        r = world.run(EvalModel(backbone, W), wset)
        m = {k: 100.0 * r[k] for k in ("clean_acc", "attacked_acc", "attack_success_rate", "word_top1_real",
                                         "word_top1_nonsense")}
        v = evaluate_features(dm.val_features, W)
        for key in ("acc_im_i_txt_i", "acc_im_it_txt_i", "acc_im_i_img_word", "im_t_txt_t/real/img2txt",
                    "im_t_txt_t/fake/img2txt", "im_it_txt_t/real/img2txt", "im_it_txt_t/fake/img2txt"):
            if key in v:
                m[f"val/{key}"] = float(v[key])
        if W is not None:
            eye = torch.eye(W.shape[0])
            m["orthogonality_error"] = float(torch.linalg.norm(eye - W @ W.t()))
        return m

    def train_one(preset: str, k: int, reg: float, seed: int) -> dict[str, float]:
        pl.seed_everything(seed, verbose=False)
        module = SpellingProjection(**{**base_hp, "preset": preset, "k": k, "reg": reg})
        module.backbone = backbone                           # the same frozen CLIP as the cached features
        t0 = time.time()
        fit_on_features(module, dm.train_features, None, max_epochs=s.epochs,
                        batch_size=dm.hparams.batch_size)
        m = score(module.projection_matrix().detach().cpu().float())
        m["seconds_train"] = time.time() - t0
        return m

    res: dict[str, Any] = {"train_config": str(cfg), "settings": asdict(s), "hparams": base_hp,
                           "clip": score(None), "variants": {}, "k_sweep": {}}
    variants = {"learn_to_spell": ("learn_to_spell", s.reg), "forget_to_spell": ("forget_to_spell", s.reg),
                "learn_to_spell_no_reg": ("learn_to_spell", 0.0), "forget_to_spell_no_reg": ("forget_to_spell", 0.0)}
    for name, (preset, reg) in variants.items():
        runs = [train_one(preset, s.k, reg, seed) for seed in s.seeds]
        res["variants"][name] = {"preset": preset, "reg": reg, "k": s.k, "runs": runs, **aggregate(runs)}
        log.info("spelling %s: attacked %.1f", name, res["variants"][name]["attacked_acc"]["mean"])
    for k in s.k_sweep:
        if k > backbone.embed_dim:
            log.warning("spelling: k=%d > embedding dim %d skipped", k, backbone.embed_dim)
            continue
        runs = (res["variants"]["forget_to_spell"]["runs"] if k == s.k else
                [train_one("forget_to_spell", k, s.reg, seed) for seed in s.seeds])
        res["k_sweep"][str(k)] = {"runs": runs, **aggregate(runs)}
    return res


# ------------------------------------------------------------------------------------------------- coop
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


def run_coop(args, s: CoopSettings, out: Path) -> dict:
    """For every (shots, seed): `xclip train fit --config configs/coop/world.yaml` with expl_weight 0 and lambda,
    then the trainer's test loop on the world test folder (test/acc)."""
    import torch

    from xclip import train
    from xclip.datamodules.synthetic_world import SHAPES
    from xclip.evaluation.world import TEMPLATES
    from xclip.models.zero_shot import zero_shot_classifier

    cfg = Path(s.train_config) if s.train_config else package_configs() / COOP_CONFIG
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


# ------------------------------------------------------------------------------------------------- spatial
def run_spatial(args, s: SpatialSettings, out: Path) -> dict:
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


# ------------------------------------------------------------------------------------------------- textspan
def run_textspan(args, s: TextspanSettings, out: Path) -> dict:
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


# ------------------------------------------------------------------------------------------------- zerocap
def run_zerocap(args, s: ZerocapSettings, out: Path) -> dict:
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


RUNNERS: dict[str, Callable] = {"spelling": run_spelling, "coop": run_coop, "spatial": run_spatial,
                                "textspan": run_textspan, "zerocap": run_zerocap}


# ------------------------------------------------------------------------------------------------- report
def _ms(d: dict | None, digits: int = 1) -> str:
    if not d:
        return "-"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if d["n"] > 1 else f"{d['mean']:.{digits}f}"


def _header(name: str, res: dict) -> list[str]:
    size = "quick (test) sizes, not the full protocol" if res["meta"]["quick"] else "full size"
    sha = res["meta"].get("weights_sha256")
    return [f"## {name}", "", f"`{res['meta']['command']}`: {size}; CLIP `{res['meta']['backbone']}` / "
            f"`{res['meta']['pretrained']}`" + (f" (weights sha256 {sha}...)" if sha else "") +
            f"; {res['meta']['seconds']:.0f} s with {res['meta']['threads']} torch thread(s) on a shared machine.", ""]


def _verdict(better: float, spread: float) -> str:
    """'yes' / 'no' for an effect of size ``better`` (> 0 = in the claimed direction), 'within the spread' when
    its size is below ``spread`` (the larger std of the two rows compared)."""
    if abs(better) <= spread:
        return "within the spread (no)" if better <= 0 else "within the spread"
    return "yes" if better > 0 else "no"


def report_spelling(res: dict) -> list[str]:
    seeds = res["settings"]["seeds"]
    lines = _header("Disentangling: learn-to-spell / forget-to-spell", res)
    lines += [f"W trained on {res['settings']['n_train']} cached world quintuples ({res['settings']['epochs']} epochs, "
              f"k = {res['settings']['k']}, config `{Path(res['train_config']).name}`), seeds {seeds} "
              f"(W's initialisation and batch order; mean ± std); scored by the `world` suite ({res['settings']['n_attack']} objects, "
              f"{res['settings']['words']} words per reading split). 'with R(W)' = gamma {res['settings']['reg']}.", "",
              "| model | clean acc. | attacked acc. | attack success | reads real words | reads nonsense | "
              "val x_i top-1 | ortho. error |", "|---|---|---|---|---|---|---|---|"]
    keys = ("clean_acc", "attacked_acc", "attack_success_rate", "word_top1_real", "word_top1_nonsense",
            "val/acc_im_i_txt_i", "orthogonality_error")
    c = res["clip"]
    lines.append("| CLIP | " + " | ".join("-" if k not in c else f"{c[k]:.1f}" for k in keys) + " |")
    labels = {"learn_to_spell": "learn-to-spell (with R(W))", "forget_to_spell": "forget-to-spell (with R(W))",
              "learn_to_spell_no_reg": "learn-to-spell without R(W)",
              "forget_to_spell_no_reg": "forget-to-spell without R(W)"}
    for name, label in labels.items():
        v = res["variants"].get(name)
        if v:
            lines.append(f"| {label} | " + " | ".join(_ms(v.get(k), 2 if k == "orthogonality_error" else 1)
                                                     for k in keys) + " |")
    f = res["variants"].get("forget_to_spell", {})
    if f:
        d_clean = c["clean_acc"] - f["clean_acc"]["mean"]
        d_att = f["attacked_acc"]["mean"] - c["attacked_acc"]
        d_succ = c["attack_success_rate"] - f["attack_success_rate"]["mean"]
        lines += ["", "| claim (issue 18 / paper) | paper | world | met |", "|---|---|---|---|",
                  f"| forget keeps clean accuracy (drop <= 3 points) | ImageNet accuracy kept (UNVERIFIED) | "
                  f"{d_clean:+.1f} drop | {'yes' if d_clean <= 3 else 'no'} |",
                  f"| forget raises attacked accuracy (>= +20 points) | 49.4 -> 77.2 % (+27.8, real attack set; "
                  f"UNVERIFIED, disentangle.md §5.5) | {c['attacked_acc']:.1f} -> {f['attacked_acc']['mean']:.1f} "
                  f"({d_att:+.1f}) | {'yes' if d_att >= 20 else 'no'} |",
                  f"| forget lowers attack success (>= 25 points) | not reported | {c['attack_success_rate']:.1f} -> "
                  f"{f['attack_success_rate']['mean']:.1f} ({-d_succ:+.1f}) | {'yes' if d_succ >= 25 else 'no'} |"]
        lrn = res["variants"].get("learn_to_spell")
        if lrn:
            up = lrn["word_top1_real"]["mean"] - c["word_top1_real"]
            down = c["clean_acc"] - lrn["clean_acc"]["mean"]
            lines.append(f"| learn raises reading, lowers visual matching | IIIT5K / retrieval: NOT RECOVERED "
                         f"(§5.4, §5.7) | reading {up:+.1f}, clean accuracy {-down:+.1f} | "
                         f"{'yes' if up > 0 and down > 0 else 'no'} |")
        for base, name in (("forget_to_spell", "forget_to_spell_no_reg"), ("learn_to_spell", "learn_to_spell_no_reg")):
            a, b = res["variants"].get(base), res["variants"].get(name)
            if a and b:
                key = "attacked_acc" if base.startswith("forget") else "word_top1_real"
                lines.append(f"| without R(W) {base.split('_')[0]} gets worse ({key}) | loss-ablation table NOT "
                             f"RECOVERED (§5.3) | {_ms(a[key])} with, {_ms(b[key])} without | "
                             f"{_verdict(a[key]['mean'] - b[key]['mean'], max(a[key]['std'], b[key]['std']))} |")
        lines.append("| text in VQGAN-CLIP images: learn > CLIP > forget | 53.4 / 33.1 / 3.4 % (VERIFIED chart, "
                     "§5.6) | not run: the world's tiny VQGAN is random (no readable text) | - |")
    if res["k_sweep"]:
        lines += ["", "Bottleneck sweep (forget-to-spell with R(W); the paper picks k = 256 for forget, 64 for learn, "
                  "UNVERIFIED §5.3):", "", "| k | clean acc. | attacked acc. | attack success | reads real words |",
                  "|---|---|---|---|---|"]
        for k, v in res["k_sweep"].items():
            lines.append(f"| {k} | " + " | ".join(_ms(v.get(x)) for x in
                                                 ("clean_acc", "attacked_acc", "attack_success_rate",
                                                  "word_top1_real")) + " |")
    return lines


def report_coop(res: dict) -> list[str]:
    s = res["settings"]
    lines = _header("NTLB: CoOp vs CoOp + explainability loss", res)
    lines += [f"20 world shapes, {s['n_test']} test images per class, `{Path(res['train_config']).name}` "
              f"({s['epochs']} epochs), lambda = {s['expl_weight']}, seeds {s['seeds']} (the few-shot picks and the "
              f"context initialisation; mean ± std). Zero-shot on "
              f"the same test images: 'a photo of a {{}}.' {res['zero_shot_single_template']:.1f} %, the world "
              f"prompt ensemble {res['zero_shot_world_ensemble']:.1f} %.", "",
              "| shots | CoOp | CoOp + expl. loss | gain | class-name relevance score, CoOp / + loss | paper |",
              "|---|---|---|---|---|---|"]
    for shots, row in res["table"].items():
        lines.append(f"| {shots} | {_ms(row['coop'])} | {_ms(row['coop_expl'])} | {_ms(row['gain'])} | "
                     f"{_ms(row.get('coop_score'), 3)} / {_ms(row.get('coop_expl_score'), 3)} | "
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
            f"; the {list(res['table'])[0]}-shot gain is positive: {_verdict(first['mean'], first['std'])}"
        lines += ["", f"What the world shows: gain at {list(res['table'])[0]} shot(s) {gains[0]:+.1f} vs "
                  f"{gains[-1]:+.1f} at {list(res['table'])[-1]} shots ({fewest})."]
    return lines


def report_spatial(res: dict) -> list[str]:
    s = res["settings"]
    lines = _header("NTLB: spatial conditioning of VQGAN-CLIP", res)
    lines += [f"`spatial_generation` suite: {res['n_layouts']} built-in world layouts, {s['size']} px, {s['steps']} "
              f"steps, cutn {s['cutn']}, random tiny VQGAN, seeds {s['seeds']} (mean ± std). Relevance: last-layer "
              "CLIP relevance of each box's prompt on the generated image, Otsu-binarised against the box.", "",
              "| method | mass in box | precision | recall | F1 |", "|---|---|---|---|---|"]
    labels = {"textual": "textual", "similarity": "similarity-based", "similarity2": "similarity-based 2",
              "explainability": "explainability loss"}
    for m, v in res["methods"].items():
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(_ms(v.get(k), 3) for k in
                                                           ("mass_in_box", "precision", "recall", "f1")) + " |")
    if "explainability" in res["methods"] and len(res["methods"]) > 1:
        keys = ("mass_in_box", "precision", "recall", "f1")
        best = [k for k in keys if all(res["methods"]["explainability"][k]["mean"] >= v[k]["mean"]
                                       for v in res["methods"].values())]
        lines += ["", f"The explainability loss is best on {len(best)} of 4 metrics ({', '.join(best) or 'none'})."]
    lines += ["", "Paper (ntlb_coop.md §4.4): the explainability loss beats the baselines on precision / recall / F1 "
              "and AP / AR; all cells UNVERIFIED (no evaluation code in the anchor). AP needs a COCO DETR: not run."]
    return lines


def report_textspan(res: dict) -> list[str]:
    s = res["settings"]
    lines = _header("TextSpan: mean-ablation of attention layers", res)
    lines += [f"`mean_ablation` suite on {s['n']} world objects per seed, seeds {s['seeds']} (mean ± std, %).", "",
              "| attention layers mean-ablated (from the first) | " + " | ".join(
                  str(i) for i in range(len(res["accumulated_layers"]))) + " |",
              "|---|" + "---|" * len(res["accumulated_layers"]),
              "| zero-shot accuracy | " + " | ".join(_ms(v) for v in res["accumulated_layers"]) + " |", "",
              "| ablation | accuracy | paper (textspan_zerocap.md A4) |", "|---|---|---|",
              f"| none | {_ms(res.get('baseline'))} | ViT-L-14 75.25 |",
              f"| all MLPs | {_ms(res.get('mlps_ablated'))} | costs 1-3 points |",
              f"| CLS->CLS terms | {_ms(res.get('cls_ablated'))} | costs 1-3 points |"]
    for k in res["keep_last"]:
        lines.append(f"| all attention layers but the last {k} | {_ms(res.get(f'all_but_last_{k}'))} | "
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
            lines.append(f"| {label} | {_ms(sp[key]['worst_group'])} | {_ms(sp[key]['mean_group'])} | {paper[key]} |")
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


def report_zerocap(res: dict) -> list[str]:
    s = res["settings"]
    lines = _header("ZeroCap: CLIP-guided captioning and visual arithmetic", res)
    lines += [f"LM: {res['lm']}. CLIP-S = 2.5 max(cos, 0) of the world CLIP; {s['n_images']} objects and "
              f"{s['n_triples']} triples per seed, seeds {s['seeds']} (mean ± std); beam {s['beam_size']}, "
              f"{s['target_seq_length']} tokens, top {s['top_size']}, step {s['stepsize']}.", "",
              "| | unguided (LM beam search, beams re-ranked by CLIP) | CLIP-guided | paper (textspan_zerocap.md B8) |",
              "|---|---|---|---|",
              f"| CLIP-S | {_ms(res.get('clip_s_unguided'), 3)} | {_ms(res.get('clip_s_guided'), 3)} | ZeroCap 0.87 "
              "on COCO (UNVERIFIED) |",
              f"| caption names the shape (%) | {_ms(res.get('names_shape_unguided'))} | "
              f"{_ms(res.get('names_shape_guided'))} | - |",
              f"| caption names the colour (%) | {_ms(res.get('names_colour_unguided'))} | "
              f"{_ms(res.get('names_colour_guided'))} | - |", "",
              "Visual arithmetic image(c1 s1) - image(c1 s2) + image(c2 s2), want 'c2 s1' (paper: woman + king - man "
              "-> queen, qualitative; its benchmark numbers UNVERIFIED, B5):", "",
              "| count over triples (%) | value |", "|---|---|",
              f"| caption names c2 and s1 | {_ms(res.get('arith_both'))} |",
              f"| caption names s1 | {_ms(res.get('arith_shape'))} |",
              f"| caption names c2 | {_ms(res.get('arith_colour'))} |",
              f"| nearest of the {round(100 / res['chance_arith_retrieval'])} 'a {{colour}} {{shape}}.' prompts is "
              f"'c2 s1' (no LM; chance {res['chance_arith_retrieval']:.1f}) | {_ms(res.get('arith_retrieval'))} |"]
    if res.get("examples"):
        e = res["examples"][0]
        lines += ["", f"Example: {e['images'][0]} - {e['images'][1]} + {e['images'][2]} -> \"{e['caption']}\" "
                  f"(nearest prompt: {e['nearest_prompt']}; wanted {e['want']})."]
    return lines


REPORTS: dict[str, Callable[[dict], list[str]]] = {
    "spelling": report_spelling, "coop": report_coop, "spatial": report_spatial, "textspan": report_textspan,
    "zerocap": report_zerocap}


def _fig_spelling(ax, res: dict) -> None:
    keys = [("clean_acc", "clean"), ("attacked_acc", "attacked"), ("attack_success_rate", "attack\nsuccess"),
            ("word_top1_real", "reads\nreal words")]
    rows = [("CLIP", {k: {"mean": res["clip"][k], "std": 0.0} for k, _ in keys}, "#999999")]
    for name, label, colour in (("learn_to_spell", "learn", "#1f77b4"), ("forget_to_spell", "forget", "#d62728"),
                                ("forget_to_spell_no_reg", "forget w/o R(W)", "#ff9896")):
        if name in res["variants"]:
            rows.append((label, res["variants"][name], colour))
    width = 0.8 / len(rows)
    for j, (label, v, colour) in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [v[k]["mean"] for k, _ in keys], width, yerr=[v[k]["std"] for k, _ in keys], label=label,
               color=colour, capsize=2)
    ax.set_xticks(range(len(keys)), [lab for _, lab in keys], fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%", fontsize=8)
    ax.set_title("Disentangling (world suite)", fontsize=9)
    ax.legend(fontsize=6)


def _fig_coop(ax, res: dict) -> None:
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


def _fig_spatial(ax, res: dict) -> None:
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


def _fig_textspan(ax, res: dict) -> None:
    curve = res["accumulated_layers"]
    ax.errorbar(range(len(curve)), [c["mean"] for c in curve], yerr=[c["std"] for c in curve], marker="o",
                capsize=2, color="#1f77b4")
    ax.set_xticks(range(len(curve)))
    ax.set_xlabel("attention layers mean-ablated (from the first)", fontsize=8)
    ax.set_ylabel("zero-shot accuracy (%)", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title("TextSpan mean-ablation", fontsize=9)


def _fig_zerocap(ax, res: dict) -> None:
    bars = [("clip_s_unguided", "CLIP-S\nunguided", 1.0), ("clip_s_guided", "CLIP-S\nguided", 1.0),
            ("arith_both", "arithmetic:\nnames c2 s1", 0.01), ("arith_retrieval", "arithmetic:\nnearest prompt", 0.01)]
    present = [(k, lab, f) for k, lab, f in bars if k in res]
    ax.bar(range(len(present)), [res[k]["mean"] * f for k, _, f in present],
           yerr=[res[k]["std"] * f for k, _, f in present], capsize=2,
           color=["#999999", "#d62728", "#9467bd", "#8c564b"][:len(present)])
    ax.set_xticks(range(len(present)), [lab for _, lab, _ in present], fontsize=7)
    ax.set_ylabel("CLIP-S / fraction of triples", fontsize=8)
    ax.set_title("ZeroCap (world LM)", fontsize=9)


FIGURES: dict[str, Callable] = {"spelling": _fig_spelling, "coop": _fig_coop, "spatial": _fig_spatial,
                                "textspan": _fig_textspan, "zerocap": _fig_zerocap}


def write_figure(out: Path, results: dict[str, dict]) -> Path | None:
    """reproduction.png: one panel per part present (mean +- std error bars)."""
    if not results:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xclip.utils.io import atomic_write_bytes

    ncols = min(3, len(results))
    nrows = math.ceil(len(results) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, (name, res) in zip(flat, results.items()):
        FIGURES[name](ax, res)
    for ax in flat[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = out / "reproduction.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_report(out: Path) -> Path:
    """reproduction.md from every <part>.json in ``out`` (parts not run are listed as such)."""
    from xclip.utils.io import atomic_write_bytes

    lines = ["# Each paper's headline effect on the built-in world (`xclip reproduce`)", "",
             "Generated by `make reproduce` (= `xclip reproduce`), issue 18 §2. Every number of the world is next "
             "to the paper's corresponding number, cited to `shared/reference/*.md` (UNVERIFIED there = the paper "
             "text was not available). Metrics in %, mean ± std over the seeds given in each section.", ""]
    missing, results = [], {}
    for name in PARTS:
        path = out / f"{name}.json"
        if not path.is_file():
            missing.append(name)
            continue
        results[name] = json.loads(path.read_text())
    if write_figure(out, results):
        lines += ["![one panel per part: mean ± std over seeds](reproduction.png)", ""]
    for name, res in results.items():
        lines += REPORTS[name](res) + [""]
    if results:
        lines += ["## Run times", "", "| part | size | seconds | torch threads |", "|---|---|---|---|"]
        lines += [f"| {n} | {'quick' if r['meta']['quick'] else 'full'} | {r['meta']['seconds']:.0f} | "
                  f"{r['meta']['threads']} |" for n, r in results.items()]
        lines += ["", "On the 2-core machine shared with other jobs (absolute times are noisy).", ""]
    if missing:
        lines += ["## Not run", "", f"Parts without results in this folder: {', '.join(missing)}.", ""]
    path = out / "reproduction.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


# ------------------------------------------------------------------------------------------------- main
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
        res = RUNNERS[name](args, s, out)
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


if __name__ == "__main__":
    main()
