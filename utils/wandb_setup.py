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
