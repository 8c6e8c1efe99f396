"""Bad inputs to `xclip generate` and `xclip demo` (issue 15 §3/§4): each is a clear error BEFORE any model is built
or anything is written, whose message names the flag / file / value and says the fix. Results are strict JSON."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from xclip import demo, generate

pytestmark = pytest.mark.reliability

VQ = ["vqgan-clip", "--vqgan_config", "tiny", "--backbone", "tiny-vit-test", "--pretrained", "none", "--width", "32",
      "--height", "32", "--cutn", "2", "--device", "cpu", "--progress", "false"]
SG = ["--generator.size", "32", "--generator.style_dim", "64", "--generator.n_mlp", "2", "--generator.channel_max",
      "16", "--backbone", "tiny-vit-test", "--pretrained", "none", "--device", "cpu", "--progress", "false"]


class BuiltTooEarly(AssertionError):
    pass


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    def boom(*a, **k):
        raise BuiltTooEarly("a model was built before the inputs were checked")

    import importlib

    for name in ("xclip.lightning_modules.styleclip_mapper", "xclip.lightning_modules.spelling",
                 "xclip.lightning_modules.clip_pretrain", "xclip.models.arcface", "xclip.datamodules.latents"):
        importlib.import_module(name)  # imported before patching, so no module keeps a patched name bound
    import xclip.generation.zerocap as zc
    import xclip.lightning_modules.base as base
    import xclip.models.clip_backbone as cb
    import xclip.models.stylegan2 as sg
    import xclip.models.vqgan as vq
    from xclip import train

    for mod, name in ((cb, "build_clip"), (sg, "build_generator"), (vq, "tiny_vqgan"), (vq, "load_vqgan"),
                      (zc, "load_language_model"), (base, "load_method_checkpoint"), (train, "main")):
        monkeypatch.setattr(mod, name, boom)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _refused(tmp_path, argv, *needles, main=generate.main):
    """Runs argv, expects SystemExit whose message holds every needle; nothing new under tmp_path."""
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    for n in needles:
        assert n in msg, (n, msg)
    assert _files(tmp_path) == before, sorted(map(str, _files(tmp_path) - before))
    return msg


# ---- VQGAN-CLIP ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["0,0,16=a dog", "0,0,16,3x=a dog", "0, 0, 16, 16, 4=a dog", "1,2,3,=a dog"])
def test_vqgan_malformed_box_is_an_error(prompt, tmp_path, no_models):
    _refused(tmp_path, [*VQ, "--prompts", prompt, "--out", str(tmp_path / "o")],
             repr(prompt), "4 numbers L,T,W,H", "0,0,16,32=a red circle")


def test_vqgan_text_with_equals_sign_is_still_text():
    from xclip.generation.vqgan_clip import parse_prompt

    assert parse_prompt("E=mc2 on a blackboard").bbox is None
    assert parse_prompt("E=mc2 on a blackboard").text == "E=mc2 on a blackboard"
    assert parse_prompt("0,0,16,32=a red circle:1.5").bbox == (0, 0, 16, 32)
    assert parse_prompt("1+1=2 written on a blackboard").bbox is None


def test_vqgan_zero_steps_is_an_error(tmp_path, no_models):
    _refused(tmp_path, [*VQ, "--prompts", "0,0,16,32=a dog", "--steps", "0", "--out", str(tmp_path / "o")],
             "steps must be >= 1", "got 0", "--steps 1")


def test_vqgan_no_prompt_is_an_error(tmp_path, no_models):
    _refused(tmp_path, [*VQ, "--method", "plain", "--out", str(tmp_path / "o")], "no prompt", "--prompts")


@pytest.mark.parametrize("kind", ["file", "under_file"])
def test_vqgan_unwritable_out_fails_before_generating(kind, tmp_path, no_models):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = blocker if kind == "file" else blocker / "run"
    msg = _refused(tmp_path, [*VQ, "--prompts", "0,0,16,32=a dog", "--out", str(out)], "--out", str(out))
    assert "folder" in msg and "pass" in msg
    assert blocker.read_text() == "not a folder"


def test_vqgan_missing_files_are_named(tmp_path, no_models):
    base = [*VQ, "--prompts", "0,0,16,32=a dog", "--out", str(tmp_path / "o")]
    _refused(tmp_path, [*base, "--vqgan_config", str(tmp_path / "nope.yaml"), "--vqgan_ckpt", "x.ckpt"],
             "--vqgan_config", "nope.yaml", "not found")
    _refused(tmp_path, [*base, "--vqgan_ckpt", "x.ckpt"], "--vqgan_ckpt", "without --vqgan_config")
    _refused(tmp_path, [*base, "--init", str(tmp_path / "start.png")], "--init", "start.png", "not found")
    _refused(tmp_path, [*base, "--projection", str(tmp_path / "w.ckpt")], "--projection", "w.ckpt", "not found")


def test_vqgan_cli_list_replaces_config_list(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prompts: ['0,0,16,32=a red circle']\nmethod: explainability\n")
    _, ns = generate.parse([*VQ, "--config", str(cfg), "--prompts", "0,0,8,8=a dog"])
    assert ns.prompts == ["0,0,8,8=a dog"]


def test_vqgan_json_is_strict_and_unchanged_image_warns(tiny_backbone, tmp_path, caplog):
    from xclip.generation.vqgan_clip import RegionPrompt, VQGANCLIPConfig
    from xclip.generation.vqgan_clip import generate as run_generation
    from xclip.models.vqgan import tiny_vqgan

    cfg = VQGANCLIPConfig(width=32, height=32, steps=1, cutn=2, method="plain", lr=1e-9, seed=0)
    with caplog.at_level(logging.WARNING):
        res = run_generation(tiny_vqgan(), tiny_backbone, [RegionPrompt("a dog")], cfg, out_dir=tmp_path / "o",
                             progress=False)
    assert res.change == 0.0
    assert any("did not change from its init" in r.getMessage() and "--steps" in r.getMessage()
               for r in caplog.records)
    saved = json.loads((tmp_path / "o" / "losses.json").read_text(), parse_constant=pytest.fail)  # no NaN/Infinity
    assert saved["prompts"][0]["stop"] is None and saved["image_change"] == 0.0


# ---- StyleCLIP ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   "])
def test_styleclip_empty_description_is_an_error(text, tmp_path, no_models):
    _refused(tmp_path, ["styleclip-optimize", "--description", text, "--out", str(tmp_path / "o"), *SG],
             "--description is empty", "e.g.")


def test_styleclip_global_empty_or_equal_texts_are_errors(tmp_path, no_models):
    base = ["styleclip-global", "--out", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c"), *SG]
    _refused(tmp_path, [*base, "--neutral", "face", "--target", ""], "--target is empty")
    _refused(tmp_path, [*base, "--target", "smiling face"], "--neutral is empty")
    _refused(tmp_path, [*base, "--neutral", "face", "--target", "face"], "--neutral and --target", "'face'")


def test_styleclip_bad_settings_and_files(tmp_path, no_models):
    base = ["styleclip-optimize", "--out", str(tmp_path / "o"), *SG]
    _refused(tmp_path, [*base, "--steps", "0"], "--steps 0", ">= 1")
    _refused(tmp_path, [*base, "--expl_weight", "1.0"], "--expl_weight > 0 needs --desired_words")
    _refused(tmp_path, [*base, "--expl_weight", "1.0", "--desired_words", "[0, 1]"],
             "--desired_words has 2 values", "5 words")
    _refused(tmp_path, [*base, "--id_lambda", "0.1"], "--id_lambda 0.1 needs --arcface_checkpoint")
    _refused(tmp_path, [*base, "--generator.checkpoint", str(tmp_path / "g.pt")], "--generator.checkpoint",
             "g.pt", "not found")
    _refused(tmp_path, [*base, "--latent_path", str(tmp_path / "w.pt")], "--latent_path", "w.pt", "not found")
    _refused(tmp_path, [*base[:-len(SG)], *SG, "--generator.size", "48"], "--generator.size 48", "power of two")
    (tmp_path / "file").write_text("x")
    _refused(tmp_path, ["styleclip-optimize", "--out", str(tmp_path / "file"), *SG], "--out", "not a folder")


def test_styleclip_mapper_checks_before_loading(tmp_path, no_models):
    base = ["styleclip-mapper", "--out", str(tmp_path / "o"), "--device", "cpu"]
    _refused(tmp_path, [*base, "--n_random", "2"], "--ckpt is required")
    _refused(tmp_path, [*base, "--ckpt", str(tmp_path / "m.ckpt"), "--n_random", "2"], "--ckpt", "m.ckpt",
             "not found")
    (tmp_path / "m.ckpt").write_bytes(b"x")
    _refused(tmp_path, [*base, "--ckpt", str(tmp_path / "m.ckpt"), "--n_random", "2", "--latents", "w.pt"],
             "exactly one of --latents FILE or --n_random N")
    _refused(tmp_path, [*base, "--ckpt", str(tmp_path / "m.ckpt"), "--n_random", "0"], "--n_random must be >= 1")
    _refused(tmp_path, [*base, "--ckpt", str(tmp_path / "m.ckpt"), "--latents", str(tmp_path / "w.pt")],
             "--latents", "w.pt", "not found")


# ---- ZeroCap ------------------------------------------------------------------------------------------------
def test_zerocap_bad_inputs(tmp_path, no_models):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    base = ["zerocap", "--out", str(tmp_path / "caps.json")]
    _refused(tmp_path, base, "nothing to caption", "--images")
    _refused(tmp_path, [*base, "--images", str(tmp_path / "missing.png")], "--images", "missing.png", "not found")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, [*base, "--images", str(tmp_path / "empty")], "--images", "empty", "no .png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _refused(tmp_path, [*base, "--images", str(good), str(corrupt)], "corrupt.png", "not a readable image")
    _refused(tmp_path, [*base, "--arith_images", str(good), str(good), "--arith_weights", "1"],
             "2 images but --arith_weights 1 weights", "one weight per image")
    (tmp_path / "refs.json").write_text(json.dumps({"other.png": ["x"]}))
    _refused(tmp_path, [*base, "--images", str(good), "--references", str(tmp_path / "refs.json")],
             "refs.json", "good.png")
    _refused(tmp_path, ["zerocap", "--images", str(good), "--out", str(tmp_path / "empty")], "--out", "is a folder")
    _refused(tmp_path, [*base, "--images", str(good), "--beam_size", "0"], "--beam_size 0")


# ---- demo ---------------------------------------------------------------------------------------------------
def test_demo_bad_inputs(tmp_path, no_models):
    (tmp_path / "file").write_text("x")
    _refused(tmp_path, ["--out", str(tmp_path / "file"), "--wandb", "false"], "--out", "not a folder",
             main=demo.main)
    _refused(tmp_path, ["--out", str(tmp_path / "o"), "--n_train", "0"], "--n_train must be >= 1", main=demo.main)
    _refused(tmp_path, ["--out", str(tmp_path / "o"), "--train_config", str(tmp_path / "t.yaml")],
             "--train_config", "t.yaml", "not found", main=demo.main)


def test_generation_json_writer_never_writes_nan(tmp_path):
    from xclip.generation._cli import write_json

    write_json({"a": float("nan"), "b": [float("inf"), 1.0], "c": torch.tensor(2.0).item()}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=pytest.fail) == {"a": None,
                                                                                        "b": [None, 1.0], "c": 2.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu_is_an_error(tmp_path, no_models):
    _refused(tmp_path, [*VQ, "--prompts", "a dog", "--method", "plain", "--device", "cuda",
                        "--out", str(tmp_path / "o")], "--device cuda", "no CUDA device", "--device cpu")
    _refused(tmp_path, ["styleclip-optimize", "--out", str(tmp_path / "o"), *SG, "--device", "cuda:0"],
             "--device cuda:0", "--device cpu")
