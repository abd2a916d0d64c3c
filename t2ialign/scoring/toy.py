"""The toy world's preferences as registered scorers: ``toy.vividness``, ``toy.fidelity``, ...

They score the toy world's 32 px images (``t2ialign demo``, ``t2ialign toy``) with the same programmatic
"human" the demo labels its pairs with, so the demo's evaluation can be repeated by hand, offline::

    t2ialign eval base=t2ialign-demo/samples/base dpo=t2ialign-demo/samples/dpo-step150 \\
        --scorers toy.vividness --baseline base --out my-report

They measure a toy world's image statistics, not human preference: on real images the numbers mean
nothing (the name's ``toy.`` prefix says so wherever a score is stored or reported).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import FunctionScorer, register_scorer

PREFIX = "toy."


def pil_to_unit_tensor(images) -> torch.Tensor:
    """PIL images -> float (N, 3, H, W) in [0, 1], the toy preferences' input."""
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for im in images])


def toy_scorer(preference_name: str) -> FunctionScorer:
    """The toy preference ``preference_name`` as a scorer named ``toy.<name>``."""
    from t2ialign.toy.preferences import get_preference

    preference = get_preference(preference_name)
    scorer = FunctionScorer(PREFIX + preference.name, lambda images, prompts: preference(pil_to_unit_tensor(images), prompts),
                            scale=f"toy-world reward (typical base spread {preference.scale}); not a real preference model")
    scorer.info = {"toy_preference": preference.name, "description": preference.description}
    return scorer


def _loader(preference_name: str):
    def load(path_or_id=None, device=None, dtype=None, **kwargs):
        return toy_scorer(preference_name)

    return load


def _register_all() -> None:
    from t2ialign.toy.preferences import PREFERENCES

    for name, preference in PREFERENCES.items():
        register_scorer(PREFIX + name, _loader(name), f"toy world only: {preference.description}")


_register_all()
