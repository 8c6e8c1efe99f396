"""W&B shows what users look at (issue 15 §5): every method's pictures, read back from the offline run.

Each test logs through the method's own code path into an offline W&B run under tmp_path, then reads the run back:
the history records of the run's ``.wandb`` file (a LevelDB-style log of protobuf ``Record`` messages) name the
media files, and the PNGs under ``wandb/offline-run-*/files/media/images/`` must hold real pictures (not black,
not constant), which is what a [0, 1] float image cast to uint8 by wandb fails.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from xclip.utils.wandb_setup import log_images, to_uint8_image


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # artifact staging (tables)
    import wandb

    wandb.teardown()  # wandb caches WANDB_DIR in a process-wide singleton: start each test from a fresh one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


# ------------------------------------------------------------------------------------------- reading a run back
def _records(path: Path):
    """Protobuf payloads of a .wandb file: 7-byte header ':W&B' + magic + version, then 32 KiB blocks of
    records (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def read_offline_run(root: Path) -> tuple[Path, dict[str, list[dict]]]:
    """(run dir, {top-level history key: [ {nested key: value} per logged step ]}) of the only offline run."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = sorted(Path(root).rglob("offline-run-*"))
    runs = [r for r in runs if r.is_dir()]
    assert len(runs) == 1, f"expected one offline run under {root}, found {runs}"
    (wfile,) = runs[0].glob("*.wandb")
    history: dict[str, list[dict]] = {}
    for raw in _records(wfile):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        step: dict[str, dict] = {}
        for item in rec.history.item:
            keys = list(item.nested_key) or [item.key]
            step.setdefault(keys[0], {})[".".join(keys[1:])] = json.loads(item.value_json)
        for k, v in step.items():
            history.setdefault(k, []).append(v)
    return runs[0], history


def _wait_for(root: Path, key: str, timeout: float = 60.0) -> tuple[Path, dict[str, list[dict]]]:
    """read_offline_run once ``key`` is in it: wandb-core may still be writing the run file after finish() returns
    (seen on a loaded machine)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        run_dir, history = read_offline_run(root)
        if key in history or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert key in history, f"{key!r} not logged; keys: {sorted(history)}"
    return run_dir, history


def logged_images(root: Path, key: str) -> tuple[list[np.ndarray], list[str]]:
    """Pixels and captions of every image logged under ``key`` in the offline run under ``root``."""
    run_dir, history = _wait_for(root, key)
    arrays, captions = [], []
    for entry in history[key]:
        assert entry.get("_type") == "images/separated" and entry.get("filenames"), entry
        for name in entry["filenames"]:
            path = run_dir / "files" / name
            assert path.is_file() and name.startswith("media/images/"), path
            arrays.append(np.asarray(Image.open(path).convert("RGB")))
        captions += entry.get("captions", [])
    return arrays, captions


def assert_real_picture(arr: np.ndarray, what: str) -> None:
    a = arr.astype(np.float64) / 255
    assert a.mean() > 0.03, f"{what}: black image (mean {a.mean():.4f})"
    assert a.mean() < 0.97, f"{what}: white image (mean {a.mean():.4f})"
    assert a.std() > 0.02, f"{what}: constant image (std {a.std():.4f})"
    assert len(np.unique(arr.reshape(-1, arr.shape[-1]), axis=0)) > 8, f"{what}: only a few colours"


# ------------------------------------------------------------------------------------------- the conversion
def test_to_uint8_image_maps_ranges_and_layouts():
    x = torch.rand(3, 5, 7)  # CHW in [0, 1]
    out = to_uint8_image(x)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert np.abs(out.astype(float) / 255 - x.permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    assert (to_uint8_image(x * 2 - 1, value_range=(-1, 1)).astype(int) - out.astype(int)).__abs__().max() <= 1
    assert to_uint8_image(x.permute(1, 2, 0).numpy()).tolist() == out.tolist()  # HWC numpy
    assert to_uint8_image(x[None]).shape == (5, 7, 3)  # [1, 3, H, W]
    assert to_uint8_image(torch.full((3, 4, 4), 2.0)).max() == 255  # clamped, never wrapped around
    assert to_uint8_image(Image.fromarray(out)).tolist() == out.tolist()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 2), dpi=20)
    fig.gca().imshow(out)
    assert to_uint8_image(fig).shape == (40, 40, 3)
    plt.close(fig)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_image(torch.rand(5, 6, 7, 8))


def test_log_images_through_a_wandb_run_reads_back(tmp_path):
    import wandb

    run = wandb.init(project="xclip-test")
    grid = torch.rand(3, 16, 16) * 0.8 + 0.1  # a float [0, 1] picture: wandb alone would store it black
    log_images(run, "check/float", [grid], captions=["float chw"])
    run.finish()
    (arr,), caps = logged_images(tmp_path, "check/float")
    assert caps == ["float chw"]
    assert_real_picture(arr, "float grid")
    assert np.abs(arr.astype(float) / 255 - grid.permute(1, 2, 0).numpy()).max() <= 1 / 255


# ------------------------------------------------------------------------------------------- per method
def test_styleclip_mapper_before_after_grid(tmp_path):
    from pytorch_lightning.loggers import WandbLogger

    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule

    torch.manual_seed(0)
    module = StyleCLIPMapperModule(backbone="tiny-vit-test", pretrained=None, description="a person with purple hair",
                                   generator_size=64, style_dim=64, n_mlp=2, channel_max=16, id_lambda=0.0,
                                   n_mean_latent=64, image_log_every_n_steps=0)
    logger = WandbLogger(project="xclip-test", save_dir=str(tmp_path), offline=True)
    module._trainer = SimpleNamespace(logger=logger, loggers=[logger], is_global_zero=True, global_step=3)
    try:
        w = module.to_w_plus(torch.randn(2, 64, generator=torch.Generator().manual_seed(1)))
        with torch.no_grad():
            module._log_pairs("val/edits", module.render(w), module.render(module.edit(w)))
    finally:
        module._trainer = None
        logger.experiment.finish()
    (grid,), caps = logged_images(tmp_path, "val/edits")
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3) and "before | after" in caps[0]
    assert_real_picture(grid, "mapper before|after grid")


def test_coop_validation_logs_relevance_overlays(tmp_path):
    import pytorch_lightning as pl
    from coop_data import make_colour_folder
    from pytorch_lightning.loggers import WandbLogger

    from xclip.datamodules.fewshot import FewShotDataModule
    from xclip.lightning_modules.base import connect
    from xclip.lightning_modules.coop import RELEVANCE_IMAGES, CoOp

    root = make_colour_folder(tmp_path / "colours", n_train=4, n_test=2, with_val=True)
    dm = FewShotDataModule(dataset=f"imagefolder:{root}", shots=2, data_dir=str(tmp_path / "data"), image_size=32,
                           batch_size=8, num_workers=0)
    model = CoOp("tiny-vit-test", None, n_ctx=4, warmup_epochs=0)
    connect(model, dm)  # the datamodule's class names build the prompts (xclip train does this)
    logger = WandbLogger(project="xclip-test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    logger.experiment.finish()
    arrays, caps = logged_images(tmp_path, "val/relevance")
    assert len(arrays) == RELEVANCE_IMAGES and all(c.startswith("true: ") and " | pred: " in c for c in caps)
    for i, a in enumerate(arrays):
        assert a.shape == (32, 32, 3)
        assert_real_picture(a, f"CoOp relevance overlay {i}")


def test_coop_relevance_overlay_is_the_relevance_map(tiny_backbone):
    """The overlay blends exactly image_relevance of the true class's prompt (not a stale or constant map)."""
    from xclip.lightning_modules.coop import CoOp
    from xclip.models.relevance import image_relevance, patch_grid
    from xclip.models.relevance_viz import overlay_relevance

    torch.manual_seed(0)
    m = CoOp("tiny-vit-test", None, classnames=["red", "green", "blue"], n_ctx=4)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([2, 0])
    with torch.inference_mode():  # as in Lightning's validation loop
        pics, caps = m.relevance_overlays(x, y)
    text = m.class_text_features().detach()
    rel = image_relevance(m.backbone, x, text_features=text[y])
    mean, std = torch.tensor(m.backbone.mean).view(3, 1, 1), torch.tensor(m.backbone.std).view(3, 1, 1)
    for i in range(2):
        ref = overlay_relevance((x[i] * std + mean).clamp(0, 1), rel[i, i].reshape(patch_grid(m.backbone)))
        assert np.array_equal(np.asarray(pics[i]), np.asarray(ref))
    assert caps[0].startswith("true: blue") and caps[1].startswith("true: red")


def test_zerocap_table_and_captioned_images(tmp_path):
    import random

    from _tiny_lm import random_gpt2

    from xclip.datamodules.synthetic_world import render_object
    from xclip.generation.zerocap import main

    lm, tok = random_gpt2(["Image of a red star", "a blue circle"] * 20)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rng = random.Random(0)
    (tmp_path / "imgs").mkdir()
    for i, (shape, colour) in enumerate([("star", "red"), ("circle", "blue")]):
        render_object(shape, colour, rng, image_size=32)[0].save(tmp_path / "imgs" / f"{i}.png")
    main(["--images", str(tmp_path / "imgs"), "--lm", str(tmp_path / "lm"), "--backbone", "tiny-vit-test",
          "--pretrained", "none", "--beam_size", "2", "--target_seq_length", "2", "--top_size", "8",
          "--num_iterations", "1", "--out", str(tmp_path / "caps.json"), "--device", "cpu", "--wandb", "true"])
    saved = json.loads((tmp_path / "caps.json").read_text())["captions"]
    arrays, caps = logged_images(tmp_path, "captions/images")
    assert len(arrays) == 2 and [c.split(" (CLIP-S")[0] for c in caps] == [r["caption"] for r in saved]
    for i, a in enumerate(arrays):
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "imgs" / f"{i}.png").convert("RGB")))
        assert_real_picture(a, f"zerocap image {i}")
    _, history = _wait_for(tmp_path, "captions")
    (table,) = history["captions"]
    assert table["_type"] == "table-file" and table["nrows"] == 2
    # the table itself (an artifact, staged under WANDB_DATA_DIR) holds image references, not the string "Image"
    staged = [json.loads(p.read_bytes()) for p in (tmp_path / "wandb_data").rglob("*") if p.is_file()
              and p.read_bytes()[:1] == b"{"]
    tables = [t for t in staged if t.get("_type") == "table" and t.get("columns") == ["image", "caption", "clip_s"]]
    assert tables, "the captions table was not staged"
    assert all(row[0]["_type"] == "image-file" for row in tables[0]["data"]), tables[0]["data"]


def test_demo_logs_its_figure(tmp_path):
    from xclip import demo

    demo.main(["--out", str(tmp_path / "demo"), "--pretrained", "none", "--fast", "true", "--n_train", "64",
               "--n_val", "32", "--n_attack", "20", "--epochs", "1"])
    (fig,), caps = logged_images(tmp_path, "demo/results")
    ref = np.asarray(Image.open(tmp_path / "demo" / "results.png").convert("RGB"))
    assert np.array_equal(fig, ref) and "demo figure" in caps[0]
    assert_real_picture(fig, "demo figure")
