"""User scorers: any Python callable named ``package.module:function`` wherever a scorer name is taken.

    t2ialign score samples/base --scorers mypkg.rewards:sharpness
    t2ialign pairs build ... --scorers pickscore,my_rewards:redness --weights 0.7,0.3

The callable is ``fn(images: list[PIL.Image.Image], prompts: list[str]) -> sequence of floats`` (one per
image, higher is better; a list, numpy array or tensor). The module is imported with the current working
directory on ``sys.path`` (as ``python -m`` does), so a file next to where the command runs works without
installing it; PYTHONPATH works too. Scores are stored under the spec string itself (``my_rewards:redness``),
so two different callables never share a column.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Callable

import numpy as np

from t2ialign.errors import UserFacingError

from .base import FunctionScorer

SEPARATOR = ":"


def is_user_scorer(name) -> bool:
    """A scorer name with a ':' names a Python callable (registry names never contain one)."""
    return isinstance(name, str) and SEPARATOR in name


def load_callable(spec: str) -> Callable:
    """``"pkg.mod:obj.attr"`` -> the callable; UserFacingError (one line) for anything that does not resolve."""
    module_name, _, attr_path = spec.strip().partition(SEPARATOR)
    if not module_name or not attr_path:
        raise UserFacingError(f"user scorer {spec!r}: write it as package.module:function")
    module = _import(module_name, spec)
    obj = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserFacingError(f"user scorer {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                                  f"has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserFacingError(f"user scorer {spec!r}: {attr_path} is a {type(obj).__name__}, not a callable "
                              "fn(images, prompts) -> floats")
    return obj


def _import(module_name: str, spec: str):
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # the console script, unlike `python -m`, does not put the cwd there
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # only the module itself (or a parent package) missing is the user's naming mistake; a missing
        # dependency inside it is reported with its own name
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UserFacingError(f"user scorer {spec!r}: no module named {module_name!r} importable from {cwd} "
                                  "or PYTHONPATH") from None
        raise UserFacingError(f"user scorer {spec!r}: importing {module_name!r} failed: {exc}") from None


def checked(fn: Callable, spec: str) -> Callable:
    """``fn`` with its output checked: one finite float per image, else a one-line UserFacingError."""

    def call(images, prompts):
        out = fn(list(images), list(prompts))
        if hasattr(out, "detach"):  # a torch tensor, possibly on a GPU
            out = out.detach().float().cpu().numpy()
        try:
            values = np.asarray(out, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise UserFacingError(f"user scorer {spec!r} returned {type(out).__name__}, not a sequence of floats") from None
        if len(values) != len(images):
            raise UserFacingError(f"user scorer {spec!r} returned {len(values)} values for {len(images)} images "
                                  "(want one float per image)")
        bad = [i for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
        if bad:
            raise UserFacingError(f"user scorer {spec!r} returned non-finite values (e.g. {values[bad[0]]} for image "
                                  f"{bad[0]} of the batch, prompt {prompts[bad[0]]!r})")
        return values

    return call


def user_scorer(spec: str, batch_size: int = 64, **_ignored) -> FunctionScorer:
    """The callable at ``spec`` as a FunctionScorer named ``spec`` (device/dtype flags do not apply to it)."""
    spec = spec.strip()
    fn = load_callable(spec)
    scorer = FunctionScorer(spec, checked(fn, spec), batch_size=batch_size, scale="user-defined")
    scorer.info = {"function": spec, "file": getattr(sys.modules.get(spec.partition(SEPARATOR)[0]), "__file__", None)}
    return scorer
