"""Quintuples, the feature cache and bad input (spelling projections)."""
from __future__ import annotations

import random

import pytest
import torch
from PIL import Image, ImageChops

from xclip.datamodules.quintuples import (
    ImageFolderSource,
    QuintupleDataset,
    StyleConfig,
    SyntheticWorldSource,
    WordConfig,
    WordSampler,
    class_prompt,
    word_split,
)


@pytest.fixture
def folder(tmp_path):
    for c, col in (("great_white_shark", (90, 90, 200)), ("apple", (200, 30, 30))):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (80, 60), col).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_class_prompt_article_and_underscores():
    assert class_prompt("great_white_shark") == "an image of a great white shark"
    assert class_prompt("apple") == "an image of an apple"


def test_folder_quintuples_deterministic_aligned(folder):
    ds = QuintupleDataset(ImageFolderSource(folder), "train", n=4, seed=3, canvas_size=64,
                          style=StyleConfig(native_text=False))
    a, b = ds[1], ds[1]
    assert all(a[k] == b[k] for k in ("y_t", "y_i", "class_id", "real"))
    assert ImageChops.difference(a["x_it"], b["x_it"]).getbbox() is None
    assert a["x_i"].size == a["x_t"].size == a["x_it"].size == (64, 64)
    # x_t is white except the glyphs, and the glyph pixels coincide with where x_it differs from x_i
    glyphs = ImageChops.invert(a["x_t"].convert("L")).point(lambda v: 255 if v > 0 else 0).getbbox()
    changed = ImageChops.difference(a["x_i"], a["x_it"]).convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    assert glyphs == changed
    assert a["y_i"] in ("an image of a great white shark", "an image of an apple")


def test_word_sets_disjoint_and_nonsense_lengths():
    cfg = WordConfig(nonsense_min_len=3, nonsense_max_len=5)
    samplers = {s: WordSampler(s, cfg) for s in ("train", "val")}
    drawn = {s: {samplers[s].sample(random.Random(i)) for i in range(150)} for s in samplers}
    train_words = {w for w, _ in drawn["train"]}
    assert not train_words & {w for w, _ in drawn["val"]}
    assert all(word_split(w) == "val" for w, _ in drawn["val"])
    fake = [w for w, real in drawn["train"] if not real]
    assert fake and all(3 <= len(w) <= 5 and w.isalpha() for w in fake)
    assert any(real for _, real in drawn["train"])


def test_world_quintuples():
    ds = QuintupleDataset(SyntheticWorldSource(), "val", n=3, seed=0, canvas_size=64,
                          words=WordConfig(word_list="world", word_template="the word {}."),
                          style=StyleConfig(font_size=20))
    q = ds[0]
    assert q["y_t_text"] == f"the word {q['y_t']}."
    assert ImageChops.difference(q["x_i"], q["x_it"]).getbbox() is not None     # the word is on the object
    assert len(ds.class_prompts()) == 20 and "a photo of a red circle." in ds.class_prompts()[0]


# ---- bad input ------------------------------------------------------------------------------------------
def test_missing_font_file(folder):
    with pytest.raises(FileNotFoundError, match="nope.ttf"):
        QuintupleDataset(ImageFolderSource(folder), n=2, style=StyleConfig(fonts=["/nope/nope.ttf"]))


def test_empty_word_list(tmp_path):
    empty = tmp_path / "words.txt"
    empty.write_text("\n12\n")
    with pytest.raises(ValueError, match="words.txt"):
        WordSampler("train", WordConfig(word_list=str(empty)))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        WordSampler("train", WordConfig(word_list=str(tmp_path / "missing.txt")))


def test_long_word_shrinks_font(folder, tmp_path):
    words = tmp_path / "long.txt"
    words.write_text("internationalization\n")
    cfg = WordConfig(real_fraction=1.0, word_list=str(words), real_min_len=3, real_max_len=30,
                     split_fractions=(1.0, 0.0, 0.0))
    ds = QuintupleDataset(ImageFolderSource(folder), n=2, canvas_size=128, words=cfg,
                          style=StyleConfig(font_size=40, native_text=False))
    box = ImageChops.invert(ds[0]["x_t"].convert("L")).getbbox()
    assert box[0] >= 0 and box[2] <= 128 and box[3] - box[1] < 40   # shrunk below 40 px to fit the canvas
    tiny = QuintupleDataset(ImageFolderSource(folder), n=2, canvas_size=32, words=cfg,
                            style=StyleConfig(native_text=False))
    with pytest.raises(ValueError, match="internationalization.*does not fit"):
        tiny[0]                                  # a word that never fits (even at 6 px) fails clearly


def test_too_few_images(folder):
    with pytest.raises(ValueError, match="only 6 images but 10"):
        QuintupleDataset(ImageFolderSource(folder), n=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(folder / "nothing")


# ---- feature cache --------------------------------------------------------------------------------------
def test_feature_cache_hit_and_key(folder, tmp_path, tiny_backbone, monkeypatch):
    import xclip.datamodules.feature_cache as fc

    ds = QuintupleDataset(ImageFolderSource(folder), "train", n=4, canvas_size=64)
    feats = fc.cached_quintuple_features(tiny_backbone, ds, tmp_path / "cache", progress=False)
    assert feats["x_i"].shape == (4, 64) and feats["class_text"].shape == (2, 64)
    assert torch.allclose(feats["x_it"].norm(dim=-1), torch.ones(4), atol=1e-4)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    monkeypatch.setattr(fc, "encode_quintuples", lambda *a, **k: pytest.fail("cache miss"))
    again = fc.cached_quintuple_features(tiny_backbone, ds, tmp_path / "cache", progress=False)
    assert torch.equal(again["y_t"], feats["y_t"])
    other = QuintupleDataset(ImageFolderSource(folder), "train", n=4, seed=1, canvas_size=64)
    assert fc.cache_key(tiny_backbone, other.spec()) != fc.cache_key(tiny_backbone, ds.spec())


def test_train_py_tiny_config(tmp_path, monkeypatch):
    """train.py fit on the tiny config (world quintuples, random tiny-vit-test), then evaluate.py's loader."""
    from xclip import train
    from xclip.lightning_modules.spelling import load_projection

    monkeypatch.chdir(tmp_path)
    import pathlib
    cfg = pathlib.Path(__file__).resolve().parent.parent / "configs" / "spelling" / "tiny_test.yaml"
    torch.set_num_threads(1)
    train.main(["fit", "--config", str(cfg), "--data.init_args.n_train", "16", "--data.init_args.n_val", "8"])
    ckpt = tmp_path / "runs" / "spelling_tiny" / "checkpoints" / "last.ckpt"
    W = load_projection(ckpt, expected_backbone={"name": "tiny-vit-test", "pretrained": None})
    assert W.shape == (16, 64)
