"""Hugging Face hub reachability: detect a machine without network once, then load from local files only.

Without network, huggingface_hub / transformers / diffusers retry every file request with back-off before
they give up (about a minute per model on a machine with no route to the hub). ``use_offline_mode_if_unreachable``
probes the endpoint once (one TCP connect, 2 s timeout) and, when it is unreachable, switches the libraries
to their offline mode, so cached weights still load and missing ones fail at once with our one-line error.
The ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` variables are honoured as set.
"""
from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from typing import Optional
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 2.0


def _truthy(value: Optional[str]) -> bool:
    return str(value or "").strip().lower() in {"1", "true", "yes", "on"}


def offline_by_environment() -> bool:
    return any(_truthy(os.environ.get(name)) for name in OFFLINE_VARIABLES)


def _endpoint_address() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One TCP connect to the hub endpoint (``HF_ENDPOINT`` respected); cached for the process."""
    try:
        with socket.create_connection(_endpoint_address(), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def offline() -> bool:
    """True when the environment says offline or the hub does not answer."""
    return offline_by_environment() or not hub_reachable()


def use_offline_mode_if_unreachable() -> bool:
    """Switch huggingface_hub / transformers / datasets / diffusers to local files when the hub is unreachable.

    Call it before those libraries are imported (the CLI does, first thing): diffusers reads the setting at
    import. Returns whether the process is offline."""
    if offline_by_environment():
        return True
    if hub_reachable():
        return False
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    try:  # already imported: its constant is read at call time by hf_hub_download and transformers
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    logger.info("the hub at %s:%d is unreachable: loading from local files only", *_endpoint_address())
    return True


def download_hint(repo_id: str, filename: Optional[str] = None, repo_type: Optional[str] = None) -> str:
    """The ``hf download`` command (huggingface_hub's CLI) that fetches ``repo_id`` on a machine with network."""
    parts = ["hf download", repo_id]
    if filename:
        parts.append(filename)
    if repo_type and repo_type != "model":
        parts.append(f"--repo-type {repo_type}")
    parts.append("--local-dir DIR")
    return " ".join(parts)


def offline_note() -> str:
    """A clause for error messages: whether this machine looked offline."""
    return "this machine cannot reach the hub; " if offline() else ""
