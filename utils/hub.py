"""Where hub downloads live, and whether the hub can be reached: answered in seconds, never by a retry loop.

    offline_reason()        # "HF_HUB_OFFLINE=1" | "https://huggingface.co is unreachable (...)" | None
    cached_hub_file("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors")   # path or None

huggingface_hub retries a missing file for ~1 min (10 s timeouts) when the machine has no network but
``HF_HUB_OFFLINE`` is unset; callers check the cache first and this probe second, so a missing file fails at once
with a message that says how to supply it. The probe is one HTTP HEAD of the hub endpoint (``HF_ENDPOINT``; the
environment's proxy applies) with a 3 s bound, DNS included.
"""
from __future__ import annotations

import os
import threading
import time

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")
_probe_cache: dict[str, tuple[float, bool]] = {}


def hub_offline_env() -> str | None:
    """The environment variable that switches the hub off, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "0").strip().lower() in _TRUE:
            return var
    return None


def hub_cache_dir() -> str:
    """The HF hub cache folder as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub), read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_endpoint() -> str:
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except Exception:  # noqa: BLE001 - huggingface_hub missing or changed
        return "https://huggingface.co"


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One HTTP HEAD of the hub endpoint (through the environment's proxy, if any), bounded by ``timeout``
    including DNS; any HTTP answer counts, a TCP connect alone does not (sandboxes accept those). Cached 60 s."""
    import urllib.error
    import urllib.request

    endpoint = hub_endpoint()
    hit = _probe_cache.get(endpoint)
    if hit is not None and time.monotonic() - hit[0] < 60:
        return hit[1]
    result = [False]

    def head() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
                result[0] = True
        except urllib.error.HTTPError:  # the hub answered (4xx/5xx): it is reachable
            result[0] = True
        except Exception:  # noqa: BLE001 - DNS, refused, timeout, TLS: unreachable
            pass

    t = threading.Thread(target=head, daemon=True)
    t.start()
    t.join(timeout + 1.0)  # getaddrinfo has no timeout of its own
    _probe_cache[endpoint] = (time.monotonic(), result[0])
    return result[0]


def offline_reason() -> str | None:
    """Why the hub cannot be used now (None when it can)."""
    var = hub_offline_env()
    if var:
        return f"{var}=1"
    if not hub_reachable():
        return f"{hub_endpoint()} is unreachable ({PROBE_TIMEOUT_S:.0f} s HTTP test; no network?)"
    return None


def cached_hub_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """The local path of ``repo_id/filename`` in the HF cache, or None (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    path = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(), revision=revision)
    return path if isinstance(path, str) and os.path.isfile(path) else None
