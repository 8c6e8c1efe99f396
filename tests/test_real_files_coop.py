"""CoOp's release files in their exact layouts: Dassl prompt checkpoints (prompt_learner/model.pth.tar-N),
split_zhou_<Dataset>.json (and FGVCAircraft's lists), split_fewshot/shot_K-seed_S.pkl, and Dassl's few-shot picks.

Every file is written here the way CoOp / Dassl write it (torch.save of save_checkpoint's dict with a real SGD
state dict and the warm-up scheduler's state dict, json.dump(indent=4) of tuples, pickle.dump(HIGHEST_PROTOCOL)
of Datum objects from a module named dassl.data.datasets.base_dataset) and read through the user-facing API/CLI.
"""
import collections
import json
import pickle
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from xclip.datamodules.coop_datasets import LAYOUTS, CoOpDatasetDataModule, read_split_fewshot_pkl, read_split_zhou
from xclip.datamodules.fewshot import FewShotDataError
from xclip.lightning_modules.coop import CoOp, load_coop_prompt_checkpoint
from xclip.models.prompt_learner import is_dassl_prompt_checkpoint, read_dassl_prompt_checkpoint

WORLD = ("tiny-vit-world", "synthetic-world")
NAMES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def world():
    from xclip.models.clip_backbone import build_clip

    return build_clip(*WORLD).freeze()


# ---- Dassl prompt checkpoints ---------------------------------------------------------------------------------------
class _ConstantWarmup(LRScheduler):
    """Dassl's ConstantWarmupScheduler as its code reads (successor kept as an attribute, so its state dict
    pickles the successor CosineAnnealingLR, which holds the optimizer)."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


class _CoOpPromptLearner(nn.Module):
    """The state CoOp's PromptLearner saves: ctx + token_prefix / token_suffix buffers of "X X .. X name."."""

    def __init__(self, backbone, classnames, ctx, dtype):
        super().__init__()
        M = ctx.shape[-2]
        self.ctx = nn.Parameter(ctx.to(dtype))
        tokens = backbone.tokenize([" ".join(["X"] * M) + " " + n.replace("_", " ") + "." for n in classnames])
        with torch.no_grad():
            emb = backbone.model.token_embedding(tokens).to(dtype)
        self.register_buffer("token_prefix", emb[:, :1, :])
        self.register_buffer("token_suffix", emb[:, 1 + M:, :])


def write_dassl_prompt_file(folder: Path, backbone, classnames, ctx, dtype=torch.float32, epoch=2) -> Path:
    """Dassl's save_model -> save_checkpoint: {state_dict, epoch, optimizer, scheduler, val_result} to
    <folder>/prompt_learner/model.pth.tar-<epoch>, after a few SGD steps under warm-up + cosine."""
    pl = _CoOpPromptLearner(backbone, classnames, ctx, dtype)
    opt = torch.optim.SGD(pl.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    sched = _ConstantWarmup(opt, CosineAnnealingLR(opt, float(50)), 1, 1e-5)
    for _ in range(epoch):
        pl.ctx.grad = torch.zeros_like(pl.ctx)  # zero grad: the momentum buffer exists, ctx keeps its value
        opt.step()
        sched.step()
    state = {"state_dict": pl.state_dict(), "epoch": epoch, "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "val_result": None}
    assert isinstance(state["scheduler"]["successor"], CosineAnnealingLR)  # what made the files fail to load
    out = folder / "prompt_learner" / f"model.pth.tar-{epoch}"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def _phrase_ctx(backbone, phrase):
    ids = backbone.tokenize([phrase])[0]
    n = len(backbone.tokenizer.encode(phrase))
    with torch.no_grad():
        return backbone.model.token_embedding(ids[1:1 + n]).float()  # [M, W]


def _encode(backbone, texts):
    with torch.no_grad():
        return torch.nn.functional.normalize(backbone.encode_text(backbone.tokenize(texts), normalize=False), dim=-1)


@pytest.mark.parametrize("position,template", [("end", "a photo of a {}."), ("middle", "a photo {} of a.")])
def test_dassl_prompt_file_loads_and_prompts_equal_clip_encoding(tmp_path, world, position, template):
    run = tmp_path / "output/imagenet/CoOp/vit_b32_ep50_16shots" / f"nctx4_cscFalse_ctp{position}" / "seed1"
    path = write_dassl_prompt_file(run, world, NAMES, _phrase_ctx(world, "a photo of a"))
    with pytest.raises(Exception):  # what the project's plain safe load did before ("truncated or not a torch file?")
        torch.load(path, weights_only=True)
    assert is_dassl_prompt_checkpoint(path)
    renamed = tmp_path / "coop_vitb32.pth"
    renamed.write_bytes(path.read_bytes())
    assert is_dassl_prompt_checkpoint(renamed)  # by the globals it pickles, not only by CoOp's file name
    torch.save({"state_dict": {"w": torch.zeros(1)}, "method": "x"}, tmp_path / "other.ckpt")
    assert not is_dassl_prompt_checkpoint(tmp_path / "other.ckpt")
    ck = read_dassl_prompt_checkpoint(path)
    saved = torch.load(path, weights_only=False)  # trusted here: the test wrote it
    assert torch.equal(ck.ctx, saved["state_dict"]["ctx"].float()) and ck.epoch == 2 and not ck.csc
    assert ck.n_cls == 3 and ck.extra["scheduler_keys"] and "successor" in ck.extra["scheduler_keys"]
    m = load_coop_prompt_checkpoint(path, *WORLD)  # no class names: generic ctx, folder name gives the position
    assert m.hparams.class_token_position == position
    ours = m.class_text_features(NAMES + ["hot_dog"])
    ref = _encode(world, [template.format(n.replace("_", " ")) for n in NAMES + ["hot_dog"]])
    assert (ours - ref).abs().max() < 1e-5
    assert torch.equal(m.prompt_learner.ctx.detach(), ck.ctx)


def test_fp16_prompt_file_and_class_specific_contexts(tmp_path, world):
    torch.manual_seed(1)
    ctx = torch.randn(3, 2, world.model.token_embedding.weight.shape[1]) * 0.02
    path = write_dassl_prompt_file(tmp_path / "nctx2_cscTrue_ctpend/seed1", world, NAMES, ctx, dtype=torch.float16)
    ck = read_dassl_prompt_checkpoint(path)
    assert ck.stored_dtype == torch.float16 and ck.csc and ck.ctx.dtype == torch.float32
    assert torch.equal(ck.ctx, ctx.half().float())
    with pytest.raises(ValueError, match="class-specific contexts for 3 classes"):
        load_coop_prompt_checkpoint(path, *WORLD)
    m = load_coop_prompt_checkpoint(path, *WORLD, classnames=NAMES)
    assert m.hparams.csc and m.hparams.n_ctx == 2 and torch.equal(m.prompt_learner.ctx.detach(), ck.ctx)
    # independent recomputation of the prompts: SOS + ctx_c + "name." tokens, through the text tower
    from xclip.models.relevance import encode_text_from_embeddings

    tokens = world.tokenize(["X X " + n + "." for n in NAMES])
    with torch.no_grad():
        emb = world.model.token_embedding(tokens).clone()
        emb[:, 1:3] = ck.ctx
        ref = torch.nn.functional.normalize(encode_text_from_embeddings(world, emb, tokens.argmax(-1)), dim=-1)
        assert (m.class_text_features(NAMES) - ref).abs().max() < 1e-5


def test_prompt_file_wrong_backbone_and_hostile_files_refused(tmp_path, world):
    path = write_dassl_prompt_file(tmp_path / "a", world, NAMES, _phrase_ctx(world, "a photo of a"))
    with pytest.raises(ValueError, match="learned on another CLIP"):
        CoOp("tiny-vit-test", None, classnames=NAMES, init_ctx_from=str(path))
    with pytest.raises(ValueError, match="--backbone ViT-B-32"):
        load_coop_prompt_checkpoint(path, None, None)
    # an optimizer class that CoOp never pickles, and a callable: refused by name, nothing runs
    state = torch.load(path, weights_only=False)
    p = nn.Parameter(torch.zeros(2))
    state["scheduler"]["successor"] = torch.optim.Adam([p])
    bad = tmp_path / "b" / "model.pth.tar-2"
    bad.parent.mkdir()
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="torch.optim.adam.Adam.*refused"):
        read_dassl_prompt_checkpoint(bad)
    state["scheduler"]["successor"] = _Evil()
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="refused"):
        read_dassl_prompt_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("pwned"),))


def test_train_from_prompt_file_then_checkpoint_needs_no_file(tmp_path, world):
    import pytorch_lightning as pl

    from xclip.lightning_modules.base import load_method_checkpoint

    ctx = _phrase_ctx(world, "a photo of a")
    path = write_dassl_prompt_file(tmp_path / "run", world, NAMES, ctx)
    m = CoOp(*WORLD, classnames=NAMES, n_ctx=16, init_ctx_from=str(path))
    assert m.hparams.n_ctx == 4 and torch.equal(m.prompt_learner.ctx.detach(), ctx)
    assert m.hparams.init_ctx_from is None and m.hparams._init_ctx_from == str(path)
    with pytest.raises(ValueError, match="both initialise"):
        CoOp(*WORLD, classnames=NAMES, ctx_init="a photo of a", init_ctx_from=str(path))
    # classnames from the datamodule at setup: the ctx is copied in then
    lazy = CoOp(*WORLD, init_ctx_from=str(path))
    lazy._build_prompts(NAMES)
    assert torch.equal(lazy.prompt_learner.ctx.detach(), ctx)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=0, accelerator="cpu")
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "coop.ckpt")
    path.unlink()
    back = load_method_checkpoint(tmp_path / "coop.ckpt", expected=CoOp)
    assert torch.equal(back.prompt_learner.ctx, m.prompt_learner.ctx)


# ---- CoOp dataset folders -------------------------------------------------------------------------------------------
def _relpaths(dataset: str, cls: str, label: int, i: int) -> str:
    """Relative paths the way each dataset's split_zhou file spells them."""
    return {"OxfordPets": f"{cls}_{i + 1}.jpg", "StanfordCars": f"cars_train/{label:02d}{i:03d}.jpg",
            "OxfordFlowers": f"image_{label:02d}{i:03d}.jpg", "SUN397": f"{cls[0]}/{cls}/sun_{i:04d}.jpg",
            "UCF101": f"{cls}/v_{cls.replace('_', '')}_g{i:02d}_c01.jpg"}.get(dataset, f"{cls}/image_{i:04d}.jpg")


CLASSES = {"OxfordPets": ["abyssinian", "american_bulldog", "basset_hound"],
           "Caltech101": ["face", "leopard", "accordion"], "Food101": ["apple_pie", "baby_back_ribs", "baklava"],
           "StanfordCars": ["2012 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan"],
           "OxfordFlowers": ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
           "SUN397": ["abbey", "airplane_cabin", "airport_terminal"], "DescribableTextures": ["banded", "blotchy", "braided"],
           "EuroSAT": ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"],
           "UCF101": ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"],
           "FGVCAircraft": ["707-320", "727-200", "737-200"]}


def write_coop_dataset(data_root: Path, dataset: str, n: dict | None = None, seed: int = 0,
                       shuffle_train: bool = True) -> dict[str, list]:
    """A tiny dataset folder in CoOp's layout with its split file; returns the split lists as written."""
    n = n or {"train": 6, "val": 3, "test": 2}
    lay = LAYOUTS[dataset]
    ddir = data_root / lay.folder
    idir = ddir / lay.image_dir if lay.image_dir else ddir
    rng = random.Random(seed)
    split: dict[str, list] = {}
    k = 0
    for s in ("train", "val", "test"):
        rows = []
        for y, cls in enumerate(CLASSES[dataset]):
            for _ in range(n[s]):
                rel = (f"{1000000 + k}.jpg" if dataset == "FGVCAircraft" else _relpaths(dataset, cls, y, k))
                k += 1
                (idir / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 10), (40 * y, 200 - 30 * y, rng.randrange(256))).save(idir / rel)
                rows.append((rel, y, cls))
        if shuffle_train and s == "train":
            rng.shuffle(rows)  # CoOp's split_trainval writes classes interleaved in first-appearance order
        split[s] = rows
    if dataset == "FGVCAircraft":
        (ddir / "variants.txt").write_text("\n".join(CLASSES[dataset]) + "\n")
        for s, rows in split.items():
            (ddir / f"images_variant_{s}.txt").write_text("".join(f"{r[:-4]} {c}\n" for r, _, c in rows))
    else:
        with open(ddir / lay.split_file, "w") as f:  # Dassl's write_json
            json.dump(split, f, indent=4, separators=(",", ": "))
    return split


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_each_coop_dataset_layout_loads(tmp_path, dataset):
    split = write_coop_dataset(tmp_path / "DATA", dataset)
    before = sorted(p for p in (tmp_path / "DATA").rglob("*"))
    dm = CoOpDatasetDataModule(dataset, root=str(tmp_path / "DATA"), shots=2, seed=1, data_dir=str(tmp_path / "out"),
                               num_workers=0, image_size=32, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.classnames == [c.replace("_", " ") for c in CLASSES[dataset]]
    assert len(dm.train_set) == 2 * 3 and len(dm.val_set) == 2 * 3 and len(dm.test_set) == len(split["test"])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    picked = {f for ids in dm.data.manifest["train"].values() for f in ids}
    train_rel = {r for r, _, _ in split["train"]}
    assert picked <= train_rel
    assert any(p.name.endswith("-dassl.json") for p in (tmp_path / "out").rglob("*.json"))
    assert sorted(p for p in (tmp_path / "DATA").rglob("*")) == before  # nothing written into the dataset folder


def test_split_zhou_reader_checks_entries(tmp_path):
    p = tmp_path / "split_zhou_X.json"
    p.write_text(json.dumps({"train": [["../../etc/passwd", 0, "a"]], "val": [], "test": []}))
    with pytest.raises(FewShotDataError, match="leaves the image folder"):
        read_split_zhou(p)
    p.write_text(json.dumps({"train": [["a.jpg", "zero", "a"]], "val": [], "test": []}))
    with pytest.raises(FewShotDataError, match="not an integer"):
        read_split_zhou(p)
    p.write_text(json.dumps({"train": []}))
    with pytest.raises(FewShotDataError, match="expected"):
        read_split_zhou(p)
    with pytest.raises(FewShotDataError, match="Flowers102 is 'OxfordFlowers'"):
        CoOpDatasetDataModule("Flowers102", root=str(tmp_path)).prepare_data()


def _dassl_reference(train, val, shots, seed):
    """Dassl's procedure as its documentation and code describe it: set_random_seed, then for each of
    (train, K) and (val, min(K, 4)): group by label in first-appearance order, random.sample per group
    (all items when fewer), concatenate.  Uses the *global* RNGs, as Dassl does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    def generate(items, k):
        groups = collections.defaultdict(list)
        for it in items:
            groups[it[1]].append(it)
        out = []
        for _, members in groups.items():
            out += random.sample(members, k) if len(members) >= k else members
        return out

    return generate(train, shots), generate(val, min(shots, 4))


def _by_class(items):
    out = collections.defaultdict(set)
    for rel, y, _ in items:
        out[y].add(rel)
    return dict(out)


@pytest.mark.parametrize("shots,seed", [(4, 1), (1, 2), (16, 3)])
def test_dassl_sampler_picks_what_coop_picks(tmp_path, shots, seed):
    split = write_coop_dataset(tmp_path / "DATA", "DescribableTextures", n={"train": 20, "val": 6, "test": 1})
    ref_train, ref_val = _dassl_reference(split["train"], split["val"], shots, seed)
    kw = dict(root=str(tmp_path / "DATA"), shots=shots, seed=seed, data_dir=str(tmp_path / "out"), num_workers=0,
              allow_fewer=True)
    dm = CoOpDatasetDataModule("DescribableTextures", fewshot_sampler="dassl", **kw)
    names = CLASSES["DescribableTextures"]
    got = {names.index(k): set(v) for k, v in dm.data.manifest["train"].items()}
    assert got == _by_class(ref_train)
    assert {names.index(k): set(v) for k, v in dm.data.manifest["val"].items()} == _by_class(ref_val)
    if shots < 16:  # the project's sampler is another draw (what "5 of 20 picks shared" measured)
        other = CoOpDatasetDataModule("DescribableTextures", fewshot_sampler="xclip", **kw)
        assert {names.index(k): set(v) for k, v in other.data.manifest["train"].items()} != got


# ---- split_fewshot/shot_K-seed_S.pkl --------------------------------------------------------------------------------
@pytest.fixture
def dassl_module(monkeypatch):
    """A module importable as dassl.data.datasets.base_dataset with Dassl's Datum (so pickle writes that name)."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    mods = {n: types.ModuleType(n) for n in names}

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = names[-1], "Datum"
    mods[names[-1]].Datum = Datum
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    return Datum


def test_split_fewshot_pkl_is_read_and_used(tmp_path, dassl_module):
    split = write_coop_dataset(tmp_path / "DATA", "OxfordPets", n={"train": 8, "val": 5, "test": 2})
    train, val = _dassl_reference(split["train"], split["val"], 2, 1)
    foreign = "/home/someone/DATA/oxford_pets/images/"  # CoOp stores absolute paths of the machine that wrote it
    data = {"train": [dassl_module(foreign + r, y, 0, c) for r, y, c in train],
            "val": [dassl_module(foreign + r, y, 0, c) for r, y, c in val]}
    pkl = tmp_path / "DATA/oxford_pets/split_fewshot/shot_2-seed_1.pkl"
    pkl.parent.mkdir()
    with open(pkl, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"dassl.data.datasets.base_dataset" in pkl.read_bytes()
    back = read_split_fewshot_pkl(pkl)
    assert [(d.impath, d.label, d.domain, d.classname) for d in back["train"]] == \
        [(foreign + r, y, 0, c) for r, y, c in train]
    kw = dict(root=str(tmp_path / "DATA"), shots=2, seed=1, num_workers=0)
    dm = CoOpDatasetDataModule("OxfordPets", data_dir=str(tmp_path / "out"), **kw)
    assert dm.data.manifest["sampler"] == "split_fewshot_pkl"
    names = CLASSES["OxfordPets"]
    assert {names.index(k): set(v) for k, v in dm.data.manifest["train"].items()} == _by_class(train)
    # the dassl sampler alone (no pkl) picks the same images
    fresh = CoOpDatasetDataModule("OxfordPets", data_dir=str(tmp_path / "out2"), use_split_fewshot=False, **kw)
    assert fresh.data.manifest["train"] == dm.data.manifest["train"]
    assert fresh.data.manifest["val"] == dm.data.manifest["val"]


def test_hostile_split_fewshot_pkl_refused(tmp_path):
    p = tmp_path / "shot_1-seed_1.pkl"
    p.write_bytes(pickle.dumps({"train": [_Evil()]}))
    with pytest.raises(FewShotDataError, match="not allowed"):
        read_split_fewshot_pkl(p)
    p.write_bytes(pickle.dumps({"train": [collections.OrderedDict()]}))
    with pytest.raises(FewShotDataError, match="collections.OrderedDict is not allowed"):
        read_split_fewshot_pkl(p)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_evaluate_cli_on_prompt_file_and_coop_folder(tmp_path, world):
    """evaluate.py --ckpt model.pth.tar-N --backbone ... on a CoOp-layout folder: the learned prompt equal to
    'a photo of a' scores what the single template scores."""
    from xclip import evaluate

    write_coop_dataset(tmp_path / "DATA", "EuroSAT", n={"train": 2, "val": 1, "test": 3})
    path = write_dassl_prompt_file(tmp_path / "run", world, ["x", "y", "z"], _phrase_ctx(world, "a photo of a"))
    out = tmp_path / "res.json"
    res = evaluate.main(["--ckpt", str(path), "--backbone", WORLD[0], "--pretrained", WORLD[1], "--suite",
                         "zeroshot", "--zeroshot.dataset", f"coop:EuroSAT:{tmp_path / 'DATA'}", "--zeroshot.templates",
                         "[single]", "--zeroshot.num_workers", "0", "--device", "cpu", "--out", str(out)])
    z = res["suites"]["zeroshot"]
    assert z["n_images"] == 9 and z["n_classes"] == 3
    assert z["top1/method"] == z["top1/single"]


def test_train_cli_on_coop_folder_from_prompt_file(tmp_path, monkeypatch, world):
    """train.py fit with CoOpDatasetDataModule (a CoOp-layout folder) and init_ctx_from (a Dassl prompt file)."""
    from xclip import train

    repo = Path(__file__).resolve().parent.parent
    write_coop_dataset(tmp_path / "DATA", "Caltech101", n={"train": 4, "val": 2, "test": 1})
    path = write_dassl_prompt_file(tmp_path / "run0", world, NAMES, _phrase_ctx(world, "a photo of a"))
    monkeypatch.chdir(tmp_path)
    train.main(["fit", "--config", str(repo / "configs/coop/tiny_test.yaml"),
                "--data", "xclip.datamodules.coop_datasets.CoOpDatasetDataModule",
                "--data.init_args.dataset", "Caltech101", "--data.init_args.root", str(tmp_path / "DATA"),
                "--data.init_args.shots", "2", "--data.init_args.image_size", str(world.image_size),
                "--model.init_args.backbone", WORLD[0], "--model.init_args.pretrained", WORLD[1],
                "--model.init_args.init_ctx_from", str(path), "--trainer.max_steps", "1",
                "--trainer.default_root_dir", str(tmp_path / "run")])
    ckpt = torch.load(next((tmp_path / "run").rglob("last.ckpt")), weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["classnames"] == CLASSES["Caltech101"] and hp["n_ctx"] == 4 and hp["init_ctx_from"] is None
    assert ckpt["state_dict"]["prompt_learner.ctx"].shape == (4, world.model.token_embedding.weight.shape[1])
    assert list((tmp_path / "data").rglob("shot_2-seed_1-dassl.json"))
