"""One number per image from one scorer or a weighted ensemble of several.

One scorer: its raw score (margins in that scorer's own units). Several: each scorer is z-normalised over
the whole run first (mean 0, population std 1), because scorers live on unrelated scales (PickScore ~20,
HPS ~0.3) and a raw weighted sum would be decided by the widest one; margins are then in std units.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from t2ialign.errors import UserFacingError


def zscore(values) -> np.ndarray:
    """(x - mean) / std over all values (ddof 0); a constant scorer gives zeros (it ranks nothing)."""
    x = np.asarray(values, dtype=np.float64)
    std = x.std()
    return np.zeros_like(x) if std == 0 else (x - x.mean()) / std


def parse_weights(spec, num_scorers: int) -> list[float]:
    """``"0.7,0.3"`` (or a list) -> floats, one per scorer; None -> equal weights 1/k."""
    if spec is None or spec == "":
        return [1.0 / num_scorers] * num_scorers
    try:
        weights = [float(w) for w in (spec.split(",") if isinstance(spec, str) else spec) if str(w).strip()]
    except ValueError:
        raise UserFacingError(f"--weights wants comma-separated numbers such as 0.7,0.3; got {spec!r}") from None
    if len(weights) != num_scorers:
        raise UserFacingError(f"--weights: {len(weights)} weight(s) for {num_scorers} scorer(s); give one per scorer")
    if not all(np.isfinite(weights)) or not any(weights):
        raise UserFacingError(f"--weights: finite numbers, not all zero; got {spec!r}")
    return weights


def ensemble_scores(raw: Mapping[str, Sequence[float]], weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """``{scorer: scores over the run}`` -> the combined score per image (see the module docstring)."""
    names = list(raw)
    if not names:
        raise UserFacingError("no scorer given")
    if len(names) == 1:
        return np.asarray(raw[names[0]], dtype=np.float64)
    weights = parse_weights(weights, len(names))
    return sum(w * zscore(raw[n]) for n, w in zip(names, weights))
