"""Atomic writes and safe loading of checkpoints and caches."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load(weights_only=True) with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"Could not read {what} {path} (truncated or not a torch file?): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose writes are atomic (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


def check_writable_file(path: str | Path, flag: str = "--out") -> Path:
    """Before any long work: ``path`` can be written atomically (not a folder, its folder creatable and writable).
    Creates the folder; raises ValueError naming the flag, the path and the fix."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path such as {path / 'results.json'}")
    check_writable_dir(path.parent, flag, f"{flag} {path}: folder {path.parent}")
    return path


def check_writable_dir(path: str | Path, flag: str = "--out", what: str | None = None) -> Path:
    """Before any long work: folder ``path`` exists (created if missing) and a file can be created in it."""
    path = Path(path).expanduser()
    what = what or f"{flag} {path}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} is a file, not a folder; choose another location for {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} is not writable ({type(e).__name__}: {e.strerror or e}); choose a writable "
                         f"location for {flag}") from None
    return path
