"""demo.py (`make demo`): a fast smoke run on a random backbone, and the real claim on the shipped tiny CLIP."""
from __future__ import annotations

import json

import pytest

from xclip.models.clip_backbone import SHIPPED_WEIGHTS

SHIPPED = SHIPPED_WEIGHTS[("tiny-vit-world", "synthetic-world")]


def test_demo_smoke(tmp_path):
    from xclip import demo

    res = demo.main(["--out", str(tmp_path), "--pretrained", "none", "--fast", "true", "--wandb", "false",
                     "--n_train", "64", "--n_val", "32", "--n_attack", "20", "--epochs", "1"])
    for f in ("results.json", "results.png", "forget_to_spell.ckpt"):
        assert (tmp_path / f).is_file()
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=pytest.fail)
    assert set(saved["summary"]) >= {"clean_before", "clean_after", "attacked_before", "attacked_after"}
    assert 0 <= res["typographic"]["projected/attacked_acc"] <= 100
    assert len(saved["val_clip"]) > 0 and saved["train_argv"][:2] == ["fit", "--config"]


def test_demo_figure_and_json_show_attack_success_reading_and_labelled_examples(tmp_path):
    """Issue 18 §3: attack success before/after is in results.json and drawn; the reading panel has before/after
    bars with their values; every example is labelled with its true class, written word and both predictions."""
    from xclip import demo

    res = demo.main(["--out", str(tmp_path), "--pretrained", "none", "--fast", "true", "--wandb", "false",
                     "--n_train", "64", "--n_val", "32", "--n_attack", "20", "--epochs", "1"])
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=pytest.fail)
    m, s = saved["typographic"], saved["summary"]
    assert s["attack_success_before"] == m["clip/attack_success"]
    assert s["attack_success_after"] == m["projected/attack_success"]
    panels = {p["title"]: p["bars"] for p in saved["figure"]["panels"]}
    assert panels["Attack success"]["clip"] == {"attacked\nobjects": m["clip/attack_success"]}
    assert panels["Attack success"]["projected"] == {"attacked\nobjects": m["projected/attack_success"]}
    reading = next(b for t, b in panels.items() if t.startswith("Reading"))
    for key_label, key in demo.READING_BARS:
        assert reading["clip"][key_label] == saved["val_clip"][key]
        assert reading["projected"][key_label] == saved["val_projected"][key]
    examples = saved["figure"]["examples"]
    assert len(examples) == 4 and all(set(e) >= {"true", "written", "before", "after"} for e in examples)
    assert all(e["true"] != e["written"] for e in examples)
    assert res["figure"] == saved["figure"]


def test_demo_trains_the_packaged_train_config(tmp_path, monkeypatch):
    """demo = `xclip train fit --config <package>/configs/spelling/forget_to_spell_world.yaml` + output overrides:
    every model/data/trainer setting of the train config reaches the demo's run unchanged (no hand-built copy)."""
    import yaml

    from xclip import demo, train

    monkeypatch.chdir(tmp_path)  # found relative to the package, not the working directory
    args = demo.parse_args(["--out", str(tmp_path / "o"), "--wandb", "false"])
    argv = demo.train_argv(args)
    cfg_path = demo.package_configs() / "spelling" / "forget_to_spell_world.yaml"
    assert argv[:3] == ["fit", "--config", str(cfg_path)] and cfg_path.is_file()
    cli = train.main(argv[1:], run=False)
    want = yaml.safe_load(cfg_path.read_text())
    for key, value in want["model"]["init_args"].items():
        assert cli.model.hparams[key] == value, key
    for key, value in want["data"]["init_args"].items():
        if key != "cache_dir":
            assert cli.datamodule.hparams[key] == value, key
    assert cli.datamodule.hparams["cache_dir"] == str(tmp_path / "o" / "cache")
    assert cli.trainer.max_epochs == want["trainer"]["max_epochs"]
    assert cli.trainer.check_val_every_n_epoch == want["trainer"]["check_val_every_n_epoch"]
    assert cli.trainer.default_root_dir == str(tmp_path / "o")
    assert cli.config["seed_everything"] == want["seed_everything"]
    fast = demo.train_argv(demo.parse_args(["--out", "o", "--fast", "true", "--epochs", "2", "--wandb", "false"]))
    assert "--data.init_args.n_train=256" in fast and "--trainer.max_epochs=2" in fast  # explicit beats --fast
    signed = demo.train_argv(demo.parse_args(["--preset", "forget_to_spell_signed", "--wandb", "false"]))
    assert "--model.init_args.preset=forget_to_spell_signed" in signed


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason=f"shipped tiny CLIP {SHIPPED} missing")
def test_demo_forget_to_spell_fixes_typographic_attacks(tmp_path):
    from xclip import demo

    res = demo.main(["--out", str(tmp_path), "--wandb", "false"])
    s = res["summary"]
    # the reading world CLIP (issue 18): 43.5 -> 3.2 % attack success, 34.0 -> 59.8 % attacked, clean -0.5
    assert s["attack_success_before"] - s["attack_success_after"] >= 25, s
    assert s["attacked_after"] - s["attacked_before"] >= 20, s
    assert s["clean_before"] - s["clean_after"] <= 3, s


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason=f"shipped tiny CLIP {SHIPPED} missing")
def test_direction_on_shipped_backbone(tmp_path):
    """Real features: forget makes x_it classify like x_i and keeps clean accuracy; learn gives up the class.

    (Word-retrieval metrics are at chance for intermediate world CLIPs, so the word side is asserted only when the
    baseline reads words at all.)"""
    import pytorch_lightning as pl

    from xclip import demo, train
    from xclip.lightning_modules.spelling import SpellingProjection, evaluate_features, fit_on_features

    args = demo.parse_args(["--out", str(tmp_path), "--n_train", "1000", "--n_val", "300", "--wandb", "false"])
    module = SpellingProjection("tiny-vit-world", "synthetic-world", k=64, preset="forget_to_spell", lr=3e-3,
                                scale=10.0, class_aware_negatives=True)
    dm = train.main(demo.train_argv(args)[1:], run=False).datamodule  # the demo's datamodule, from its config
    dm.hparams.encoder, dm.hparams.encoder_pretrained = "tiny-vit-world", "synthetic-world"
    dm.setup("fit")
    base = evaluate_features(dm.val_features, None)
    word, clean = "im_it_txt_t/real/img2txt", "acc_im_i_txt_i"
    pl.seed_everything(0)
    fit_on_features(module, dm.train_features, None, max_epochs=30)
    f = evaluate_features(dm.val_features, module.projection_matrix().detach())
    assert f["acc_im_it_txt_i"] >= base["acc_im_it_txt_i"] + 5 and f[clean] >= base[clean] - 5, (base, f)
    if base[word] > 10:
        assert f[word] <= base[word] - 5, (base, f)
    pl.seed_everything(0)
    learn = SpellingProjection("tiny-vit-world", "synthetic-world", k=64, preset="learn_to_spell", lr=3e-3,
                               scale=10.0)
    fit_on_features(learn, dm.train_features, None, max_epochs=30)
    s = evaluate_features(dm.val_features, learn.projection_matrix().detach())
    assert s[clean] <= base[clean] - 5, (base, s)
    if base[word] > 10:
        # learn keeps reading (the reading world CLIP already reads: 26.8 -> 25.5 on these quintuples; it does
        # not add reading on top, docs/reproduction.md), while forget removes it (above)
        assert s[word] >= base[word] - 5, (base, s)
