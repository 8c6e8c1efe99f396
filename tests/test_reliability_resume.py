"""Kill / resume per method family, `--ckpt_path` errors, where runs write, cache-independent results.

Each family: the uninterrupted run and the resumed run go through `train.main` in this process; the run that is
SIGKILLed mid-epoch (after a periodic checkpoint) is `python -m xclip.train` in a subprocess, slowed by StepDelay;
it is resumed with the README command (`--ckpt_path last`, same config, same default_root_dir) and must end with the
learned tensors of the uninterrupted run to 1e-6.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coop_data import make_colour_folder

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent
DELAY = ('--trainer.callbacks+={"class_path": "xclip.lightning_modules.clip_pretrain.StepDelay", '
         '"init_args": {"delay_s": 0.3}}')


def _every(n: int) -> str:
    return ('--trainer.callbacks=[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", '
            f'"init_args": {{"save_last": true, "save_top_k": 0, "every_n_train_steps": {n}}}}}]')


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)    # the subprocess runs with OMP_NUM_THREADS=1: same reduction order
    monkeypatch.chdir(tmp_path)  # nothing a run writes by default may land in the repository
    yield
    torch.set_num_threads(n)


def _fit(config: str, root: Path, *extra: str):
    from xclip import train

    return train.main(["fit", "--config", str(REPO / config), f"--trainer.default_root_dir={root}", *extra])


def _learned(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if v.is_floating_point()}


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def _kill_mid_epoch(config: str, root: Path, extra: list[str], steps_per_epoch: int, total: int) -> int:
    """Run in a subprocess, SIGKILL it once last.ckpt exists; returns the step of that checkpoint."""
    cmd = [sys.executable, "-m", "xclip.train", "fit", "--config", str(REPO / config),
           f"--trainer.default_root_dir={root}", *extra, DELAY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=root.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = root / "checkpoints" / "last.ckpt"
    deadline = time.time() + 150
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), proc.stdout.read().decode()[-3000:]
    step = _step(last)
    assert 0 < step < total and step % steps_per_epoch, f"not killed mid-epoch (last.ckpt at step {step})"
    return step


def _assert_resume_exact(tmp_path, config: str, extra: list[str], steps_per_epoch: int, total: int,
                         every: int, kill_extra: tuple[str, ...] = ()) -> None:
    extra = [*extra, _every(every)]
    full = tmp_path / "full"
    _fit(config, full, *extra)
    killed = tmp_path / "killed"
    _kill_mid_epoch(config, killed, [*extra, *kill_extra], steps_per_epoch, total)
    cli = _fit(config, killed, *extra, *kill_extra, "--ckpt_path", "last")
    last = killed / "checkpoints" / "last.ckpt"
    assert Path(cli.trainer.ckpt_path).resolve() == last.resolve()   # it did resume from the killed run
    assert _step(last) == _step(full / "checkpoints" / "last.ckpt") == total
    a, b = _learned(full / "checkpoints" / "last.ckpt"), _learned(last)
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst:.2e}"


# ---- kill / resume per family ----------------------------------------------------------------------------
def test_world_pretraining_resumes_exactly(tmp_path):
    _assert_resume_exact(tmp_path, "configs/world/tiny_debug.yaml", ["--trainer.max_steps=10"],
                         steps_per_epoch=10 ** 9, total=10, every=3)


@pytest.mark.parametrize("config", ["configs/coop/tiny_test.yaml", "configs/coop/tiny_test_expl.yaml"],
                         ids=["coop", "coop_expl"])
def test_coop_resumes_exactly(tmp_path, config):
    root = make_colour_folder(tmp_path / "colours", n_train=8, n_test=2)   # 4 classes x 8 shots, batch 8
    extra = [f"--data.init_args.dataset=imagefolder:{root}", f"--data.init_args.data_dir={tmp_path / 'data'}",
             "--trainer.max_steps=10"]
    if "expl" in config:
        extra.append("--model.init_args.expl_chunk_size=3")
    _assert_resume_exact(tmp_path, config, extra, steps_per_epoch=4, total=10, every=3)


def test_spelling_resumes_exactly_with_wandb_offline(tmp_path):
    wandb_logger = json.dumps({"class_path": "pytorch_lightning.loggers.WandbLogger",
                               "init_args": {"project": "resume-test", "save_dir": str(tmp_path / "wandb"),
                                             "offline": True}})
    extra = ["--data.init_args.n_train=48", "--data.init_args.n_val=8", "--data.init_args.batch_size=8",
             "--trainer.max_epochs=2"]
    try:
        _assert_resume_exact(tmp_path, "configs/spelling/tiny_test.yaml", extra, steps_per_epoch=6, total=12,
                             every=4, kill_extra=(f"--trainer.logger={wandb_logger}",))
    finally:
        import wandb

        wandb.finish()


def test_styleclip_mapper_resumes_exactly(tmp_path):
    extra = ["--data.init_args.n_train_samples=16", "--trainer.max_steps=10"]   # batch 4: 4 steps an epoch
    _assert_resume_exact(tmp_path, "configs/styleclip/tiny_mapper.yaml", extra, steps_per_epoch=4, total=10,
                         every=3)


# ---- --ckpt_path errors ----------------------------------------------------------------------------------
SPELLING = "configs/spelling/tiny_test.yaml"


def _fit_error(tmp_path, config: str, *extra: str) -> str:
    with pytest.raises(SystemExit) as e:
        _fit(config, tmp_path / "run", *extra)
    return str(e.value)


def test_ckpt_path_last_without_checkpoint_says_where_it_looked(tmp_path):
    msg = _fit_error(tmp_path, SPELLING, "--ckpt_path", "last")
    assert str((tmp_path / "run" / "checkpoints").resolve()) in msg
    assert "no last.ckpt" in msg and "Omit --ckpt_path to start a fresh run" in msg


def test_ckpt_path_unreadable_or_foreign_files_are_named(tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    buf = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"W": torch.zeros(16, 64)}, "loops": {}, "optimizer_states": []}, buf)
    truncated.write_bytes(buf.read_bytes()[:300])
    msg = _fit_error(tmp_path, SPELLING, "--ckpt_path", str(truncated))
    assert str(truncated) in msg and "truncated or corrupt" in msg

    weights = tmp_path / "open_clip_weights.pt"   # a plain state dict, as open_clip / OpenAI release them
    torch.save({"visual.conv1.weight": torch.zeros(2, 3, 1, 1), "logit_scale": torch.zeros(())}, weights)
    msg = _fit_error(tmp_path, SPELLING, "--ckpt_path", str(weights))
    assert str(weights) in msg and "no 'state_dict'" in msg and "2 entries" in msg

    msg = _fit_error(tmp_path, SPELLING, "--ckpt_path", str(tmp_path / "missing.ckpt"))
    assert "missing.ckpt: no such file" in msg


def test_ckpt_path_of_another_method_is_refused(tmp_path):
    root = make_colour_folder(tmp_path / "colours", n_train=8, n_test=2)
    spelling = tmp_path / "spelling.ckpt"   # what SpellingProjection + Lightning write (method, state, loops)
    torch.save({"state_dict": {"W": torch.zeros(16, 64)}, "loops": {}, "optimizer_states": [], "global_step": 4,
                "method": "xclip.lightning_modules.spelling.SpellingProjection",
                "hyper_parameters": {"k": 16, "_class_path": "xclip.lightning_modules.spelling.SpellingProjection"}},
               spelling)
    msg = _fit_error(tmp_path, "configs/coop/tiny_test.yaml", f"--data.init_args.dataset=imagefolder:{root}",
                     "--ckpt_path", str(spelling))
    assert str(spelling) in msg and "holds a SpellingProjection checkpoint, but the config trains CoOp" in msg

    slim = tmp_path / "slim.ckpt"   # weights only: evaluates, cannot resume
    torch.save({"state_dict": {"W": torch.zeros(16, 64)}, "method": "SpellingProjection"}, slim)
    msg = _fit_error(tmp_path, SPELLING, "--ckpt_path", str(slim))
    assert "no training state" in msg and "Omit --ckpt_path" in msg


# ---- where runs write ------------------------------------------------------------------------------------
def test_tiny_coop_command_writes_only_under_its_run_folder(tmp_path):
    """docs/coop.md's tiny command from a fresh folder: config + checkpoints under runs/<config>, nothing else
    (it used to write checkpoints/last.ckpt -- the shipped weights folder when run from the repo -- and config.yaml
    into the working directory)."""
    from xclip import train

    root = make_colour_folder(tmp_path / "colours", n_train=8, n_test=2)
    work = tmp_path / "work"
    work.mkdir()
    os.chdir(work)
    train.main(["fit", "--config", str(REPO / "configs/coop/tiny_test.yaml"),
                f"--data.init_args.dataset=imagefolder:{root}", f"--data.init_args.data_dir={tmp_path / 'data'}",
                "--trainer.max_steps=2"])
    written = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    assert written == ["runs/coop_tiny_test/checkpoints/last.ckpt", "runs/coop_tiny_test/config.yaml"], written
    assert _step(work / written[0]) == 2


def test_default_root_dir_moves_the_checkpoints_of_configs_with_a_logger(tmp_path):
    """W&B configs used to write into a new run-id folder per launch; every ModelCheckpoint without a dirpath now
    writes to {default_root_dir}/checkpoints."""
    from xclip import train

    cfg = REPO / "configs/spelling/forget_to_spell_world.yaml"
    cli = train.main(["--config", str(cfg), "--model.init_args.backbone=tiny-vit-test",
                      "--model.init_args.pretrained=null", f"--trainer.default_root_dir={tmp_path / 'smoke'}"],
                     run=False)
    dirs = {cb.dirpath for cb in cli.trainer.checkpoint_callbacks}
    assert dirs == {str((tmp_path / "smoke" / "checkpoints").resolve())}


# ---- cache-independent results ---------------------------------------------------------------------------
def test_feature_cache_hit_and_miss_train_identically(tmp_path):
    """A second `make demo` printed other numbers: computing the cache consumed the global RNG that the training
    shuffle read. Same seed -> same W and metrics, cache or not."""
    extra = ["--data.init_args.n_train=32", "--data.init_args.n_val=16", "--data.init_args.batch_size=8",
             "--trainer.max_epochs=2"]
    runs = {}
    for name, cache in (("miss", tmp_path / "cache"), ("hit", tmp_path / "cache"), ("none", None)):
        cli = _fit(SPELLING, tmp_path / name, *extra, f"--data.init_args.cache_dir={cache or 'null'}")
        runs[name] = (cli.model.W.detach().clone(),
                      {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")})
    assert list((tmp_path / "cache").glob("quintuples-*.pt")), "the first run wrote no cache"
    for name in ("hit", "none"):
        assert torch.equal(runs[name][0], runs["miss"][0]), name
        assert runs[name][1] == runs["miss"][1] and runs[name][1], name
