"""Where a training run writes, and what ``--ckpt_path`` may point at (used by train.py).

- ``default_run_dir``: ``runs/<config folder>_<config name>`` when a config sets no ``trainer.default_root_dir``;
- every ModelCheckpoint without a ``dirpath`` writes to ``{default_root_dir}/checkpoints`` (``CHECKPOINT_SUBDIR``),
  whatever the logger; ``find_last_checkpoint`` is Lightning's rule for ``last`` (newest ``last*.ckpt``);
- ``check_checkpoint_file``: a ``--ckpt_path`` file is read with ``weights_only=True`` and must be a training
  checkpoint of the configured method, else a ``CheckpointPathError`` (a SystemExit) naming the file and what it
  holds;
- ``SaveLastAtTrainEnd``: last.ckpt always holds the final step.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger("train")

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


def use_run_checkpoint_dir(trainer: pl.Trainer) -> None:
    """Every ModelCheckpoint without a dirpath writes to {default_root_dir}/checkpoints (W&B would use a new run-id
    folder per launch, so `--ckpt_path last` never found the previous launch's files); last.ckpt holds the end."""
    ckpt_dir = os.path.realpath(os.path.join(trainer.default_root_dir, CHECKPOINT_SUBDIR))
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = ckpt_dir
    trainer.callbacks.append(SaveLastAtTrainEnd())


def resolve_ckpt_path(path: str, trainer: pl.Trainer, model: pl.LightningModule, subcommand: str) -> str:
    """``last`` -> the newest last*.ckpt of the run's checkpoint folders (an error when there is none); a file is
    checked by ``check_checkpoint_file``; Lightning's other aliases pass through."""
    if path in LIGHTNING_CKPT_ALIASES:
        return path
    if path == "last":
        found = find_last_checkpoint(trainer)
        if found is None:
            dirs = sorted({str(cb.dirpath) for cb in trainer.checkpoint_callbacks
                           if isinstance(cb, ModelCheckpoint) and cb.dirpath})
            raise CheckpointPathError(
                f"--ckpt_path last: no last.ckpt in {', '.join(dirs) or '(no checkpoint folder configured)'} "
                f"(checkpoints of this config go to {{trainer.default_root_dir}}/{CHECKPOINT_SUBDIR}; pass the "
                f"same --trainer.default_root_dir as the run to resume). Omit --ckpt_path to start a fresh run.")
        log.info("resuming from %s", found)
        path = str(found)
    check_checkpoint_file(Path(path), model, subcommand)
    return path
