"""A training DataLoader whose order is a pure function of (seed, epoch) and which resumes mid-epoch.

    loader = ResumableLoader(dataset, batch_size=32, shuffle=True, drop_last=True)   # seed: the run's seed
    loader = ResumableLoader(dataset, 32, shuffle=True, seed_items=True)   # + per-item torch seeds (augmentation)

Why: a plain ``DataLoader(shuffle=True)`` draws its permutation (and its workers' base seed) from the global torch
RNG, so the order of a resumed run -- or of a run whose feature cache was computed first, which consumed RNG --
differs from an uninterrupted one, and a run killed mid-epoch restarts that epoch from its first batch.

Here:
- epoch ``e`` visits ``randperm(n)`` of a ``torch.Generator`` seeded from (seed, e) (``set_epoch`` is called by
  Lightning at every epoch start); the global RNG is never read;
- ``seed_items=True``: item ``i`` of epoch ``e`` runs under ``torch.manual_seed(s[e, i])`` (inside
  ``fork_rng``), so random augmentations (torchvision's RandomResizedCrop / flip) do not depend on the worker
  count, the process or what ran before;
- ``state_dict()`` = {epoch, batches yielded in that epoch, ...}; Lightning stores it in the checkpoint
  (``loops.fit_loop.state_dict.combined_loader``) and calls ``load_state_dict`` on ``--ckpt_path``; the resumed
  epoch then skips the batches already trained on, so the resumed run sees exactly the remaining batches.

``seed`` None = the seed of ``seed_everything`` (``PL_GLOBAL_SEED``), else 0.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

STATE_FORMAT = 1


def mix_seed(*parts: object) -> int:
    """A 62-bit seed from any parts (stable across processes, unlike ``hash``)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def run_seed(seed: int | None) -> int:
    if seed is not None:
        return int(seed)
    env = os.environ.get("PL_GLOBAL_SEED", "")
    return int(env) if env.lstrip("-").isdigit() else 0


class _SeededItems(Dataset):
    """``base[i]`` computed under ``torch.manual_seed(s)`` for an index ``(i, s)``; the caller's RNG is kept."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: tuple[int, int]):
        i, s = index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return self.base[i]


class EpochBatchSampler(Sampler[list]):
    """Batches of a (seed, epoch)-determined order; ``skip`` leading batches of ``skip_epoch`` are left out once."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int, seed_items: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.drop_last = int(n), int(batch_size), shuffle, drop_last
        self.seed, self.seed_items = int(seed), seed_items
        self.epoch = 0
        self.skip_epoch, self.skip = -1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self, epoch: int) -> tuple[list[int], list[int] | None]:
        g = torch.Generator().manual_seed(mix_seed("order", self.seed, epoch))
        idx = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        seeds = torch.randint(0, 2 ** 62, (self.n,), generator=g).tolist() if self.seed_items else None
        return idx, seeds

    def begin(self) -> int:
        """Batches of the current epoch to leave out (consumes a pending resume skip)."""
        skip = self.skip if self.skip_epoch == self.epoch else 0
        self.skip_epoch, self.skip = -1, 0
        return min(skip, len(self))

    def batches(self, start: int) -> Iterator[list]:
        idx, seeds = self.order(self.epoch)
        items: list = idx if seeds is None else [(i, seeds[i]) for i in idx]
        for b in range(start, len(self)):
            yield items[b * self.batch_size:(b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list]:  # standalone use (the loader drives ``batches`` itself)
        return self.batches(self.begin())


class ResumableLoader(DataLoader):
    """DataLoader over ``dataset`` in a (seed, epoch) order, stateful for Lightning (see the module doc)."""

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = True, drop_last: bool = False,
                 seed: int | None = None, seed_items: bool = False, num_workers: int = 0,
                 collate_fn: Callable | None = None, persistent_workers: bool = False, pin_memory: bool = False):
        self._sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, drop_last, run_seed(seed),  # type: ignore[arg-type]
                                          seed_items)
        self._start = 0
        self._yielded = 0
        super().__init__(_SeededItems(dataset) if seed_items else dataset, batch_sampler=_Driven(self._sampler),
                         num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
                         persistent_workers=persistent_workers and num_workers > 0,
                         generator=torch.Generator().manual_seed(mix_seed("workers", self._sampler.seed)))

    def set_epoch(self, epoch: int) -> None:
        self._sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: the epoch and the resume skip are read at the first next(), after Lightning's set_epoch.
        start = self._sampler.begin()
        self.batch_sampler.start = start  # type: ignore[union-attr]
        self._yielded = start
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    # ---- Lightning's stateful-dataloader protocol ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self._sampler
        return {"format": STATE_FORMAT, "epoch": s.epoch, "batches": self._yielded, "seed": s.seed, "n": s.n,
                "batch_size": s.batch_size, "shuffle": s.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self._sampler
        mine = {"seed": s.seed, "n": s.n, "batch_size": s.batch_size, "shuffle": s.shuffle}
        theirs = {k: state.get(k) for k in mine}
        if state.get("format") != STATE_FORMAT or theirs != mine:
            raise ValueError(f"the checkpoint's training data order {theirs} differs from this run's {mine}: "
                             f"resume with the same seed_everything and data settings (dataset size, batch_size), "
                             f"or omit --ckpt_path to start a fresh run.")
        s.skip_epoch, s.skip = int(state["epoch"]), int(state["batches"])


class _Driven(Sampler[list]):
    """The batch sampler handed to DataLoader: iterates the EpochBatchSampler from ``start``."""

    def __init__(self, sampler: EpochBatchSampler):
        self.sampler, self.start = sampler, 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list]:
        return self.sampler.batches(self.start)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def is_distributed(datamodule: object) -> bool:
    """True when the datamodule's trainer runs several processes: Lightning then shards with its own
    DistributedSampler (seeded per epoch), and resume is exact at epoch boundaries only."""
    trainer = getattr(datamodule, "trainer", None)
    return trainer is not None and trainer.world_size > 1
