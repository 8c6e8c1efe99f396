"""Training entry point (LightningCLI): fit / validate / test / predict.

    python train.py fit --config configs/spelling/forget_to_spell.yaml
    python train.py fit --config configs/coop/imagenet_16shot.yaml --trainer.devices 4 --trainer.strategy ddp
    python train.py fit --config <cfg> --ckpt_path last          # resume a killed run
    python train.py fit --config <cfg> --print_config            # resolved config

Outputs: everything of a run goes under ``trainer.default_root_dir`` (configs set ``runs/<name>``; unset:
``runs/<config folder>_<config name>``): the resolved ``config.yaml`` (or beside the logger's files) and the
checkpoints in ``{default_root_dir}/checkpoints`` -- every ModelCheckpoint without an explicit ``dirpath`` writes
there, whatever the logger, so ``--ckpt_path last`` finds them and ``--trainer.default_root_dir`` moves them.
``--ckpt_path last`` with no checkpoint there is an error (omit it to start fresh); a ``--ckpt_path`` file is read
with ``weights_only=True`` and checked (a training checkpoint of the configured method) before the run starts.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar  # noqa: E402
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402

from xclip.utils.io import AtomicCheckpointIO  # noqa: E402
from xclip.utils.wandb_setup import ensure_wandb_mode  # noqa: E402


class SaveConfigToLogger(SaveConfigCallback):
    """Writes the resolved config beside the run and, for W&B, into the run's config."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.log_hyperparams(self.config.as_dict())


CHECKPOINT_SUBDIR = "checkpoints"
LIGHTNING_CKPT_ALIASES = ("best", "hpc", "registry")   # resolved by Lightning itself


class CheckpointPathError(SystemExit):
    """A bad ``--ckpt_path``: the message names the file (or folder) and says what to do."""


def default_run_dir(config_files: list[Any]) -> str:
    """``runs/<folder>_<name>`` of the last --config file (``runs/train`` without one)."""
    if not config_files:
        return str(Path("runs") / "train")
    cfg = Path(str(getattr(config_files[-1], "absolute", config_files[-1])))
    return str(Path("runs") / f"{cfg.parent.name}_{cfg.stem}")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.rsplit(".", 1)[-1].lower())


def same_method(stored: str, model_class: str) -> bool:
    """Lenient match of a checkpoint's method name (a class path or a short table name) with a class name."""
    a, b = _norm(stored), _norm(model_class)
    return bool(a) and (a.startswith(b) or b.startswith(a))


def describe_unreadable(path: Path) -> str:
    head = path.read_bytes()[:4] if path.stat().st_size else b""
    size = path.stat().st_size
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        return f"a zip archive of {size} bytes that torch cannot read (truncated or corrupt checkpoint)"
    if head[:1] == b"\x80":
        return f"a {size}-byte pickle that is truncated or holds objects other than tensors and containers"
    return f"{size} bytes that are not a torch checkpoint (starts with {head!r})"


def check_checkpoint_file(path: Path, model: pl.LightningModule, subcommand: str) -> None:
    """Refuse, with a message naming the file and what it holds, anything but a checkpoint of this method."""
    from xclip.utils.io import safe_torch_load

    flag = f"--ckpt_path {path}"
    if not path.is_file():
        raise CheckpointPathError(f"{flag}: no such file" + (" (it is a folder)" if path.is_dir() else "") + ".")
    try:
        ckpt = safe_torch_load(path, "checkpoint")
    except Exception as e:  # noqa: BLE001 -- any failure to read is reported with what the file is
        raise CheckpointPathError(f"{flag}: cannot be read as a checkpoint: the file is {describe_unreadable(path)} "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None
    want = type(model).__name__
    if not isinstance(ckpt, dict):
        what = f"a tensor of shape {tuple(ckpt.shape)}" if hasattr(ckpt, "shape") else f"a {type(ckpt).__name__}"
        raise CheckpointPathError(f"{flag}: holds {what}, not a Lightning checkpoint of {want}.")
    if "state_dict" not in ckpt:
        keys = sorted(map(str, ckpt))[:6]
        raise CheckpointPathError(f"{flag}: holds a dict of {len(ckpt)} entries ({', '.join(keys)}, ...) -- e.g. "
                                  f"plain model weights -- not a Lightning checkpoint of {want} (no 'state_dict').")
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), dict) else {}
    stored = ckpt.get("method") or hparams.get("_class_path")
    if isinstance(stored, str) and not same_method(stored, want):
        raise CheckpointPathError(f"{flag}: holds a {stored.rsplit('.', 1)[-1]} checkpoint, but the config trains "
                                  f"{want}; pass a checkpoint of this config's runs (or the matching --config).")
    if subcommand == "fit" and not ({"loops", "optimizer_states"} <= set(ckpt)):
        raise CheckpointPathError(f"{flag}: holds {want} weights but no training state (loops, optimizer_states): "
                                  f"it cannot resume a run. Omit --ckpt_path to start a fresh run.")


def find_last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The newest last*.ckpt of the trainer's ModelCheckpoint folders (Lightning's own rule for 'last')."""
    found = [p for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath
             for p in Path(cb.dirpath).glob("last*.ckpt") if re.fullmatch(r"last(-v\d+)?\.ckpt", p.name)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class SaveLastAtTrainEnd(pl.Callback):
    """Lightning 2.6 writes last.ckpt at train end only when no checkpoint was written before, so with
    ``every_n_train_steps`` not dividing the run's length last.ckpt missed the final steps: write it."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb._last_global_step_saved != trainer.global_step:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))


class CLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        """Lightning re-reads the model's settings -- class included -- from a --ckpt_path file before anything
        is checked (raw errors on a truncated file, a spelling checkpoint silently turning a CoOp config into a
        spelling run). Here the config decides the model, and ``check_checkpoint_file`` checks the file."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is not None and cfg.get("trainer") is not None and cfg.trainer.get("default_root_dir") is None:
            cfg.trainer.default_root_dir = default_run_dir(cfg.get("config") or self.config.get("config") or [])

    def _resolve_ckpt_path(self, subcommand: str) -> None:
        cfg = self.config_init[subcommand]
        path = cfg.get("ckpt_path")
        if path is None or path in LIGHTNING_CKPT_ALIASES:
            return
        if path == "last":
            found = find_last_checkpoint(self.trainer)
            if found is None:
                dirs = sorted({str(cb.dirpath) for cb in self.trainer.checkpoint_callbacks
                               if isinstance(cb, ModelCheckpoint) and cb.dirpath})
                raise CheckpointPathError(
                    f"--ckpt_path last: no last.ckpt in {', '.join(dirs) or '(no checkpoint folder configured)'} "
                    f"(checkpoints of this config go to {{trainer.default_root_dir}}/{CHECKPOINT_SUBDIR}; pass the "
                    f"same --trainer.default_root_dir as the run to resume). Omit --ckpt_path to start a fresh run.")
            logging.getLogger("train").info("resuming from %s", found)
            cfg["ckpt_path"] = path = str(found)
        check_checkpoint_file(Path(path), self.model, subcommand)

    def before_fit(self) -> None:
        self._resolve_ckpt_path("fit")

    def before_validate(self) -> None:
        self._resolve_ckpt_path("validate")

    def before_test(self) -> None:
        self._resolve_ckpt_path("test")

    def before_predict(self) -> None:
        self._resolve_ckpt_path("predict")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        # Rich progress bar by default (a config may still pick its own bar or enable_progress_bar: false).
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and \
                not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # checkpoints are written atomically
        # One fixed, predictable checkpoint folder per run, whatever the logger (W&B would use a new run-id folder
        # per launch, so `--ckpt_path last` never found the previous launch's files).
        ckpt_dir = os.path.realpath(os.path.join(trainer.default_root_dir, CHECKPOINT_SUBDIR))
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = ckpt_dir
        trainer.callbacks.append(SaveLastAtTrainEnd())
        return trainer


def respect_omp_thread_limit() -> None:
    """OMP_THREAD_LIMIT below torch's thread count gave garbage conv weight gradients (|g| ~ 1e35, then NaN) in CPU
    training on torch 2.14; run with as many torch threads as OpenMP will actually provide."""
    import torch

    limit = os.environ.get("OMP_THREAD_LIMIT", "")
    if limit.isdigit() and 0 < int(limit) < torch.get_num_threads():
        logging.getLogger("train").warning("OMP_THREAD_LIMIT=%s < torch threads (%d): using %s torch thread(s).",
                                           limit, torch.get_num_threads(), limit)
        torch.set_num_threads(int(limit))


def main(args: list[str] | None = None, run: bool = True) -> CLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    respect_omp_thread_limit()
    ensure_wandb_mode()
    return CLI(
        pl.LightningModule, pl.LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        save_config_callback=SaveConfigToLogger,
        save_config_kwargs={"overwrite": True},
        args=args, run=run,
    )


if __name__ == "__main__":
    main()
