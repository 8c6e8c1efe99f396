"""Atomic writes and safe loading of checkpoints and caches."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def current_umask() -> int:
    """The process umask: from /proc on Linux (no side effect), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.chmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600; finished files honour the umask
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


def _first_useful_line(e: BaseException) -> str:
    """The line of a torch.load error that says why (e.g. 'Unsupported global: GLOBAL posix.system ...')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported" in ln or "GLOBAL" in ln or "TorchScript" in ln:
            return ln[:400]
    return lines[0][:400] if lines else ""


def numpy_safe_globals() -> list[Any]:
    """Exact numpy globals for ``torch.serialization.safe_globals``: arrays, dtypes and scalars (RNG states and
    old Lightning callback states hold them), under the numpy 1 (``numpy.core``) and 2 (``numpy._core``) names."""
    import numpy as np

    mu = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtype_classes = [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4",
                                                 "u8", "b1", "c8", "c16")]
    out: list[Any] = [np.ndarray, np.dtype, *dtype_classes]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(mu._reconstruct, f"{mod}._reconstruct"), (mu.scalar, f"{mod}.scalar")]
    return out


def safe_torch_load(path: str | Path, what: str = "checkpoint", extra_globals: list[Any] | None = None) -> Any:
    """torch.load(weights_only=True) with errors that name the file.

    ``extra_globals``: exact classes/functions (or ``(obj, "module.name")`` pairs) the caller's file format is
    known to pickle, passed to ``torch.serialization.safe_globals``; torch matches names exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with torch.serialization.safe_globals(list(extra_globals or [])):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"Could not read {what} {path} (truncated, not a torch file, or it holds objects other "
                           f"than tensors and plain containers): {type(e).__name__}: {_first_useful_line(e)}") from e


def load_torch_dict(path: str | Path, what: str, required: tuple[str, ...] = (), hint: str = "") -> dict[str, Any]:
    """``safe_torch_load`` of a dict holding ``required`` keys; otherwise an error naming the file and its keys."""
    obj = safe_torch_load(path, what)
    missing = [k for k in required if k not in obj] if isinstance(obj, dict) else list(required)
    if not isinstance(obj, dict) or missing:
        held = f"keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"{what} {path} holds {held}, expected a dict with {list(required)}{hint}")
    return obj


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """json.loads of a UTF-8 file; a missing, undecodable or invalid file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({type(e).__name__}: {e})") from e


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """yaml.safe_load of a UTF-8 file (no python tags); a missing, undecodable or invalid file raises naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{what} {path} is not valid YAML ({type(e).__name__}: {str(e)[:300]})") from e


def check_config_files(argv: list[str], flag: str = "--config") -> None:
    """Each ``--config FILE`` in ``argv`` that names a file must be a UTF-8 YAML mapping (``yaml.safe_load``, no
    python tags); otherwise SystemExit with a message naming the file, before the CLI parses it."""
    values = [b for a, b in zip(argv, argv[1:]) if a == flag] + \
        [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
    for value in values:
        if not Path(value).is_file():
            continue  # jsonargparse also takes an inline YAML string; a missing file is its error
        try:
            cfg = read_yaml(value, f"{flag} file")
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if not isinstance(cfg, dict):
            raise SystemExit(f"{flag} file {value} holds {'nothing' if cfg is None else type(cfg).__name__}: "
                             f"expected a mapping of option: value")


def safe_np_load(path: str | Path, what: str = "numpy array", mmap_mode: str | None = None) -> Any:
    """np.load(allow_pickle=False) of one .npy array; anything else (pickled objects, .npz, garbage) raises
    an error naming the file."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        arr = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"Could not read {what} {path} (not a .npy array without pickled objects): "
                         f"{type(e).__name__}: {str(e)[:300]}") from e
    if not isinstance(arr, np.ndarray):
        if hasattr(arr, "close"):
            arr.close()
        raise ValueError(f"{what} {path} holds a {type(arr).__name__}, expected one .npy array")
    return arr


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose writes are atomic (temp file + rename) and whose reads (``--ckpt_path``)
    always use ``torch.load(weights_only=True)`` (numpy arrays allowed), with errors that name the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = safe_torch_load(path, "checkpoint (--ckpt_path)", extra_globals=numpy_safe_globals())
        missing = [k for k in ("state_dict", "pytorch-lightning_version") if k not in ckpt] \
            if isinstance(ckpt, dict) else None
        if missing is None or missing:
            held = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
            raise RuntimeError(f"checkpoint (--ckpt_path) {path} is not a Lightning training checkpoint: it holds "
                               f"{held} (missing {missing or ['state_dict']}).")
        return ckpt


# Every place where a user-supplied file is read, in one list (the hostile-file battery,
# tests/test_reliability_hostile.py, feeds each of them hostile files and must cover exactly these names).
# Loaders: torch files via ``safe_torch_load`` (weights_only=True, exact extra globals), JSON via ``read_json``,
# YAML via ``yaml.safe_load``, numpy via ``np.load(allow_pickle=False)``, methods via the fixed table in
# ``lightning_modules/base.py``. Add a line here (and an adapter in the test) for every new file input.
FILE_INPUTS: dict[str, str] = {
    "train --ckpt_path": "Lightning checkpoint to resume (AtomicCheckpointIO.load_checkpoint)",
    "train --config": "LightningCLI YAML config (check_config_files, then jsonargparse's safe YAML loader)",
    "evaluate --ckpt": "method checkpoint (base.load_method_checkpoint: fixed method table)",
    "evaluate --ckpt (CoOp prompt file)": "CoOp/Dassl model.pth.tar-N (prompt_learner.read_dassl_prompt_checkpoint)",
    "train --model.init_args.init_ctx_from": "CoOp/Dassl prompt file starting a CoOp run (same reader)",
    "CoOp split_fewshot pkl": "CoOp split_fewshot/shot_K-seed_S.pkl (coop_datasets.read_split_fewshot_pkl)",
    "evaluate --projection": "spelling projection W (spelling.load_projection)",
    "evaluate --pretrained": "CLIP weights file (clip_backbone.load_clip_weights); also every other --pretrained",
    "evaluate --saliency-prf-file": "maps + boxes torch file (saliency_prf.load_maps_and_masks)",
    "evaluate --spatial-generation-prompts": "layouts JSON (spatial_generation.load_layouts)",
    "evaluate --spatial-generation-vqgan-ckpt": "taming VQGAN ckpt (vqgan.load_taming_state_dict)",
    "evaluate --spatial-generation-vqgan-config": "taming VQGAN yaml (vqgan.load_vqgan_config: yaml.safe_load)",
    "generate --config": "YAML option defaults of any subcommand (check_config_files: yaml.safe_load)",
    "evaluate --config": "YAML settings (check_config_files)",
    "analyze --config": "YAML settings of a subcommand (check_config_files)",
    "generate styleclip-mapper --ckpt": "mapper checkpoint (base.resolve_method + load_method_checkpoint)",
    "generate styleclip-optimize --generator-checkpoint": "rosinality StyleGAN2 (stylegan2.read_generator_checkpoint;"
                                                          " also styleclip-global / -mapper)",
    "generate styleclip-optimize --latent-path": "W+ latent (datamodules.latents.load_latents; also "
                                                 "styleclip-mapper --latents, LatentsDataModule)",
    "generate styleclip-optimize --arcface-checkpoint": "ArcFace IR-SE50 weights (arcface.load_arcface)",
    "generate styleclip-global --latent-path": "W+ latents (load_latents)",
    "generate styleclip-global --cache-dir": "S statistics / channel relevance caches (safe_torch_load)",
    "generate vqgan-clip --vqgan_ckpt": "taming VQGAN ckpt (vqgan.load_taming_state_dict)",
    "generate vqgan-clip --vqgan_config": "taming VQGAN yaml",
    "generate vqgan-clip --projection": "spelling projection W",
    "generate zerocap --references": "references JSON (zerocap.reference_metrics)",
    "analyze --pretrained": "CLIP weights file",
    "analyze --store (manifest)": "decomposition store manifest JSON (analysis.store)",
    "analyze --store (shard)": "decomposition store shard .npy (np.load allow_pickle=False)",
    "mapper file": "StyleCLIP mapper tensors (models.mapper.load_styleclip_mapper)",
    "feature cache": "cached quintuple features (datamodules.feature_cache)",
    "few-shot split": "few-shot split manifest JSON (datamodules.fewshot.load_or_create_manifest)",
    "clip_pretrain export": "ClipPretrain checkpoint (clip_pretrain.clip_state_from_checkpoint)",
}


def check_writable_file(path: str | Path, flag: str = "--out") -> Path:
    """Before any long work: ``path`` can be written atomically (not a folder, its folder creatable and writable).
    Creates the folder; raises ValueError naming the flag, the path and the fix."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path such as {path / 'results.json'}")
    check_writable_dir(path.parent, flag, f"{flag} {path}: folder {path.parent}")
    return path


def check_writable_dir(path: str | Path, flag: str = "--out", what: str | None = None) -> Path:
    """Before any long work: folder ``path`` exists (created if missing) and a file can be created in it.

    ``what`` names the folder in the messages ("<what> is not writable"); by default it is "<flag> <path>", said to
    be "not a writable folder"."""
    path = Path(path).expanduser()
    what, problem = (what, "is not writable") if what else (f"{flag} {path}", "is not a writable folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} is a file, not a folder; choose another location for {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {problem} ({type(e).__name__}: {e.strerror or e}); choose a writable "
                         f"location for {flag}") from None
    return path
