"""Chunked on-disk arrays for large contribution tensors (e.g. ImageNet-val x L x H x D).

An array ``name`` in folder ``root`` is a set of ``.npy`` shards of at most ``shard_rows`` rows each plus a JSON
manifest. Every shard and every manifest update is written atomically (temp file + rename), so an interrupted run
leaves only complete shards; ``ShardedWriter(..., resume=True)`` continues after them. Reading memory-maps
one shard at a time, so memory stays bounded by a shard (writer) or by the slice requested (reader).

    w = ShardedWriter(root, "heads", item_shape=(L, H, D), shard_rows=512)
    for batch in ...: w.append(batch)          # [b, L, H, D]
    w.close()
    heads = ShardedArray(root, "heads")        # heads.shape == (K, L, H, D)
    col = get_head_column(heads, l, h)         # torch [K, D], read shard by shard
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from xclip.utils.io import atomic_write_bytes, atomic_write_json, read_json, safe_np_load


def _manifest_path(root: Path, name: str) -> Path:
    return root / f"{name}.json"


class ShardedWriter:
    """Append rows [b, *item_shape]; full shards are flushed to disk immediately."""

    def __init__(self, root: str | Path, name: str, item_shape: Sequence[int], dtype: str = "float32",
                 shard_rows: int = 1024, resume: bool = False):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.root, self.name = Path(root), name
        self.item_shape, self.dtype, self.shard_rows = tuple(int(s) for s in item_shape), np.dtype(dtype), shard_rows
        self.root.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        mpath = _manifest_path(self.root, name)
        if resume and mpath.is_file():
            man = read_json(mpath, "store manifest")
            if tuple(man["item_shape"]) != self.item_shape or man["dtype"] != self.dtype.str:
                raise ValueError(f"{mpath}: stored item_shape {man['item_shape']} / dtype {man['dtype']} do not "
                                 f"match the requested {list(self.item_shape)} / {self.dtype.str}")
            self.shards = [s for s in man["shards"] if (self.root / s["file"]).is_file()]
        self._buf: list[np.ndarray] = []
        self._buf_rows = 0
        self.closed = False

    @property
    def rows_done(self) -> int:
        """Rows already on disk (a resumed run skips this many inputs)."""
        return sum(s["rows"] for s in self.shards)

    def append(self, rows: np.ndarray | torch.Tensor) -> None:
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.item_shape:
            raise ValueError(f"{self.name}: appended rows have shape {rows.shape}, expected [b, *{self.item_shape}]")
        while len(rows):
            take = min(self.shard_rows - self._buf_rows, len(rows))
            self._buf.append(rows[:take].copy())
            self._buf_rows += take
            rows = rows[take:]
            if self._buf_rows == self.shard_rows:
                self._flush()

    def _flush(self, complete: bool = False) -> None:
        if self._buf_rows:
            data = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
            fname = f"{self.name}.{len(self.shards):05d}.npy"
            buf = io.BytesIO()
            np.save(buf, data, allow_pickle=False)
            atomic_write_bytes(self.root / fname, buf.getvalue())
            self.shards.append({"file": fname, "rows": int(len(data))})
            self._buf, self._buf_rows = [], 0
        atomic_write_json({"name": self.name, "item_shape": list(self.item_shape), "dtype": self.dtype.str,
                           "shard_rows": self.shard_rows, "shards": self.shards, "complete": complete},
                          _manifest_path(self.root, self.name))

    def close(self) -> None:
        if not self.closed:
            self._flush(complete=True)
            self.closed = True

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()


class ShardedArray:
    """Read-only view of a sharded array; indexing reads only the shards it touches (memory-mapped)."""

    def __init__(self, root: str | Path, name: str, require_complete: bool = True):
        self.root, self.name = Path(root), name
        mpath = _manifest_path(self.root, name)
        if not mpath.is_file():
            raise FileNotFoundError(f"no stored array {name!r} in {self.root} (missing {mpath.name}); "
                                    f"run `analyze.py decompose` first")
        man = read_json(mpath, "store manifest")
        if require_complete and not man.get("complete", False):
            raise RuntimeError(f"{mpath}: the array is incomplete (interrupted run?); resume `analyze.py decompose`")
        self.item_shape = tuple(man["item_shape"])
        self.dtype = np.dtype(man["dtype"])
        self.files = [self.root / s["file"] for s in man["shards"]]
        self.rows = [int(s["rows"]) for s in man["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(int)
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"{mpath} lists shard {f.name}, which is missing")

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.offsets[-1]), *self.item_shape)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shard(self, i: int) -> np.ndarray:
        return safe_np_load(self.files[i], "store shard", mmap_mode="r")

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, memory-mapped shard [rows, *item_shape]) for each shard, in order."""
        for i in range(len(self.files)):
            yield int(self.offsets[i]), self.shard(i)

    def __getitem__(self, index) -> np.ndarray:
        """Index like a numpy array; the first axis must be an int or a slice with step 1."""
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        n = len(self)
        if isinstance(first, (int, np.integer)):
            i = int(first) + (n if first < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"{self.name}: row {first} out of range for {n} rows")
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            return np.asarray(self.shard(s)[(i - self.offsets[s], *rest)])
        if not isinstance(first, slice) or first.step not in (None, 1):
            raise TypeError(f"{self.name}: first index must be an int or a step-1 slice, got {first!r}")
        start, stop, _ = first.indices(n)
        parts = []
        for s in range(len(self.files)):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo < hi:
                parts.append(np.asarray(self.shard(s)[(slice(lo - self.offsets[s], hi - self.offsets[s]), *rest)]))
        if not parts:
            return np.empty((0, *np.empty(self.item_shape)[rest].shape), dtype=self.dtype)
        return np.concatenate(parts)


def get_head_column(heads, layer: int, head: int) -> torch.Tensor:
    """[K, D] float32 contributions of one head from a [K, L, H, D] tensor / ndarray / ShardedArray."""
    if isinstance(heads, torch.Tensor):
        return heads[:, layer, head].float()
    return torch.from_numpy(np.ascontiguousarray(heads[:, layer, head], dtype=np.float32))


def to_tensor(arr) -> torch.Tensor:
    """A whole stored array as a float32 tensor (only for arrays known to fit in memory)."""
    if isinstance(arr, torch.Tensor):
        return arr.float()
    return torch.from_numpy(np.ascontiguousarray(arr[:], dtype=np.float32))
