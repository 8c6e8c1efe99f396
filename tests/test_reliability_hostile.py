"""Hostile-file battery: every entry point that reads a user-supplied file refuses hostile files clearly.

Each hostile file (classic ``__reduce__`` payload, dotted global through ``torch._utils``, a class path in the
checkpoint metadata, a TorchScript archive, plain pickles, a zip with extra records, truncated / garbage / empty
files, a YAML python tag, a numpy object array) is fed to each entry point in ``ENTRY_POINTS``; every pair must raise
an error whose message names the file, and no payload may run (it would create a marker file).

``ENTRY_POINTS`` must name exactly the inputs listed in ``xclip.utils.io.FILE_INPUTS`` (the one documented list);
CLI flags are spelled in the small adapters below, so a renamed flag is fixed in one place.
"""
from __future__ import annotations

import ast
import io
import os
import pickle
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from xclip.utils.io import FILE_INPUTS

pytestmark = pytest.mark.reliability
PACKAGE = Path(__file__).resolve().parent.parent


# ---- hostile files -----------------------------------------------------------------------------------------
def _marker(tmp: Path) -> Path:
    return tmp / "PWNED"


class _Reduce:
    """Unpickling this runs ``touch <marker>`` (the classic payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dotted_pickle(marker: Path) -> bytes:
    """Protocol 4: STACK_GLOBAL('torch._utils', '_rebuild_tensor.__builtins__.get')('eval')("...touch...")."""
    def s(x: str) -> bytes:
        b = x.encode()
        return b"\x8c" + bytes([len(b)]) + b if len(b) < 256 else b"X" + len(b).to_bytes(4, "little") + b

    code = f"__import__('os').system('touch {marker}')"
    return (b"\x80\x04" + s("torch._utils") + s("_rebuild_tensor.__builtins__.get") + b"\x93"
            + s("eval") + b"\x85R" + s(code) + b"\x85R" + b".")


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_with_data_pkl(payload: bytes) -> bytes:
    """A torch zip archive whose data.pkl is ``payload``."""
    src = zipfile.ZipFile(io.BytesIO(_torch_bytes({"x": 1})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, payload if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def _zip_extra_records(marker: Path) -> bytes:
    """A valid torch file of unrelated content plus extra records: a pickle payload and a duplicate data.pkl."""
    evil = pickle.dumps({"evil": _Reduce(marker)}, protocol=2)
    buf = io.BytesIO(_torch_bytes({"unrelated": torch.zeros(2)}))
    prefix = zipfile.ZipFile(buf).namelist()[0].split("/")[0]
    buf.seek(0, io.SEEK_END)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name" is the point
        with zipfile.ZipFile(buf, "a") as z:
            z.writestr(f"{prefix}/extra.pkl", evil)
            z.writestr(f"{prefix}/data.pkl", evil)
    return buf.getvalue()


def _torchscript() -> bytes:
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(torch.zeros(4, 4))

        def forward(self, x):
            return x @ self.W

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(M()), buf)
    return buf.getvalue()


def _npy_object(marker: Path) -> bytes:
    buf = io.BytesIO()
    arr = np.empty(1, dtype=object)
    arr[0] = _Reduce(marker)
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


HOSTILE: dict[str, Callable[[Path], bytes]] = {
    "reduce": lambda m: _torch_bytes({"state_dict": {"W": torch.zeros(2, 2)}, "evil": _Reduce(m)}),
    "dotted_global": lambda m: _zip_with_data_pkl(_dotted_pickle(m)),
    "dotted_plain": _dotted_pickle,
    "method_class_path": lambda m: _torch_bytes({
        "state_dict": {"W": torch.zeros(2, 2)}, "method": "subprocess.Popen", "backbone": {"name": "tiny-vit-test"},
        "hyper_parameters": {"args": ["touch", str(m)]}, "pytorch-lightning_version": "2.6.6", "epoch": 0,
        "global_step": 0}),
    "torchscript": lambda m: _torchscript(),
    "plain_pickle": lambda m: pickle.dumps({"state_dict": {}, "evil": _Reduce(m)}, protocol=2),
    "zip_extra_records": _zip_extra_records,
    "truncated": lambda m: _torch_bytes({"state_dict": {"W": torch.randn(64, 64)}})[:3000],
    "garbage": lambda m: random.Random(0).randbytes(1 << 20),
    "empty": lambda m: b"",
    "yaml_python_tag": lambda m: f"!!python/object/apply:os.system ['touch {m}']\n".encode(),
    "npy_object": _npy_object,
}


# ---- entry points --------------------------------------------------------------------------------------------
@dataclass
class EntryPoint:
    """``call(file, tmp)`` feeds the hostile ``file`` (already at ``tmp / where``) to one entry point.

    ``recomputes``: a cache whose readable content is incomplete is recomputed and replaced (with a warning naming
    it) instead of raising; ``call`` then returns the cache path. Unreadable files must still raise.
    """
    call: Callable[[Path, Path], Any]
    where: str = "input.pt"
    recomputes: bool = False


TOY_CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False},
    "model": {"class_path": "_toy_methods.ToyProjection", "init_args": {"k": 8}},
    "data": {"class_path": "_toy_methods.ToyData", "init_args": {"n": 4}},
}


def _train_ckpt_path(f: Path, tmp: Path):
    from xclip import train

    cfg = dict(TOY_CONFIG, trainer=dict(TOY_CONFIG["trainer"], default_root_dir=str(tmp / "run")))
    (tmp / "toy.yaml").write_text(yaml.safe_dump(cfg))
    train.main(["fit", "--config", str(tmp / "toy.yaml"), "--ckpt_path", str(f)])


def _train_config(f: Path, tmp: Path):
    from xclip import train

    train.main(["fit", "--config", str(f)])


def _evaluate(*flags: str):
    def call(f: Path, tmp: Path):
        from xclip import evaluate

        args = [a.replace("{f}", str(f)).replace("{tmp}", str(tmp)) for a in flags]
        evaluate.main([*args, "--out", str(tmp / "results.json"), "--device", "cpu"])
    return call


def _generate(*flags: str, setup: Callable[[Path], None] | None = None):
    def call(f: Path, tmp: Path):
        from xclip import generate

        if setup is not None:
            setup(tmp)
        generate.main([a.replace("{f}", str(f)).replace("{tmp}", str(tmp)) for a in flags])
    return call


def _tiny_vqgan_yaml(tmp: Path) -> None:
    from xclip.models.vqgan import TINY_DDCONFIG, taming_yaml

    (tmp / "vqgan.yaml").write_text(taming_yaml(TINY_DDCONFIG, 32, 8))


def _tiny_vqgan_ckpt(tmp: Path) -> None:
    """A genuine tiny taming-layout ckpt, so that the hostile yaml beside it is what gets read."""
    from xclip.models.vqgan import tiny_vqgan

    torch.save({"state_dict": tiny_vqgan(n_embed=32, embed_dim=8).state_dict()}, tmp / "good.ckpt")


TINY_GEN = ["--generator.size", "8", "--generator.style_dim", "8", "--generator.n_mlp", "1",
            "--generator.channel_max", "8", "--generator.channel_multiplier", "1", "--backbone", "tiny-vit-test",
            "--pretrained", "none", "--device", "cpu", "--progress", "false"]


def _styleclip_global_stats(f: Path, tmp: Path):
    """Hostile file in --cache-dir where the S statistics cache of this run is looked up."""
    from xclip.generation import global_directions as gd

    ident = {"generator_checkpoint": "None", "seed": 0, "stats_samples": 4, "arch": [1, 1, 8]}
    (tmp / "cache").mkdir(exist_ok=True)
    shutil.copy(f, tmp / "cache" / f"s_stats_{gd._cache_key(ident)}.pt")
    from xclip import generate

    generate.main(["styleclip-global", "--neutral", "face", "--target", "smiling face", "--stats_samples", "4",
                   "--n_images", "2", "--cache_dir", str(tmp / "cache"), "--out", str(tmp / "out"), *TINY_GEN])


def _analyze(*flags: str):
    def call(f: Path, tmp: Path):
        from xclip import analyze

        analyze.main([a.replace("{f}", str(f)).replace("{tmp}", str(tmp)) for a in flags])
    return call


def _store_manifest(f: Path, tmp: Path):
    from xclip.analysis.store import ShardedArray

    ShardedArray(f.parent, f.stem)


def _store_shard(f: Path, tmp: Path):
    import json

    from xclip.analysis.store import ShardedArray

    (f.parent / "heads.json").write_text(json.dumps({"item_shape": [2], "dtype": "<f4", "complete": True,
                                                     "shards": [{"file": f.name, "rows": 1}]}))
    ShardedArray(f.parent, "heads").shard(0)


def _mapper_file(f: Path, tmp: Path):
    from xclip.models.mapper import LevelsMapper, load_styleclip_mapper

    load_styleclip_mapper(f, LevelsMapper(latent_dim=8))


_FEATURE_CACHE_BACKBONE: dict[str, Any] = {}


def _feature_cache(f: Path, tmp: Path):
    from PIL import Image

    import xclip.datamodules.feature_cache as fc
    from xclip.datamodules.quintuples import ImageFolderSource, QuintupleDataset
    from xclip.models.clip_backbone import build_clip

    for c in ("apple", "pear"):
        (tmp / "imgs" / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (30 * i, 90, 200)).save(tmp / "imgs" / c / f"{i}.png")
    if "backbone" not in _FEATURE_CACHE_BACKBONE:  # built once: the cache key depends on its spec, not its weights
        _FEATURE_CACHE_BACKBONE["backbone"] = build_clip("tiny-vit-test").freeze()
    backbone = _FEATURE_CACHE_BACKBONE["backbone"]
    ds = QuintupleDataset(ImageFolderSource(tmp / "imgs"), "train", n=2, canvas_size=32)
    path = tmp / "cache" / f"quintuples-{ds.split}-{fc.cache_key(backbone, ds.spec())}.pt"
    path.parent.mkdir(exist_ok=True)
    shutil.copy(f, path)
    fc.cached_quintuple_features(backbone, ds, tmp / "cache", progress=False)
    return path


def _fewshot_split(f: Path, tmp: Path):
    from PIL import Image

    from xclip.datamodules.fewshot import ImageFolderSource, load_or_create_manifest

    for c in ("apple", "pear"):
        (tmp / "ds" / "train" / c).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp / "ds" / "train" / c / "0.png")
    load_or_create_manifest(ImageFolderSource(tmp / "ds"), f, shots=1, seed=1)


def _zerocap_references(f: Path, tmp: Path):
    from xclip.generation.zerocap import reference_metrics

    reference_metrics([{"image": "a.png", "caption": "a cat"}], str(f))


def _clip_pretrain_export(f: Path, tmp: Path):
    from xclip.lightning_modules import clip_pretrain

    clip_pretrain.main(["export", str(f), "--out", str(tmp / "exported.pt")])


def _spatial_prompts(f: Path, tmp: Path):
    from xclip.evaluation.spatial_generation import load_layouts

    load_layouts(str(f), 64)


def _coop_split_fewshot(f: Path, tmp: Path):
    from xclip.datamodules.coop_datasets import read_split_fewshot_pkl

    read_split_fewshot_pkl(f)


def _coop_init_ctx_from(f: Path, tmp: Path):
    from xclip.lightning_modules.coop import CoOp

    CoOp(backbone="tiny-vit-test", pretrained=None, classnames=["apple", "pear"], n_ctx=4, init_ctx_from=str(f))


EVAL_TINY = ["--backbone", "tiny-vit-test"]
VQ = ["vqgan-clip", "--prompts", "0,0,16,16=a cat", "--width", "32", "--height", "32", "--backbone", "tiny-vit-test",
      "--pretrained", "none", "--device", "cpu", "--out", "{tmp}/o", "--progress", "false"]
ENTRY_POINTS: dict[str, EntryPoint] = {
    "train --ckpt_path": EntryPoint(_train_ckpt_path, "resume.ckpt"),
    "train --config": EntryPoint(_train_config, "config.yaml"),
    "evaluate --ckpt": EntryPoint(_evaluate("--ckpt", "{f}", "--suite", "world"), "method.ckpt"),
    "evaluate --ckpt (CoOp prompt file)": EntryPoint(_evaluate(*EVAL_TINY, "--ckpt", "{f}", "--suite", "world"),
                                                     "prompt_learner/model.pth.tar-50"),
    "train --model.init_args.init_ctx_from": EntryPoint(_coop_init_ctx_from, "prompt_learner/model-best.pth.tar"),
    "CoOp split_fewshot pkl": EntryPoint(_coop_split_fewshot, "split_fewshot/shot_1-seed_1.pkl"),
    "evaluate --projection": EntryPoint(_evaluate(*EVAL_TINY, "--projection", "{f}", "--suite", "world"), "W.ckpt"),
    "evaluate --pretrained": EntryPoint(_evaluate(*EVAL_TINY, "--pretrained", "{f}", "--suite", "world"), "clip.pt"),
    "evaluate --saliency-prf-file": EntryPoint(_evaluate(*EVAL_TINY, "--suite", "saliency_prf",
                                                         "--saliency_prf.file", "{f}"), "maps.pt"),
    "evaluate --spatial-generation-prompts": EntryPoint(_spatial_prompts, "layouts.json"),
    "evaluate --spatial-generation-vqgan-ckpt": EntryPoint(_evaluate(
        *EVAL_TINY, "--suite", "spatial_generation", "--spatial_generation.vqgan_config", "{tmp}/vqgan.yaml",
        "--spatial_generation.vqgan_ckpt", "{f}", "--spatial_generation.out", "{tmp}/sg"), "vqgan.ckpt"),
    "evaluate --spatial-generation-vqgan-config": EntryPoint(_evaluate(
        *EVAL_TINY, "--suite", "spatial_generation", "--spatial_generation.vqgan_config", "{f}",
        "--spatial_generation.out", "{tmp}/sg"), "vqgan.yaml"),
    "evaluate --config": EntryPoint(_evaluate("--config", "{f}", *EVAL_TINY, "--suite", "world"), "eval.yaml"),
    "analyze --config": EntryPoint(_analyze("segment", "--config", "{f}", "--backbone", "tiny-vit-test",
                                            "--data", "world:2", "--device", "cpu"), "analyze.yaml"),
    "generate --config": EntryPoint(_generate("styleclip-optimize", "--config", "{f}", "--out", "{tmp}/o",
                                              *TINY_GEN), "options.yaml"),
    "generate styleclip-mapper --ckpt": EntryPoint(_generate("styleclip-mapper", "--ckpt", "{f}", "--n_random", "1",
                                                             "--out", "{tmp}/o", "--progress", "false"), "mapper.ckpt"),
    "generate styleclip-optimize --generator-checkpoint": EntryPoint(_generate(
        "styleclip-optimize", "--steps", "1", "--out", "{tmp}/o", *TINY_GEN, "--generator.checkpoint", "{f}"), "G.pt"),
    "generate styleclip-optimize --latent-path": EntryPoint(_generate(
        "styleclip-optimize", "--steps", "1", "--out", "{tmp}/o", *TINY_GEN, "--latent_path", "{f}"), "latent.pt"),
    "generate styleclip-optimize --arcface-checkpoint": EntryPoint(_generate(
        "styleclip-optimize", "--steps", "1", "--out", "{tmp}/o", *TINY_GEN, "--id_lambda", "0.1",
        "--arcface_checkpoint", "{f}"), "model_ir_se50.pth"),
    "generate styleclip-global --latent-path": EntryPoint(_generate(
        "styleclip-global", "--neutral", "face", "--target", "smiling face", "--out", "{tmp}/o",
        "--cache_dir", "{tmp}/cache", *TINY_GEN, "--latent_path", "{f}"), "latents.pt"),
    "generate styleclip-global --cache-dir": EntryPoint(_styleclip_global_stats, "stats.pt"),
    "generate vqgan-clip --vqgan_ckpt": EntryPoint(_generate(
        *VQ, "--vqgan_config", "{tmp}/vqgan.yaml", "--vqgan_ckpt", "{f}", setup=_tiny_vqgan_yaml), "vqgan.ckpt"),
    "generate vqgan-clip --vqgan_config": EntryPoint(_generate(*VQ, "--vqgan_config", "{f}", "--vqgan_ckpt",
                                                               "{tmp}/good.ckpt", setup=_tiny_vqgan_ckpt), "vqgan.yaml"),
    "generate vqgan-clip --projection": EntryPoint(_generate(*VQ, "--projection", "{f}"), "W.ckpt"),
    "generate zerocap --references": EntryPoint(_zerocap_references, "refs.json"),
    "analyze --pretrained": EntryPoint(_analyze("segment", "--backbone", "tiny-vit-test", "--pretrained", "{f}",
                                                "--data", "world:2", "--device", "cpu"), "clip.pt"),
    "analyze --store (manifest)": EntryPoint(_store_manifest, "store/heads.json"),
    "analyze --store (shard)": EntryPoint(_store_shard, "store/heads-00000.npy"),
    "mapper file": EntryPoint(_mapper_file, "mapper.pt"),
    "feature cache": EntryPoint(_feature_cache, "features.pt", recomputes=True),
    "few-shot split": EntryPoint(_fewshot_split, "split_1shot_seed1.json"),
    "clip_pretrain export": EntryPoint(_clip_pretrain_export, "pretrain.ckpt"),
}

REFUSED: list[tuple[str, str]] = []  # filled as the battery runs; reported by the summary test


def _setup_for(name: str, tmp: Path) -> None:
    if "vqgan-ckpt" in name:
        _tiny_vqgan_yaml(tmp)


def test_entry_points_are_the_documented_list():
    assert set(ENTRY_POINTS) == set(FILE_INPUTS), (
        f"not covered: {sorted(set(FILE_INPUTS) - set(ENTRY_POINTS))}; "
        f"undocumented: {sorted(set(ENTRY_POINTS) - set(FILE_INPUTS))}")


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_hostile_file_refused(entry, hostile, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository even if an entry point writes defaults
    marker = _marker(tmp_path)
    ep = ENTRY_POINTS[entry]
    f = tmp_path / ep.where
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(HOSTILE[hostile](marker))
    _setup_for(entry, tmp_path)
    try:
        result = ep.call(f, tmp_path)
    except BaseException as e:  # noqa: BLE001 -- SystemExit counts: the CLI refused
        err = e
    else:
        assert not marker.exists(), f"{entry} ran the payload of {hostile}"
        assert ep.recomputes, f"{entry} accepted the {hostile} file"
        assert any(str(result) in r.getMessage() for r in caplog.records if r.levelname == "WARNING"), \
            f"{entry} replaced the {hostile} file without a warning naming it"
        from xclip.utils.io import safe_torch_load

        assert isinstance(safe_torch_load(result), dict)  # the bad content was replaced by a valid cache
        REFUSED.append((entry, hostile))
        return
    msg = str(err.code) if isinstance(err, SystemExit) else str(err)
    assert not marker.exists(), f"{entry} ran the payload of {hostile}"
    assert not isinstance(err, (KeyboardInterrupt, MemoryError)), msg
    named = [p for p in (f, *tmp_path.rglob(f.name)) if str(p) in msg] or \
        [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size == f.stat().st_size and str(p) in msg]
    assert named, f"{entry} / {hostile}: message does not name the file:\n{type(err).__name__}: {msg[:1500]}"
    REFUSED.append((entry, hostile))


# ---- static audit: every loader call in the package is a safe one ----------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, base, name


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return getattr(k.value, "value", k.value)
    return None


# exact-allowlist unpicklers, each fed the battery through an entry point above
REVIEWED_UNPICKLERS = {"datamodules/coop_datasets.py": "CoOp split_fewshot pkl"}


def test_every_loader_in_the_package_is_safe():
    assert set(REVIEWED_UNPICKLERS.values()) <= set(ENTRY_POINTS)
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("tests", ".venv") or "site-packages" in rel.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, base, name in _calls(tree):
            where = f"{rel}:{node.lineno}"
            if base == "torch" and name == "load" and _kw(node, "weights_only") is not True:
                bad.append(f"{where} torch.load without weights_only=True")
            if base in ("np", "numpy") and name == "load" and _kw(node, "allow_pickle") is not False:
                bad.append(f"{where} np.load without allow_pickle=False")
            if base == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
                bad.append(f"{where} yaml.{name} (use yaml.safe_load)")
            if base in ("pickle", "cPickle", "dill", "joblib", "marshal") and name in ("load", "loads"):
                bad.append(f"{where} {base}.{name}")
            if name == "Unpickler" and str(rel) not in REVIEWED_UNPICKLERS:
                bad.append(f"{where} custom Unpickler (exact allowlist? add it to REVIEWED_UNPICKLERS and the battery)")
            if base == "importlib" and name == "import_module" and not any(
                    isinstance(a, (ast.Constant, ast.JoinedStr, ast.Subscript, ast.Name)) for a in node.args):
                bad.append(f"{where} importlib.import_module of a computed name")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                bad.append(f"{where} {name}()")
    assert not bad, "unsafe loaders:\n" + "\n".join(bad)


def test_import_module_names_come_from_code_tables():
    """importlib.import_module is only called on names from fixed tables in code (cli, evaluate, generate, the
    package __init__'s _API)."""
    allowed = {"cli.py", "evaluate.py", "generate.py", "__init__.py"}
    users = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("tests", ".venv"):
            continue
        for node, base, name in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            if base == "importlib" and name == "import_module":
                users.add(str(rel))
    assert users <= allowed, f"import_module outside the fixed tables: {sorted(users - allowed)}"


def test_battery_summary(request):
    """Runs last in this file: reports how many (entry point, hostile file) pairs were refused."""
    n = len(ENTRY_POINTS) * len(HOSTILE)
    print(f"\nhostile battery: {len(REFUSED)}/{n} refused ({len(ENTRY_POINTS)} entry points x {len(HOSTILE)} files)")


# ---- the method table ------------------------------------------------------------------------------------
def _slim_ckpt(path: Path, method: Any, hparams: dict | None = None, state: dict | None = None) -> Path:
    torch.save({"state_dict": state if state is not None else {"W": torch.zeros(8, 64)}, "method": method,
                "backbone": {"name": "tiny-vit-test", "pretrained": None},
                "hyper_parameters": hparams if hparams is not None else {"backbone": "tiny-vit-test",
                                                                         "pretrained": None, "k": 8}}, path)
    return path


def test_method_table_names_and_legacy_strings():
    from xclip.lightning_modules.base import LEGACY_METHOD_NAMES, METHODS, method_name, method_table
    from xclip.lightning_modules.coop import CoOp

    table = method_table()
    assert set(table) == set(METHODS) == {"CoOp", "SpellingProjection", "StyleCLIPMapperModule", "ClipPretrain"}
    for name, cls in table.items():
        assert (cls.__module__, cls.__qualname__) == METHODS[name] and method_name(cls) == name
    assert LEGACY_METHOD_NAMES["lightning_modules.coop.CoOp"] == "CoOp"
    assert LEGACY_METHOD_NAMES["xclip.lightning_modules.coop.CoOp"] == "CoOp"
    assert table[LEGACY_METHOD_NAMES["lightning_modules.spelling.SpellingProjection"]] is not CoOp


def test_unknown_method_names_the_file_and_the_allowed_ones(tmp_path):
    import sys

    from xclip.lightning_modules.base import load_method_checkpoint

    probe = _slim_ckpt(tmp_path / "probe.ckpt", "xclip_hostile_probe.Evil")
    with pytest.raises(RuntimeError, match=r"probe\.ckpt: unknown method 'xclip_hostile_probe\.Evil'.*allowed "
                                           r"methods: ClipPretrain, CoOp, SpellingProjection, StyleCLIPMapperModule"):
        load_method_checkpoint(probe)
    assert "xclip_hostile_probe" not in sys.modules
    popen = _slim_ckpt(tmp_path / "popen.ckpt", "subprocess.Popen", {"args": ["touch", str(_marker(tmp_path))]})
    with pytest.raises(RuntimeError, match="popen.ckpt: unknown method 'subprocess.Popen'"):
        load_method_checkpoint(popen)
    assert not _marker(tmp_path).exists()
    with pytest.raises(RuntimeError, match=r"notastr\.ckpt: unknown method '<list>'"):
        load_method_checkpoint(_slim_ckpt(tmp_path / "notastr.ckpt", ["subprocess", "Popen"]))


def test_caller_methods_are_passed_in_code_and_expected_mismatch_names_both(tmp_path):
    from _toy_methods import OtherToy, ToyProjection

    from xclip.lightning_modules.base import load_method_checkpoint
    from xclip.lightning_modules.coop import CoOp
    from xclip.lightning_modules.spelling import SpellingProjection

    toy = _slim_ckpt(tmp_path / "toy.ckpt", "ToyProjection")
    with pytest.raises(RuntimeError, match="toy.ckpt: unknown method 'ToyProjection'"):
        load_method_checkpoint(toy)  # a caller's class is known only when passed in code
    module = load_method_checkpoint(toy, methods={"ToyProjection": ToyProjection})
    assert isinstance(module, ToyProjection) and module.W.shape == (8, 64)
    assert isinstance(load_method_checkpoint(toy, expected=ToyProjection), ToyProjection)
    with pytest.raises(RuntimeError, match="toy.ckpt holds a ToyProjection checkpoint, expected OtherToy"):
        load_method_checkpoint(toy, expected=OtherToy)
    with pytest.raises(ValueError, match="would replace the project's CoOp"):
        load_method_checkpoint(toy, methods={"CoOp": ToyProjection})
    spelling = _slim_ckpt(tmp_path / "spelling.ckpt", "xclip.lightning_modules.spelling.SpellingProjection")
    with pytest.raises(RuntimeError, match="spelling.ckpt holds a SpellingProjection checkpoint, expected CoOp"):
        load_method_checkpoint(spelling, expected=CoOp)
    legacy = load_method_checkpoint(_slim_ckpt(tmp_path / "legacy.ckpt", "lightning_modules.spelling.SpellingProjection",
                                               state={"W": torch.zeros(8, 64)}), expected=SpellingProjection)
    assert isinstance(legacy, SpellingProjection)


def test_hyper_parameters_must_be_init_arguments(tmp_path):
    from _toy_methods import ToyProjection

    from xclip.lightning_modules.base import load_method_checkpoint

    bad = _slim_ckpt(tmp_path / "inject.ckpt", "ToyProjection",
                     {"backbone": "tiny-vit-test", "pretrained": None, "k": 8, "cmd": "rm -rf /"})
    with pytest.raises(RuntimeError, match=r"inject\.ckpt: hyper_parameters \['cmd'\] are not arguments of "
                                           r"ToyProjection"):
        load_method_checkpoint(bad, methods={"ToyProjection": ToyProjection})
    with pytest.raises(RuntimeError, match=r"list\.ckpt: 'hyper_parameters' is a list"):
        load_method_checkpoint(_slim_ckpt(tmp_path / "list.ckpt", "ToyProjection", ["x"]),
                               methods={"ToyProjection": ToyProjection})
    with pytest.raises(RuntimeError, match=r"override\.ckpt: hyper_parameters \['kk'\]"):
        load_method_checkpoint(_slim_ckpt(tmp_path / "override.ckpt", "ToyProjection"),
                               methods={"ToyProjection": ToyProjection}, overrides={"kk": 1})


def test_mapper_checkpoint_with_bad_hyper_parameters_names_the_file(tmp_path):
    from xclip.generation.styleclip_mapper import read_mapper_source

    bad = _slim_ckpt(tmp_path / "mapper.ckpt", "StyleCLIPMapperModule", ["generator_size", 64])
    with pytest.raises(RuntimeError, match=r"mapper\.ckpt: 'hyper_parameters' is a list"):
        read_mapper_source(str(bad))


# ---- train --ckpt_path ------------------------------------------------------------------------------------
def _toy_yaml(tmp: Path, model: str = "ToyProjection", max_steps: int = 2, checkpointing: bool = True) -> Path:
    trainer = dict(TOY_CONFIG["trainer"], max_steps=max_steps, enable_checkpointing=checkpointing,
                   default_root_dir=str(tmp / "run"))
    cfg = dict(TOY_CONFIG, trainer=trainer, model={"class_path": f"_toy_methods.{model}", "init_args": {"k": 8}})
    path = tmp / f"{model}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_accepts_own_checkpoint_and_refuses_another_method(tmp_path):
    from xclip import train

    train.main(["fit", "--config", str(_toy_yaml(tmp_path))])
    ckpt = sorted((tmp_path / "run").rglob("*.ckpt"))[-1]
    cfg = yaml.safe_load(_toy_yaml(tmp_path, max_steps=3).read_text())
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(cfg))
    cli = train.main(["fit", "--config", str(tmp_path / "more.yaml"), "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 3  # resumed from step 2
    with pytest.raises(SystemExit, match=rf"--ckpt_path {ckpt}: holds a ToyProjection checkpoint, but the config "
                                           r"trains OtherToy"):
        train.main(["fit", "--config", str(_toy_yaml(tmp_path, "OtherToy", 3)), "--ckpt_path", str(ckpt)])


def test_resume_never_reconfigures_from_the_checkpoint_class_path(tmp_path):
    """LightningCLI's default would turn a checkpoint's hyper_parameters._class_path into the model class."""
    import sys

    from xclip import train

    train.main(["fit", "--config", str(_toy_yaml(tmp_path))])
    ckpt = torch.load(sorted((tmp_path / "run").rglob("*.ckpt"))[-1], weights_only=True)
    ckpt["hyper_parameters"] = {"_class_path": "xclip_hostile_probe.Model", "k": 8}
    del ckpt["method"]
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(SystemExit, match=r"evil\.ckpt: holds a Model checkpoint, but the config trains ToyProjection"):
        train.main(["fit", "--config", str(_toy_yaml(tmp_path, max_steps=3)), "--ckpt_path",
                    str(tmp_path / "evil.ckpt")])
    assert "xclip_hostile_probe" not in sys.modules  # LightningCLI's default would have imported it


# ---- atomic writes honour the umask ------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    from xclip.utils.io import AtomicCheckpointIO, atomic_torch_save, atomic_write_bytes, atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json({"a": 1}, tmp_path / "a.json")
        atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "a.pt")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "a.ckpt")
        (tmp_path / "plain.txt").write_text("x")  # what open() gives: the reference
    finally:
        os.umask(old)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in ("a.bin", "a.json", "a.pt", "a.ckpt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
    assert not list(tmp_path.glob(".*.tmp"))
