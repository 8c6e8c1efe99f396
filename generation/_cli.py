"""Shared pieces of the `xclip generate` subcommands: dataclass <-> namespace, early input/output checks, atomic
PNG/JSON writes. Every check here runs before any model is built, and raises ``SystemExit`` with a message that
names the flag, the value and the fix (nothing is written when a check fails)."""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from(cls: type[T], ns: Any, **overrides) -> T:
    """The dataclass ``cls`` from the same-named keys of a (jsonargparse) namespace."""
    kw = {f.name: ns[f.name] if hasattr(ns, "__getitem__") else getattr(ns, f.name) for f in fields(cls)
          if f.name in ns}
    return cls(**{**kw, **overrides})


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output folder that exists as a folder, or can be created, and is writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SystemExit(f"{flag} {p}: exists and is not a folder; pass a folder path (results are written into it)")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise SystemExit(f"{flag} {p}: {base} is a file, so the folder cannot be created; pass another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} {p}: {base} is not writable; pass a writable folder")
    return p


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """An output file whose folder exists or can be created and is writable, and which is not a folder."""
    p = Path(path)
    if p.is_dir():
        raise SystemExit(f"{flag} {p}: is a folder; pass a file path (e.g. {p / 'captions.json'})")
    check_out_dir(p.parent, flag)
    if p.exists() and not os.access(p, os.W_OK):
        raise SystemExit(f"{flag} {p}: exists and is not writable; pass another path")
    return p


def check_file(path: str | Path | None, flag: str, what: str) -> None:
    """An input file that must exist (``None`` = not given: no check)."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        state = "is a folder" if p.is_dir() else "not found"
        raise SystemExit(f"{flag} {p}: {what} {state}; pass the path of an existing file")
    if not os.access(p, os.R_OK):
        raise SystemExit(f"{flag} {p}: {what} is not readable (permissions)")


def check_device(device: str, flag: str = "--device") -> None:
    """A torch device string that exists on this machine (a CUDA device needs a visible GPU)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SystemExit(f"{flag} {device!r}: not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{flag} {device}: no CUDA device is visible here; pass {flag} cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here; pass cuda:0")


def check_text(value: str | None, flag: str, example: str) -> None:
    if value is None or not str(value).strip():
        raise SystemExit(f"{flag} is empty; give the text to optimise for, e.g. {flag} {example!r}")


def check_range(value: float, flag: str, low: float, fix: str) -> None:
    if value < low:
        raise SystemExit(f"{flag} {value}: must be >= {low:g}; {fix}")


def finite(obj: Any) -> Any:
    """Non-finite floats (NaN, +-inf) -> None, recursively: JSON that every parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | Path) -> None:
    """Atomic JSON write; never NaN/Infinity (non-finite values become null)."""
    from xclip.utils.io import atomic_write_bytes

    text = json.dumps(finite(obj), indent=2, allow_nan=False, default=str) + "\n"
    atomic_write_bytes(path, text.encode())


def save_png(images, path: str | Path, **kwargs) -> None:
    """torchvision ``save_image`` (tensor(s) in [0, 1]) written atomically."""
    from torchvision.utils import save_image

    from xclip.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    save_image(images, buf, format="png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())
