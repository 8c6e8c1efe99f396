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
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar  # noqa: E402
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402

from xclip.lightning_modules.base import connect  # noqa: E402
from xclip.utils.io import AtomicCheckpointIO  # noqa: E402
from xclip.utils.resume import default_run_dir, resolve_ckpt_path, use_run_checkpoint_dir  # noqa: E402
from xclip.utils.threads import configure_threads  # noqa: E402
from xclip.utils.wandb_setup import ensure_wandb_mode  # noqa: E402


class SaveConfigToLogger(SaveConfigCallback):
    """Writes the resolved config beside the run and, for W&B, into the run's config."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.log_hyperparams(self.config.as_dict())


class CLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        """Lightning re-reads the model's settings -- class included -- from a --ckpt_path file before anything
        is checked (raw errors on a truncated file, a spelling checkpoint silently turning a CoOp config into a
        spelling run). Here the config decides the model, and ``check_checkpoint_file`` checks the file."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is not None and cfg.get("trainer") is not None and cfg.trainer.get("default_root_dir") is None:
            cfg.trainer.default_root_dir = default_run_dir(cfg.get("config") or self.config.get("config") or [])

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        connect(self.model, self.datamodule)  # class names -> method, frozen CLIP -> feature datamodule

    def _resolve_ckpt_path(self, subcommand: str) -> None:
        cfg = self.config_init[subcommand]
        if cfg.get("ckpt_path") is not None:
            cfg["ckpt_path"] = resolve_ckpt_path(cfg["ckpt_path"], self.trainer, self.model, subcommand)
            if "weights_only" in self._subcommand_method_arguments[subcommand] and cfg.get("weights_only") is None:
                cfg["weights_only"] = True   # Lightning's own load: tensors and containers only

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
        use_run_checkpoint_dir(trainer)  # {default_root_dir}/checkpoints, whatever the logger
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


def exit_on_backbone_error(error: BaseException) -> None:
    """A model's BackboneError (missing weights, offline...) reaches us wrapped in jsonargparse's union dump:
    print its message alone and exit 2. Returns (for the caller to re-raise) when there is none in the chain."""
    from xclip.models.clip_backbone import BackboneError

    seen: set[int] = set()
    cur: BaseException | None = error
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, BackboneError):
            print(f"error: {cur}", file=sys.stderr)
            raise SystemExit(2) from None
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__


def main(args: list[str] | None = None, run: bool = True) -> CLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # utils/threads.py: never more torch threads than free cores
    respect_omp_thread_limit()
    ensure_wandb_mode()
    from xclip.utils.io import check_config_files

    check_config_files(list(sys.argv[1:] if args is None else args))  # a bad --config file is named first
    try:
        return CLI(
            pl.LightningModule, pl.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=SaveConfigToLogger,
            save_config_kwargs={"overwrite": True},
            args=args, run=run,
        )
    except Exception as e:  # noqa: BLE001 - re-raised unless it wraps a BackboneError
        exit_on_backbone_error(e)
        raise


if __name__ == "__main__":
    main()
