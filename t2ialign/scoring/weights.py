"""Scorer weight files read safely, and one line for a file that is not valid or not safe.

Weights are read with ``torch.load(weights_only=True)`` (nothing in the file runs) or safetensors.
PyTorch's error for a file it refuses tells the user to retry with ``weights_only=False``, which would
run whatever code a malicious file carries; these messages never suggest it. They name the file, say
what is wrong (truncated, not a checkpoint, names a Python object), and give the safe fixes:
download it again, or convert a copy you trust to safetensors.
"""
from __future__ import annotations

import re

import torch

from t2ialign.errors import UserFacingError

NAMED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
FIX = ("Nothing in it was run. Fix: download it again (an interrupted download leaves it truncated), "
       "or convert a copy you trust to .safetensors")


class WeightsFileError(UserFacingError):
    """A weights file that is truncated, not a checkpoint, or not safe to load."""


def load_weights_file(path: str, what: str, mmap: bool = False) -> dict:
    """Tensors of a .safetensors file or a ``torch.save`` file; WeightsFileError if it cannot be read safely."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # only the read is inside: every failure here is the file's
        raise invalid_weights(path, what, exc) from None


def invalid_weights(path, what: str, exc: BaseException) -> WeightsFileError:
    return WeightsFileError(f"{what}: {path} is not a valid, safe weights file ({problem(exc)}). {FIX}")


def _is_unpickling_error(error: BaseException) -> bool:
    # by name: the package never imports pickle (tests/test_reliability_resume.py checks it)
    return any(cls.__name__ == "UnpicklingError" for cls in type(error).__mro__)


def is_weights_file_error(exc: BaseException) -> bool:
    """Errors that a corrupt or unsafe weights file raises inside a loader (e.g. transformers' from_pretrained),
    also when the loader re-raised them as another type."""
    for error in (exc, exc.__cause__):
        if error is None:
            continue
        if (isinstance(error, EOFError) or _is_unpickling_error(error)) or type(error).__name__ == "SafetensorError":
            return True
        if "PytorchStreamReader" in str(error) or "weights_only" in str(error):
            return True
    return False


def problem(exc: BaseException) -> str:
    """What is wrong, in our words: PyTorch's text is never shown (it suggests weights_only=False)."""
    text = str(exc)
    named = NAMED_GLOBAL.search(text)
    if named:
        return names_object(named.group(1))
    if type(exc).__name__ == "SafetensorError":
        return f"a truncated or corrupt safetensors file: {' '.join(text.split())[:120]}"
    if isinstance(exc, EOFError) or "central directory" in text:
        return "it is empty or truncated"
    if isinstance(exc, (RuntimeError, ValueError)) or _is_unpickling_error(exc):
        return "it is not a PyTorch checkpoint: random bytes, another format, or a pickle torch.load cannot read safely"
    return type(exc).__name__


def names_object(name: str) -> str:
    return f"it is a pickle that names the Python object {name}, which weights do not need and which could run code"
