"""W&B is the logger of record; without an API key it falls back to offline mode (never fails, never hangs)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def ensure_wandb_mode() -> str:
    """Set WANDB_MODE=offline when no key is configured and the user chose no mode; returns the mode."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if _has_api_key():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    log.warning("W&B: no API key configured -> logging offline (sync later with `wandb sync`). "
                "Set WANDB_MODE=disabled to turn W&B off.")
    return "offline"


# ---------------------------------------------------------------------------------------------------- images
def to_uint8_image(image, value_range: tuple[float, float] = (0.0, 1.0)):
    """Image file path | PIL image | matplotlib figure | array / tensor ([3, H, W], [H, W, 3], [H, W], [1, 3, H, W]) -> uint8 [H, W, 3]
    (or [H, W] for one channel).  Float data is mapped from ``value_range`` to 0..255 (clamped, rounded); uint8 data
    passes unchanged.  wandb itself casts float arrays with ``astype(uint8)``, which turns a [0, 1] image black."""
    import numpy as np

    if isinstance(image, (str, Path)):  # an image file (e.g. a saved figure)
        from PIL import Image as PILImage

        with PILImage.open(image) as im:
            return np.asarray(im.convert("RGB")).copy()
    if hasattr(image, "savefig") and hasattr(image, "canvas"):  # matplotlib Figure
        image.canvas.draw()
        return np.asarray(image.canvas.buffer_rgba())[..., :3].copy()
    try:
        from PIL import Image as PILImage

        if isinstance(image, PILImage.Image):
            return np.asarray(image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode)).copy()
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu()
        image = image.float().numpy() if image.is_floating_point() else image.numpy()
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"cannot log an image of shape {arr.shape}: expected [3, H, W], [H, W, 3] or [H, W].")
    if arr.dtype == np.uint8:
        return arr.copy()
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}.")
    scaled = (arr.astype(np.float64) - lo) / (hi - lo)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
    return (scaled.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)


def wandb_image(image, caption: str | None = None, value_range: tuple[float, float] = (0.0, 1.0)):
    """A ``wandb.Image`` of correctly converted uint8 pixels (see to_uint8_image)."""
    import wandb

    return wandb.Image(to_uint8_image(image, value_range), caption=caption)


def log_images(logger, key: str, images, captions=None, step: int | None = None,
               value_range: tuple[float, float] = (0.0, 1.0)) -> list:
    """Log pictures under ``key`` correctly whatever they are (see to_uint8_image).

    ``logger``: a Lightning ``WandbLogger``, a ``wandb`` run (anything with ``.log``), a list of Lightning loggers
    (the W&B ones are used) or None (nothing is logged).  ``images``: one picture or a sequence.  Returns the uint8
    arrays (so callers and tests can check what was logged)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    arrays = [to_uint8_image(im, value_range) for im in images]
    if captions is not None:
        captions = [captions] * len(arrays) if isinstance(captions, str) else list(captions)
        if len(captions) != len(arrays):
            raise ValueError(f"{len(captions)} captions for {len(arrays)} images under {key!r}.")
    targets = list(logger) if isinstance(logger, (list, tuple)) else [logger]
    for lg in targets:
        if lg is None:
            continue
        if hasattr(lg, "log_image") and type(lg).__name__ != "Run":  # Lightning WandbLogger (or a stand-in)
            if not _is_wandb_logger(lg):
                continue
            kwargs = {"caption": captions} if captions is not None else {}
            lg.log_image(key=key, images=arrays, step=step, **kwargs)
        elif hasattr(lg, "log"):  # a wandb run
            import wandb

            pics = [wandb.Image(a, caption=None if captions is None else captions[i]) for i, a in enumerate(arrays)]
            lg.log({key: pics}, **({"step": step} if step is not None else {}))
    return arrays


def _is_wandb_logger(lg) -> bool:
    try:
        from pytorch_lightning.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return False
    return isinstance(lg, WandbLogger)
