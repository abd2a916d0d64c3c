"""Pairing strategies: which images of one prompt become preference pairs.

``best-worst``: one pair per prompt, its highest- and lowest-scored images. ``all``: every pair of the
prompt's images. In both, pairs whose margin |s_a - s_b| is below ``min_margin`` (near-ties, where the
scorer's noise decides) are dropped, and exact ties always are (no preference to learn). The winner is
given by the label, not the position: ``jpg_0`` is always the image with the lower index, so the position
carries no signal a model could learn instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

from t2ialign.errors import UserFacingError

STRATEGIES = ("best-worst", "all")


@dataclass(frozen=True)
class Pair:
    group: int  # the prompt's position in the run
    first: int  # index (into the run's images) of jpg_0: the lower image index of the two
    second: int  # index of jpg_1
    label_0: float  # 1.0: jpg_0 preferred, 0.0: jpg_1 preferred


def make_pairs(groups: Sequence[Sequence[int]], scores: Sequence[float], strategy: str = "best-worst",
               min_margin: float = 0.0) -> tuple[list[Pair], dict]:
    """``groups``: per prompt, the indices of its images (in image order) into ``scores``.
    Returns the kept pairs and counts ``{"candidates", "kept", "dropped_near_tie", "dropped_tie"}``."""
    if strategy not in STRATEGIES:
        raise UserFacingError(f"--strategy: one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if min_margin < 0:
        raise UserFacingError(f"--min-margin: must be >= 0, got {min_margin}")
    pairs, counts = [], {"candidates": 0, "kept": 0, "dropped_near_tie": 0, "dropped_tie": 0}
    for g, members in enumerate(groups):
        if len(members) < 2:
            raise UserFacingError(f"prompt {g} has {len(members)} image(s); pairs need at least 2 per prompt (--num-images)")
        for a, b in _candidates(members, scores, strategy):
            counts["candidates"] += 1
            margin = abs(scores[a] - scores[b])
            if margin == 0:
                counts["dropped_tie"] += 1
            elif margin < min_margin:
                counts["dropped_near_tie"] += 1
            else:
                first, second = sorted((a, b))
                pairs.append(Pair(g, first, second, 1.0 if scores[first] > scores[second] else 0.0))
    counts["kept"] = len(pairs)
    return pairs, counts


def _candidates(members: Sequence[int], scores: Sequence[float], strategy: str) -> list[tuple[int, int]]:
    if strategy == "all":
        return list(combinations(members, 2))
    # max/min keep the first of equal scores: deterministic, and an all-equal prompt gives an exact tie
    best = max(members, key=lambda i: scores[i])
    worst = min(members, key=lambda i: scores[i])
    if best == worst:
        worst = next(i for i in members if i != best)
    return [(best, worst)]
