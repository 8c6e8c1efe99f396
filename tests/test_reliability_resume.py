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
import yaml
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
    monkeypatch.setenv("XCLIP_THREADS", "1")   # train.main's thread choice (utils/threads.py), as in the subprocess
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "XCLIP_THREADS": "1"}
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
TRAIN_CONFIGS = sorted(p for pattern in ("coop/*.yaml", "spelling/*.yaml", "styleclip/mapper_*.yaml",
                                         "styleclip/tiny_mapper.yaml", "world/*.yaml")
                       for p in (REPO / "configs").glob(pattern) if "trainer" in yaml.safe_load(p.read_text()))


def test_every_training_config_checkpoints_periodically_under_its_own_root():
    roots = {}
    for path in TRAIN_CONFIGS:
        t = yaml.safe_load(path.read_text())["trainer"]
        name = str(path.relative_to(REPO))
        root = t.get("default_root_dir") or ""
        assert root.startswith("runs/"), f"{name}: default_root_dir {root!r}"
        assert root not in roots, f"{name} and {roots.get(root)} share {root}"
        roots[root] = name
        cks = [c.get("init_args", {}) for c in t.get("callbacks") or [] if c["class_path"].endswith("ModelCheckpoint")]
        assert not any("dirpath" in c for c in cks), f"{name}: a fixed dirpath ignores --trainer.default_root_dir"
        assert any(c.get("save_last") and c.get("every_n_train_steps") for c in cks), \
            f"{name}: no periodic last.ckpt (ModelCheckpoint save_last + every_n_train_steps)"
        logger = t.get("logger")
        if isinstance(logger, dict) and "save_dir" in logger.get("init_args", {}):
            assert logger["init_args"]["save_dir"] == root, f"{name}: logger files outside {root}"
    assert len(roots) == len(TRAIN_CONFIGS) >= 30


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


def test_config_without_default_root_dir_writes_under_runs_named_after_it(tmp_path):
    from xclip import train

    cfg = yaml.safe_load((REPO / "configs/world/tiny_debug.yaml").read_text())
    del cfg["trainer"]["default_root_dir"]
    path = tmp_path / "mine" / "exp1.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    cli = train.main(["--config", str(path)], run=False)
    assert Path(cli.trainer.default_root_dir).resolve() == (tmp_path / "runs" / "mine_exp1").resolve()
    assert {cb.dirpath for cb in cli.trainer.checkpoint_callbacks} == \
        {str((tmp_path / "runs" / "mine_exp1" / "checkpoints").resolve())}


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


# ---- the resumable loader itself -------------------------------------------------------------------------
class _Noisy(torch.utils.data.Dataset):
    """Item i = (i, a draw of the torch RNG): stands for a random augmentation."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.tensor(i), torch.rand(())


def _epoch(loader, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)
    return [torch.stack(b, 1) for b in loader]


def test_loader_order_ignores_global_rng_and_workers_and_resumes_mid_epoch():
    from xclip.datamodules.resumable import ResumableLoader

    make = lambda workers=0: ResumableLoader(_Noisy(), batch_size=3, shuffle=True, drop_last=True, seed=5,  # noqa: E731
                                             seed_items=True, num_workers=workers)
    torch.manual_seed(1)
    ref = _epoch(make(), 0) + _epoch(make(), 1)
    torch.manual_seed(2)   # another global RNG state, and two worker processes
    two = make(2)
    assert all(torch.equal(a, b) for a, b in zip(ref, _epoch(two, 0) + _epoch(two, 1), strict=True))
    assert not torch.equal(ref[0][:, 0], ref[3][:, 0])   # epochs differ
    loader = make()
    loader.set_epoch(1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()   # saved after 1 of 3 batches of epoch 1
    resumed = make()
    resumed.load_state_dict(state)
    rest = _epoch(resumed, 1)
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, ref[4:], strict=True))
    assert len(_epoch(resumed, 2)) == 3   # the skip applies to the resumed epoch only
    with pytest.raises(ValueError, match="batch_size"):
        ResumableLoader(_Noisy(), batch_size=2, seed=5).load_state_dict(state)
