"""Tiny-CLIP pretraining on the synthetic world: learning, DDP equality, kill/resume, the shipped checkpoint."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEBUG_CFG = REPO / "configs" / "world" / "tiny_debug.yaml"
SHIPPED = REPO / "checkpoints" / "tiny_clip_world.pt"


def _train(root: Path, *extra: str, wait: bool = True, timeout: float = 240):
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(DEBUG_CFG),
           f"--trainer.default_root_dir={root}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if v.is_floating_point()}


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max weight difference {worst:.2e} > {atol}"


def test_a_few_steps_lower_the_loss():
    import pytorch_lightning as pl

    from xclip.datamodules.synthetic_world import SyntheticWorldDataModule, collate
    from xclip.lightning_modules.clip_pretrain import ClipPretrain

    pl.seed_everything(0)
    dm = SyntheticWorldDataModule(seed=0, train_length=32, val_size=8, batch_size=16, image_size=32)
    model = ClipPretrain("tiny-vit-test", lr=2e-3, warmup_steps=1, max_steps=30)
    batch = collate([dm.train_set[i] for i in range(16)])

    def loss_on_batch() -> float:
        model.setup("fit")
        with torch.no_grad():
            img, txt = model(batch["image"], model.clip.tokenize(batch["caption"]))
            return model.loss_fn(img, txt, model.clip.model.logit_scale.exp()).item()

    before = loss_on_batch()
    trainer = pl.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    after = loss_on_batch()
    assert after < before - 0.3, (before, after)


def test_letter_loss_matches_a_hand_computed_bce_learns_and_is_not_exported(tmp_path):
    import pytorch_lightning as pl

    from xclip.datamodules.synthetic_world import SyntheticWorldDataModule, collate
    from xclip.lightning_modules.clip_pretrain import ClipPretrain, clip_state_from_checkpoint, letter_targets

    has, tgt = letter_targets(["cab", "", "zz"])
    assert has.tolist() == [True, False, True] and tgt.shape == (2, 26)
    assert tgt[0].nonzero().flatten().tolist() == [0, 1, 2] and tgt[1].nonzero().flatten().tolist() == [25]

    pl.seed_everything(0)
    dm = SyntheticWorldDataModule(seed=0, train_length=64, val_size=8, batch_size=16, image_size=32,
                                  word_share=0.6, text_layout="grid")
    model = ClipPretrain("tiny-vit-test", lr=3e-3, warmup_steps=1, max_steps=40, letter_loss_weight=1.0)
    batch = collate([dm.train_set[i] for i in range(16)])
    words = batch["word"]
    assert 0 < sum(bool(w) for w in words) < 16

    def letter_loss_now() -> tuple[float, float]:
        with torch.no_grad():
            img, txt = model(batch["image"], model.clip.tokenize(batch["caption"]))
            ref = 0.0
            for head, e in ((model.letter_heads["image"], img), (model.letter_heads["text"], txt)):
                for w, row in zip(words, e):
                    if not w:
                        continue
                    p = torch.sigmoid(head(row * 10.0))
                    y = torch.tensor([float(chr(97 + k) in w) for k in range(26)])
                    ref += -(y * p.log() + (1 - y) * (1 - p).log()).mean().item() / sum(bool(x) for x in words)
            from xclip.lightning_modules.clip_pretrain import letter_loss
            return letter_loss(model.letter_heads, img, txt, words).item(), ref

    got, ref = letter_loss_now()
    assert abs(got - ref) < 1e-5, (got, ref)
    trainer = pl.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    after, _ = letter_loss_now()
    assert after < got - 0.05, (got, after)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state, _ = clip_state_from_checkpoint(tmp_path / "m.ckpt")
    assert state and not any("letter" in k for k in state)          # the heads are not part of the CLIP


def test_ddp_two_processes_equal_single_process(tmp_path):
    """2 gloo processes x batch 8 (ClipLoss gathers with gradients) == 1 process x batch 16."""
    steps = ["--trainer.max_steps=4", "--model.init_args.max_steps=4"]
    _train(tmp_path / "single", *steps, "--data.init_args.batch_size=16")
    _train(tmp_path / "ddp", *steps, "--data.init_args.batch_size=8", "--trainer.devices=2",
           "--trainer.strategy=ddp")
    single = _weights(tmp_path / "single" / "checkpoints" / "last.ckpt")
    ddp = _weights(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    _assert_close(single, ddp, atol=5e-5)
    moved = _weights(tmp_path / "single" / "checkpoints" / "epoch=0-step=4.ckpt")
    assert moved.keys() == single.keys()


# The SIGKILL / resume test of this config is in tests/test_reliability_resume.py (one per method family).


def _card_metrics() -> dict:
    text = (SHIPPED.with_suffix(".md")).read_text()
    block = re.search(r"```json\n(.*?)```", text, re.S)
    return json.loads(block.group(1))["metrics"]


@pytest.mark.skipif(not SHIPPED.is_file(), reason="checkpoints/tiny_clip_world.pt not built yet")
def test_shipped_checkpoint_reads_and_is_fooled_by_words():
    from xclip.evaluation import world
    from xclip.evaluation.common import EvalModel
    from xclip.models.clip_backbone import build_clip

    model = EvalModel(build_clip("tiny-vit-world", "synthetic-world"))
    typo = world.typographic_metrics(model, n=200, seed=1234)
    chance = typo["chance"]
    assert typo["clean_acc"] >= 10 * chance, typo
    assert typo["clean_acc"] - typo["attacked_acc"] >= 0.30, typo          # issue 18: >= 30 points
    assert typo["attack_success_rate"] >= 0.40, typo                        # issue 18: hijacked >= 40 % (shipped 47 % here)
    top1 = world.word_retrieval_top1(model, 200, seed=1235, nonsense=False)
    assert top1 >= 0.5, top1                                                # issue 18: real words >= 50 %
    top1_nonsense = world.word_retrieval_top1(model, 200, seed=1236, nonsense=True)
    assert top1_nonsense >= 0.25, top1_nonsense                            # issue 18: nonsense strings >= 25 %
    free = world.word_retrieval_top1(model, 200, seed=1235, nonsense=False, text_layout="free")
    assert free < top1, (free, top1)          # it reads the world's grid lettering, not any lettering


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason="checkpoints/tiny_clip_world.pt not built yet")
def test_pretraining_config_reproduces_the_shipped_metrics(tmp_path):
    """Re-runs configs/world/pretrain_tiny_clip.yaml (tens of minutes on 2 cores) and compares the world suite."""
    from xclip.evaluation import world
    from xclip.evaluation.common import EvalModel
    from xclip.lightning_modules.clip_pretrain import export_clip_weights
    from xclip.models.clip_backbone import build_clip

    cfg = REPO / "configs" / "world" / "pretrain_tiny_clip.yaml"
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(cfg), "--trainer.logger=false",
           f"--trainer.default_root_dir={tmp_path}",
           f"--trainer.callbacks=[{{\"class_path\": \"pytorch_lightning.callbacks.ModelCheckpoint\", "
           f"\"init_args\": {{\"dirpath\": \"{tmp_path}/ckpt\", \"save_last\": true}}}}]"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3 * 3600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = export_clip_weights(tmp_path / "ckpt" / "last.ckpt", tmp_path / "clip.pt")
    model = EvalModel(build_clip("tiny-vit-world", str(out)))
    got = world.run(model, world.Settings(n=400, seed=1234, words=200))
    want = _card_metrics()
    for key in ("clean_acc", "attacked_acc", "attack_success_rate", "word_top1_real", "word_top1_nonsense"):
        assert abs(got[key] - want[key]) <= 0.10, (key, got[key], want[key])
