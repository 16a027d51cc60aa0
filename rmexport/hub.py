"""Reaching the Hugging Face Hub: asked once, without retries unless ``--retries`` wants them.

Before anything asks the hub for a model, ``require_hub`` opens one TCP connection to its host.
When that fails (no network, no DNS, a firewall) the run either goes on offline, from the local
cache, or stops with one line saying so; the libraries never get to retry and warn for a minute.
``HF_HUB_OFFLINE=1`` skips the probe: only the local cache is used.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlsplit

from .errors import ModelLoadError
from .log import get_logger

__all__ = ["offline_requested", "require_hub", "set_retries", "unreachable_reason"]

log = get_logger(__name__)

PROBE_TIMEOUT_S = 4.0
_TRUE = ("1", "true", "yes", "on")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")

_retries = 0
_verdicts: dict[tuple[str, int], str | None] = {}


def set_retries(retries: int) -> None:
    """How many more times the probe tries, 1 s, 2 s, 4 s ... apart (``--retries``; default 0)."""
    global _retries
    _retries = max(0, int(retries))


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _endpoint() -> tuple[str, int]:
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _connect_error(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except socket.gaierror:
        return f"cannot resolve {host}"
    except TimeoutError:
        return f"no answer from {host} within {PROBE_TIMEOUT_S:.0f} s"
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"
    return None


def unreachable_reason() -> str | None:
    """Why the hub cannot be reached, or None when it can (or a proxy stands in between, which
    only the HTTP libraries know how to use). Asked once per process."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    host, port = _endpoint()
    if (host, port) not in _verdicts:
        reason = _connect_error(host, port)
        for attempt in range(_retries):
            if reason is None:
                break
            time.sleep(2**attempt)
            reason = _connect_error(host, port)
        _verdicts[(host, port)] = reason
    return _verdicts[(host, port)]


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _go_offline() -> None:
    """Make every later hub call of this process answer from the local cache at once."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def require_hub(repo_id: str) -> None:
    """Before the hub is asked for ``repo_id``: return when it can be reached, or when the model is
    in the local cache (then the run goes on offline); raise ModelLoadError, one line, otherwise."""
    hint = (
        "pass a local directory (HF checkpoint) or .gguf file, or download the model where the network allows"
    )
    if offline_requested():
        _go_offline()
        if not _cached(repo_id):
            raise ModelLoadError(
                f"HF_HUB_OFFLINE is set, so the Hugging Face Hub is not asked, and {repo_id} is not in the "
                "local cache",
                hint=hint,
            )
        return
    reason = unreachable_reason()
    if reason is None:
        return
    if _cached(repo_id):
        log.warning("the Hugging Face Hub cannot be reached (%s); using the cached %s", reason, repo_id)
        _go_offline()
        return
    raise ModelLoadError(
        f"the Hugging Face Hub cannot be reached ({reason}) and {repo_id} is not in the local cache",
        hint=hint + "; --retries N retries a flaky network",
    )
