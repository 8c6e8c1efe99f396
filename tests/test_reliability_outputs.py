"""evaluate / analyze: outputs, inputs and tools are checked before any work; each suite's result is on disk as soon
as it finishes; a failing suite never discards the others; a corrupt image is skipped and reported."""
from __future__ import annotations

import csv
import json
import os
import stat

import pytest
from PIL import Image

from xclip import analyze, evaluate
from xclip.datamodules.text_render import TextStyle, draw_word

pytestmark = pytest.mark.reliability
TINY = ["--backbone", "tiny-vit-test", "--device", "cpu"]
WORLD_SMALL = ["--world.n", "4", "--world.words", "2"]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is built: the error must come before any work."""
    def boom(*a, **k):
        raise AssertionError("the model was built before the input/output checks failed")
    monkeypatch.setattr(evaluate, "load_eval_model", boom)
    monkeypatch.setattr(analyze, "_build", boom)


# ---- unwritable outputs ---------------------------------------------------------------------------------
def test_out_is_a_directory(tmp_path, no_model):
    with pytest.raises(SystemExit) as e:
        evaluate.main([*TINY, "--suite", "world", "--out", str(tmp_path)])
    msg = str(e.value.code)
    assert "nothing was run" in msg and f"--out {tmp_path} is a folder" in msg
    assert str(tmp_path / "results.json") in msg                       # the fix: a file path


def test_out_under_a_file(tmp_path, no_model):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(SystemExit) as e:
        evaluate.main([*TINY, "--suite", "world", "--out", str(tmp_path / "plain" / "r.json")])
    msg = str(e.value.code)
    assert f"--out {tmp_path / 'plain' / 'r.json'}: folder {tmp_path / 'plain'} is a file, not a folder" in msg
    assert "choose another location for --out" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_read_only_folder(tmp_path, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(SystemExit, match=r"ro: .*not writable.*choose a writable location for --out"):
            evaluate.main([*TINY, "--suite", "world", "--out", str(ro / "r.json")])
    finally:
        ro.chmod(stat.S_IRWXU)


def test_read_only_folder_refused_by_the_check(tmp_path, monkeypatch):
    """As root cannot be refused a write, simulate the kernel's answer for the probe file."""
    import tempfile

    from xclip.utils.io import check_writable_file

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"--out .*r\.json: folder .* is not writable \(PermissionError: "
                                         r"Permission denied\); choose a writable location for --out"):
        check_writable_file(tmp_path / "r.json", "--out")


def test_every_problem_listed_at_once(tmp_path, no_model):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(tmp_path / "missing.ckpt"), "--suite", "saliency_prf", "detection_ap",
                       "--detection_ap.dir", str(tmp_path), "--out", str(tmp_path)])
    msg = str(e.value.code)
    for part in ("--out", "missing.ckpt: no such file", "give --saliency_prf.file", "annotations.json"):
        assert part in msg, part
    assert not (tmp_path / "results.json").exists()


# ---- external tools ---------------------------------------------------------------------------------------
def test_missing_tesseract_before_any_suite(tmp_path, monkeypatch, no_model):
    import xclip.metrics.text_in_image as tii

    (tmp_path / "gen").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "gen" / "a.png")
    monkeypatch.setattr(tii.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as e:   # world would run first: it must not start
        evaluate.main([*TINY, "--suite", "world", "text_in_image", "--text_in_image.dir", str(tmp_path / "gen"),
                       "--out", str(tmp_path / "r.json")])
    msg = str(e.value.code)
    assert "suite text_in_image" in msg and "apt-get install tesseract-ocr" in msg
    assert not (tmp_path / "r.json").exists()


# ---- no finished work is lost -----------------------------------------------------------------------------
def test_failing_suite_recorded_the_others_kept(tmp_path):
    import torch

    torch.save({"maps": torch.rand(2, 4, 4)}, tmp_path / "bad.pt")   # no boxes / masks: fails inside the suite
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main([*TINY, "--suite", "saliency_prf", "world", *WORLD_SMALL,
                       "--saliency_prf.file", str(tmp_path / "bad.pt"), "--out", str(out)])
    msg = str(e.value.code)
    assert "suite(s) failed: saliency_prf" in msg and "bad.pt" in msg and f"other suites are in {out}" in msg
    saved = json.loads(out.read_text())["suites"]
    assert "'boxes'" in saved["saliency_prf"]["error"]
    assert saved["world"]["n_objects"] == 4 and 0 <= saved["world"]["clean_acc"] <= 1   # ran after the failure


def test_each_result_on_disk_as_soon_as_it_finishes(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    seen = {}

    def interrupted(model, s, ctx):
        seen.update(json.loads(out.read_text())["suites"])
        raise KeyboardInterrupt   # the run is killed during the second suite
    from xclip.evaluation import mean_ablation

    monkeypatch.setattr(mean_ablation, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([*TINY, "--suite", "world", "mean_ablation", *WORLD_SMALL, "--out", str(out)])
    assert seen["world"]["n_objects"] == 4
    assert json.loads(out.read_text())["suites"]["world"] == seen["world"]    # still there after the kill
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.json")]  # no temp file left
    mode = out.stat().st_mode & 0o777
    assert mode & stat.S_IRUSR


# ---- bad inputs -------------------------------------------------------------------------------------------
def _text_folder(root, corrupt: int = 1):
    root.mkdir(parents=True)
    for i, w in enumerate(["hello", None]):
        img = Image.new("RGB", (64, 64), (200, 220, 240))
        if w:
            img, _ = draw_word(img, w, TextStyle(size=16))
        img.save(root / f"{i}.png")
    for i in range(corrupt):
        (root / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)   # a PNG header, no image


def test_corrupt_png_skipped_and_reported(tmp_path, caplog):
    _text_folder(tmp_path / "gen")
    res = evaluate.main([*TINY, "--suite", "text_in_image", "--text_in_image.dir", str(tmp_path / "gen"),
                         "--out", str(tmp_path / "r.json")])["suites"]["text_in_image"]
    assert res["n_unreadable"] == 1 and res["unreadable"] == [str(tmp_path / "gen" / "broken0.png")]
    assert res["all/n"] == 2 and res["all/rate@0"] == 0.5               # the readable images still count
    assert json.loads((tmp_path / "r.json").read_text())["suites"]["text_in_image"]["n_unreadable"] == 1
    assert any("broken0.png" in r.getMessage() and "replace or remove" in r.getMessage() for r in caplog.records)


def test_only_corrupt_images_fail_naming_a_file(tmp_path):
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "x.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as e:
        evaluate.main([*TINY, "--suite", "text_in_image", "--text_in_image.dir", str(tmp_path / "gen"),
                       "--out", str(tmp_path / "r.json")])
    assert "none of the images" in str(e.value.code) and "x.png" in str(e.value.code)


def test_missing_ckpt_named_before_work(tmp_path, no_model):
    with pytest.raises(SystemExit, match="--ckpt .*nope.ckpt: no such file"):
        evaluate.main(["--ckpt", str(tmp_path / "nope.ckpt"), "--suite", "world", "--out", str(tmp_path / "r.json")])


def _waterbirds(root):
    root.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 60, 100, 100)).save(root / f"{i}.png")
        rows.append({"img_filename": f"{i}.png", "y": i % 2, "split": 2, "place": i // 2})
    with (root / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_spurious_paper_heads_on_a_small_model_fail_before_decomposing(tmp_path, monkeypatch):
    import xclip.analysis.decomposition as dec

    def boom(*a, **k):
        raise AssertionError("decomposition started")
    monkeypatch.setattr(dec, "decompose_to_store", boom)
    _waterbirds(tmp_path / "wb")
    with pytest.raises(SystemExit) as e:      # tiny-vit-world: 4 layers x 4 heads (random weights: fast)
        analyze.main(["spurious", "--backbone", "tiny-vit-world", "--device", "cpu", "--waterbirds",
                      str(tmp_path / "wb"), "--paper_heads", "ViT-B-16", "--out_store", str(tmp_path / "store")])
    msg = str(e.value.code)
    assert "--paper_heads ViT-B-16 names 11:6" in msg and "4 layers" in msg and "--backbone ViT-B-16" in msg
    assert not any((tmp_path / "store").glob("*.npy"))


def test_analyze_checks_before_building(tmp_path, no_model):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"analyze decompose: --out .*file is a file, not a folder"):
        analyze.main(["decompose", "--backbone", "tiny-vit-test", "--data", "world:4", "--out", str(tmp_path / "file")])
    with pytest.raises(SystemExit, match=r"--waterbirds .*: no metadata.csv"):
        analyze.main(["spurious", "--backbone", "tiny-vit-test", "--waterbirds", str(tmp_path), "--heads", "0:0",
                      "--out_store", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match=r"--store .* is not a decomposition store .*xclip analyze decompose"):
        analyze.main(["textspan", "--store", str(tmp_path), "--backbone", "tiny-vit-test", "--pool",
                      str(tmp_path / "file"), "--out", str(tmp_path / "ts")])
    with pytest.raises(SystemExit, match=r"--data .*missing: no such folder.*images/"):
        analyze.main(["segment", "--backbone", "tiny-vit-test", "--data", str(tmp_path / "missing")])


def test_ablate_heads_out_of_range(tmp_path):
    store = tmp_path / "store"
    analyze.main(["decompose", *TINY, "--data", "world:4", "--out", str(store), "--batch_size", "4"])
    with pytest.raises(SystemExit, match=r"--heads '5:0' names 5:0, but the model has 2 layers x 2 heads"):
        analyze.main(["ablate", "--store", str(store), "--heads", "5:0"])
    with pytest.raises(SystemExit, match=r"--last_layers 3: the store has 2 layers"):
        analyze.main(["textspan", "--store", str(store), "--backbone", "tiny-vit-test", "--pool", str(store),
                      "--last_layers", "3", "--out", str(tmp_path / "ts")])


def test_corrupt_image_in_typographic_folder_named(tmp_path):
    for cls, colour in (("apple", "red"), ("sky", "blue")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / cls / "0.png")
    (tmp_path / "imgs" / "sky" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(SystemExit) as e:
        evaluate.main([*TINY, "--suite", "typographic", "world", *WORLD_SMALL, "--typographic.source", "imagefolder",
                       "--typographic.data", str(tmp_path / "imgs"), "--out", str(tmp_path / "r.json")])
    msg = str(e.value.code)
    assert "typographic" in msg and str(tmp_path / "imgs" / "sky" / "1.png") in msg and "replace or remove" in msg
    assert "world" in json.loads((tmp_path / "r.json").read_text())["suites"]      # the next suite still ran
