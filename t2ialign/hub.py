"""Hugging Face hub reachability: detect a machine without network once, then load from local files only.

Without network, huggingface_hub / transformers / diffusers retry every file request with back-off before
they give up (about a minute per model on a machine with no route to the hub). ``offline()`` probes the
endpoint once per process (DNS + one TCP connect, bounded by ``PROBE_TIMEOUT_S``); every loader asks
``local_only()`` and passes the answer as ``local_files_only``, so cached weights still load and missing
ones fail at once with one line (``require_cached`` / ``fix_hint``) naming the ``hf download`` command.
The ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` variables are honoured as set;
``HF_ENDPOINT`` chooses the endpoint probed (a closed local port makes "unreachable" deterministic in tests).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from functools import lru_cache
from typing import Optional
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 2.0
# set with the offline variables when the probe failed, so this process and its children (workers,
# accelerate ranks) say "cannot reach the hub" rather than "HF_HUB_OFFLINE=1 is set"
UNREACHABLE_VARIABLE = "T2IALIGN_HUB_UNREACHABLE"


def _truthy(value: Optional[str]) -> bool:
    return str(value or "").strip().lower() in {"1", "true", "yes", "on"}


def _offline_variable() -> Optional[str]:
    """The first offline variable set to a true value, if any."""
    return next((name for name in OFFLINE_VARIABLES if _truthy(os.environ.get(name))), None)


def offline_by_environment() -> bool:
    return _offline_variable() is not None


def endpoint() -> str:
    # read the variable itself (not only huggingface_hub's import-time copy) so a later HF_ENDPOINT counts
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"]
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return DEFAULT_ENDPOINT


def _endpoint_address() -> tuple[str, int]:
    url = urlparse(endpoint())
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _connects(address: tuple[str, int], result: list) -> None:
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT_S):
            result.append(True)
    except OSError:
        result.append(False)


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One TCP connect to the hub endpoint, cached for the process.

    The connect runs in a daemon thread joined with a timeout, because the socket timeout does not bound
    the DNS lookup before it (a resolver without an upstream can hang for 10-20 s)."""
    result: list = []
    probe = threading.Thread(target=_connects, args=(_endpoint_address(), result), daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])


def offline() -> bool:
    """True when an offline variable is set or the hub does not answer the probe."""
    return offline_by_environment() or not hub_reachable()


def offline_reason() -> str:
    """Why this process loads from local files only ('' when it is online)."""
    unreachable = os.environ.get(UNREACHABLE_VARIABLE)
    if unreachable:
        return f"this machine cannot reach the hub ({unreachable} did not answer)"
    variable = _offline_variable()
    if variable:
        return f"{variable}=1 is set"
    if not hub_reachable():
        return "this machine cannot reach the hub ({}:{} did not answer)".format(*_endpoint_address())
    return ""


def _switch_libraries_offline() -> None:
    os.environ[UNREACHABLE_VARIABLE] = "{}:{}".format(*_endpoint_address())
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    # already imported: transformers and hf_hub_download read huggingface_hub's constant at call time,
    # datasets its own copy (made at import), so both are set; modules not imported yet read the variables
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True


def use_offline_mode_if_unreachable() -> bool:
    """Switch huggingface_hub / transformers / datasets / diffusers to local files when the hub is unreachable.

    The CLI calls it first thing (diffusers and datasets read the variables at import); loaders call it
    through ``local_only``. Returns whether the process is offline."""
    if offline_by_environment():
        return True
    if hub_reachable():
        return False
    logger.info("the hub at %s:%d is unreachable: loading from local files only", *_endpoint_address())
    _switch_libraries_offline()
    return True


def local_only(requested: bool = False) -> bool:
    """The ``local_files_only`` to pass to a hub loader: what the caller asked, or True when offline."""
    return use_offline_mode_if_unreachable() or bool(requested)


# ---------------------------------------------------------------- messages


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
    """A clause for error messages: why this machine is offline, or '' when it is online."""
    reason = offline_reason()
    return f"{reason}; " if reason else ""


def fix_hint(repo_id: str, use_local: str, filename: Optional[str] = None, repo_type: Optional[str] = None) -> str:
    """'Fix: ...' naming the download command and how to point t2ialign at the copy (``use_local``)."""
    return f"Fix: on a machine with internet run `{download_hint(repo_id, filename, repo_type)}`, then {use_local}"


def _cached_repo_folder(repo_id: str, repo_type: str) -> str:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type=repo_type))


def is_cached(repo_id: str, filename: Optional[str] = None, repo_type: str = "model", revision=None) -> bool:
    """Whether the cache holds ``filename`` of the repo (any file of it when ``filename`` is None)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        if filename is None:
            return os.path.isdir(os.path.join(_cached_repo_folder(repo_id, repo_type), "snapshots"))
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type), str)
    except ValueError:  # not a valid repo id (e.g. a path that does not exist): the loader's own error says so
        return True


def require_cached(repo_id: str, what: str, use_local: str, filename: Optional[str] = None,
                   repo_type: str = "model", revision=None) -> None:
    """Offline and not in the cache: one-line ModelNotFoundError now, before heavy imports and library retries.

    ``filename`` is the file whose presence in the cache counts (any file of the repo when None). Local paths
    and online machines pass (the loader itself then reports anything else)."""
    if os.path.exists(os.path.expanduser(repo_id)) or not local_only() or is_cached(repo_id, filename, repo_type, revision):
        return
    from t2ialign.errors import ModelNotFoundError

    raise ModelNotFoundError(  # the whole repo is what the loader needs: the command fetches all of it
        f"{what}: {repo_id} is not a local path and not in the Hugging Face cache, and {offline_reason()}. "
        f"{fix_hint(repo_id, use_local, repo_type=repo_type)}"
    )
