"""train.py / evaluate.py / checkpoints: slim checkpoints, rebuild for evaluation, and bad-input errors."""
import pytest
import torch
import yaml
from _toy_methods import OtherToy, ToyProjection

from xclip import evaluate, train
from xclip.lightning_modules.base import load_method_checkpoint
from xclip.utils.io import AtomicCheckpointIO

TOY_CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": 3, "accelerator": "cpu", "devices": 1, "logger": False,
                "enable_progress_bar": False, "enable_model_summary": False},
    "model": {"class_path": "_toy_methods.ToyProjection", "init_args": {"k": 8}},
    "data": {"class_path": "_toy_methods.ToyData", "init_args": {"n": 8}},
}


@pytest.fixture
def toy_config(tmp_path):
    cfg = dict(TOY_CONFIG, trainer=dict(TOY_CONFIG["trainer"], default_root_dir=str(tmp_path / "run")))
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config, tmp_path, *extra):
    cli = train.main(["fit", "--config", str(config), *extra])
    ckpts = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    return cli, ckpts[-1]


def test_fit_writes_slim_checkpoint_that_evaluate_can_rebuild(toy_config, tmp_path):
    cli, ckpt_path = _fit(toy_config, tmp_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert set(ckpt["state_dict"]) == {"W"}  # the frozen CLIP is not saved
    assert ckpt["backbone"] == {"name": "tiny-vit-test", "pretrained": None}
    assert ckpt["method"] == "ToyProjection"  # a name looked up in code, never an import path
    module = load_method_checkpoint(ckpt_path, expected=ToyProjection)
    assert torch.equal(module.W, cli.model.W.detach())
    assert (tmp_path / "run" / "config.yaml").is_file()  # resolved config saved beside the run
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_rich_progress_bar_by_default_and_respects_config(toy_config, tmp_path):
    from pytorch_lightning.callbacks import RichProgressBar

    cli = train.main(["--config", str(toy_config), "--trainer.enable_progress_bar=true"], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    cli = train.main(["--config", str(toy_config)], run=False)   # enable_progress_bar: false in the config
    assert cli.trainer.progress_bar_callback is None


def test_checkpoint_errors_name_the_file(toy_config, tmp_path):
    _, ckpt_path = _fit(toy_config, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_method_checkpoint(tmp_path / "missing.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt_path.read_bytes()[:500])
    with pytest.raises(RuntimeError, match="truncated.ckpt"):
        load_method_checkpoint(truncated)
    with pytest.raises(RuntimeError, match="ToyProjection checkpoint, expected OtherToy"):
        load_method_checkpoint(ckpt_path, expected=OtherToy)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"W": torch.zeros(2)}}, plain)
    with pytest.raises(RuntimeError, match="plain.ckpt.*not written by a method"):
        load_method_checkpoint(plain)


def test_config_typo_names_the_key(toy_config, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", str(toy_config), "--model.init_args.kk", "3"], run=False)
    assert e.value.code != 0
    assert "kk" in capsys.readouterr().err


def test_print_config(toy_config, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", str(toy_config), "--print_config"])
    assert e.value.code == 0
    assert "ToyProjection" in capsys.readouterr().out


def test_evaluate_unknown_suite_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--backbone", "tiny-vit-test", "--suite", "nonexistent_suite"])
    assert e.value.code == 2
    msg = capsys.readouterr().err
    assert "nonexistent_suite" in msg and all(name in msg for name in evaluate.SUITE_TABLE)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--backbone", "tiny-vit-test"])
    assert "valid suites" in str(e.value.code) and "world" in str(e.value.code)


def test_wandb_falls_back_to_offline(monkeypatch, tmp_path):
    from xclip.utils.wandb_setup import ensure_wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert ensure_wandb_mode() == "offline"
    import os

    assert os.environ["WANDB_MODE"] == "offline"


def test_torch_threads_follow_omp_thread_limit(monkeypatch):
    """OMP_THREAD_LIMIT < torch threads corrupted conv gradients in CPU training; train.py lowers torch's threads."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_THREAD_LIMIT", "1")
        train.respect_omp_thread_limit()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
