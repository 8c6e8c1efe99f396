"""`xclip explain` and xclip.models.explain: files written, maps equal the per-pair views, early errors, config."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xclip import explain_cli
from xclip.models.explain import explain, grid_png_size

TEXTS = ["a photo of a red star.", "a blue circle.", "a green tree."]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world_images(tmp_path_factory) -> list[str]:
    from xclip.datamodules.synthetic_world import render_object

    root = tmp_path_factory.mktemp("world")
    rng = random.Random(0)
    paths = []
    for shape, colour in (("star", "red"), ("circle", "blue")):
        img, _ = render_object(shape, colour, rng, image_size=64)
        paths.append(str(root / f"{colour}_{shape}.png"))
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def world_clip():
    from xclip.models.clip_backbone import build_clip

    return build_clip("tiny-vit-world", "synthetic-world").freeze()


def test_cli_writes_png_grid_and_html(world_images, tmp_path):
    out = tmp_path / "explain"
    rc = explain_cli.main(["--image", *world_images, "--text", *TEXTS, "--out", str(out)])
    assert rc == 0
    png = Image.open(out / "explain.png")
    assert png.size == grid_png_size(2, 3)
    arr = np.asarray(png.convert("RGB")).astype(np.float32)
    assert arr.std() > 30 and (arr < 250).mean() > 0.3  # a real picture, not a blank canvas
    page = (out / "explain.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "a blue circle." in page
    assert "<script" not in page and "http" not in page.split("<body>")[1]  # self-contained, no remote assets


def test_explain_maps_equal_per_pair_views(world_images, world_clip):
    from xclip.models.relevance import image_relevance, patch_grid, text_relevance

    res = explain(world_clip, world_images, TEXTS)
    x = torch.stack([world_clip.preprocess(Image.open(p).convert("RGB")) for p in world_images])
    tokens = world_clip.tokenize(TEXTS)
    assert res.image_relevance.shape == (2, 3, *patch_grid(world_clip)) and res.text_relevance.shape == (2, 3, tokens.shape[1])
    for b in range(2):
        for c in range(3):
            img = image_relevance(world_clip, x[b:b + 1], tokens[c:c + 1])[0, 0]
            txt = text_relevance(world_clip, x[b:b + 1], tokens[c:c + 1])[0, 0]
            torch.testing.assert_close(res.image_relevance[b, c].flatten(), img, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(res.text_relevance[b, c], txt, atol=1e-5, rtol=1e-5)
    # the world CLIP knows its world: each image's best text is its own caption
    assert res.similarity.argmax(-1).tolist() == [0, 1]
    pieces, scores = res.token_scores(0, 0)
    assert pieces == ["a", "photo", "of", "a", "red", "star", "."] and abs(float(scores.sum()) - 1) < 1e-5


def test_bad_image_path_fails_before_work(world_images, tmp_path, capsys, monkeypatch):
    import xclip.models.clip_backbone as cb

    monkeypatch.setattr(cb, "build_clip", lambda *a, **k: pytest.fail("model built before the inputs were checked"))
    out = tmp_path / "never"
    rc = explain_cli.main(["--image", world_images[0], str(tmp_path / "missing.png"), "--text", "a star",
                           "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.png: no such file" in err and not out.exists()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rc = explain_cli.main(["--image", str(tmp_path / "broken.png"), "--text", "a star", "--out", str(out)])
    assert rc == 2 and "broken.png" in capsys.readouterr().err


def test_unwritable_out_fails_before_work(world_images, tmp_path, capsys, monkeypatch):
    import xclip.models.clip_backbone as cb

    monkeypatch.setattr(cb, "build_clip", lambda *a, **k: pytest.fail("model built before --out was checked"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = explain_cli.main(["--image", world_images[0], "--text", "a star", "--out", str(blocker / "sub")])
    assert rc == 2 and "not a writable folder" in capsys.readouterr().err


def test_example_config_parses_and_print_config_round_trips(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any folder: the example's relative image paths are found next to the config
    parser = explain_cli.build_parser()
    example = str(REPO / "configs/explain/world_example.yaml")
    cfg = parser.parse_args(["--config", example, "--out", str(tmp_path)])
    assert cfg.text == TEXTS and cfg.backbone == "tiny-vit-world"
    assert all(Path(p).is_file() for p in explain_cli.image_paths(cfg))
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", example, "--out", str(tmp_path),
                           "--start_layer_image", "0", "--print_config"])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(capsys.readouterr().out)
    again = parser.parse_args(["--config", str(dumped)])
    assert again.start_layer_image == 0 and again.image == cfg.image and again.out == str(tmp_path)


def test_relative_image_paths_follow_the_config_file_not_the_working_folder(world_images, tmp_path, monkeypatch):
    """In a --config, a relative image path is relative to the config's folder even when the working folder holds
    a file of the same name; on the command line it is relative to the working folder."""
    import shutil

    cfg_dir, cwd = tmp_path / "cfgs", tmp_path / "elsewhere"
    (cfg_dir / "imgs").mkdir(parents=True)
    (cwd / "imgs").mkdir(parents=True)
    shutil.copy(world_images[0], cfg_dir / "imgs" / "x.png")
    shutil.copy(world_images[1], cwd / "imgs" / "x.png")             # same relative name, another image
    config = cfg_dir / "c.yaml"
    config.write_text("image: [imgs/x.png]\ntext: [a star]\n")
    monkeypatch.chdir(cwd)
    parser = explain_cli.build_parser()
    from_config = parser.parse_args(["--config", str(config), "--out", "o"])
    assert explain_cli.image_paths(from_config) == [str(cfg_dir / "imgs" / "x.png")]
    from_flag = parser.parse_args(["--config", str(config), "--image", "imgs/x.png", "--out", "o"])
    assert explain_cli.image_paths(from_flag) == [str(cwd / "imgs" / "x.png")]
    missing = parser.parse_args(["--config", str(config), "--image", "imgs/none.png", "--out", "o"])
    assert explain_cli.image_paths(missing) == ["imgs/none.png"]      # reported later, with every bad path
    rc = explain_cli.main(["--config", str(config), "--image", "imgs/none.png", "--out", str(tmp_path / "o")])
    assert rc == 2


@pytest.mark.slow  # ~15 s: W&B starts its service process
def test_wandb_offline_logging(world_images, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "explain"
    rc = explain_cli.main(["--image", world_images[0], "--text", TEXTS[0], TEXTS[1], "--out", str(out),
                           "--html", "false", "--wandb", "true",
                           "--wandb_project", "xclip-test"])
    assert rc == 0 and (out / "explain.png").is_file() and not (out / "explain.html").exists()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    media = runs[0] / "files" / "media"
    assert list(media.glob("images/explain/grid_*.png"))
    table = json.loads(next(media.glob("table/explain/pairs_*.table.json")).read_text())
    assert table["columns"] == ["image", "text", "cos", "p", "overlay"] and len(table["data"]) == 2
