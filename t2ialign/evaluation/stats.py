"""Win rates, bootstrap confidence intervals, per-model means and per-category breakdowns.

Protocol (docs/SCORERS.md): same prompts and seeds for the models compared. With several images per prompt
the scores of one prompt are averaged first. Win rate of A over B on one scorer::

    (#prompts with s_A > s_B + 0.5 * #prompts with s_A == s_B) / N

over the N prompts both models have. The confidence interval is a percentile bootstrap over prompts
(resample the N per-prompt outcomes with replacement, ``n_boot`` times, seeded ``numpy`` PCG64).

Score tables: ``{model: [row, ...]}`` with rows as read from ``scores.jsonl``: ``{"prompt_index": int,
"prompt": str, "category": str | None, "seed": int, "file": str, "scores": {scorer: float}}``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    n: int

    def to_dict(self):
        return asdict(self)


@dataclass
class WinRate:
    model_a: str
    model_b: str
    scorer: str
    win_rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int
    category: str | None = None

    def to_dict(self):
        return asdict(self)


def outcomes(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Per-prompt outcome of A vs B: 1 win, 0.5 tie, 0 loss."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two aligned 1-D score arrays, got {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """(#a > b + 0.5 * #ties) / N for aligned per-prompt scores."""
    o = outcomes(a, b)
    if o.size == 0:
        return float("nan")
    return float(o.mean())


def bootstrap_mean(values: Sequence[float], n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap CI of the mean of ``values`` (resampling the values with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    est = float(x.mean())
    if n_boot <= 0 or n == 1:
        return Interval(est, est, est, n)
    rng = np.random.Generator(np.random.PCG64(seed))
    means = np.empty(n_boot)
    chunk = max(1, int(4e6 // n))
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        means[s : s + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(est, float(low), float(high), n)


def bootstrap_win_rate(a, b, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, model_a="A", model_b="B", scorer="",
                       category=None) -> WinRate:
    o = outcomes(a, b)
    iv = bootstrap_mean(o, n_boot=n_boot, ci=ci, seed=seed)
    return WinRate(model_a, model_b, scorer, iv.estimate, iv.low, iv.high, int((o == 1).sum()), int((o == 0.5).sum()),
                   int((o == 0).sum()), int(o.size), category)


# -- score tables -----------------------------------------------------------------------------------
def per_prompt(rows: Sequence[Mapping], scorer: str) -> dict[int, float]:
    """prompt_index -> mean score over that prompt's images (rows without the scorer are skipped)."""
    acc: dict[int, list[float]] = {}
    for r in rows:
        v = r.get("scores", {}).get(scorer)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        acc.setdefault(int(r["prompt_index"]), []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def prompt_categories(tables: Mapping[str, Sequence[Mapping]]) -> dict[int, str | None]:
    cats: dict[int, str | None] = {}
    for rows in tables.values():
        for r in rows:
            if r.get("category") is not None:
                cats.setdefault(int(r["prompt_index"]), r["category"])
    return cats


def scorers_in(tables: Mapping[str, Sequence[Mapping]]) -> list[str]:
    names: dict[str, None] = {}
    for rows in tables.values():
        for r in rows:
            names.update(dict.fromkeys(r.get("scores", {})))
    return list(names)


def model_means(tables, scorers=None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, prompts=None) -> dict:
    """``{model: {scorer: Interval}}``: mean over prompts of the per-prompt mean score, bootstrap CI."""
    scorers = scorers or scorers_in(tables)
    out = {}
    for m, rows in tables.items():
        out[m] = {}
        for s in scorers:
            pp = per_prompt(rows, s)
            keys = sorted(pp if prompts is None else set(pp) & set(prompts))
            out[m][s] = bootstrap_mean([pp[k] for k in keys], n_boot=n_boot, ci=ci, seed=seed)
    return out


def pairwise_win_rates(tables, scorers=None, pairs=None, baseline: str | None = None, n_boot: int = 1000, ci: float = 0.95,
                       seed: int = 0, prompts=None, category: str | None = None) -> list[WinRate]:
    """Win rates for ``pairs`` (default: every model vs ``baseline`` if given, else all ordered-by-name pairs)."""
    scorers = scorers or scorers_in(tables)
    models = list(tables)
    if pairs is None:
        if baseline is not None:
            if baseline not in tables:
                raise KeyError(f"baseline {baseline!r} not among models {models}")
            pairs = [(m, baseline) for m in models if m != baseline]
        else:
            pairs = list(itertools.combinations(models, 2))
    out = []
    for a, b in pairs:
        for s in scorers:
            pa, pb = per_prompt(tables[a], s), per_prompt(tables[b], s)
            keys = sorted(set(pa) & set(pb) & (set(prompts) if prompts is not None else set(pa)))
            out.append(bootstrap_win_rate([pa[k] for k in keys], [pb[k] for k in keys], n_boot=n_boot, ci=ci, seed=seed,
                                          model_a=a, model_b=b, scorer=s, category=category))
    return out


def category_breakdown(tables, scorers=None, pairs=None, baseline=None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """``{category: {"n_prompts", "means": {model: {scorer: Interval}}, "win_rates": [WinRate]}}``
    for prompt sets with categories (PartiPrompts Category, HPSv2 style, GenEval tag)."""
    cats = prompt_categories(tables)
    by_cat: dict[str, list[int]] = {}
    for k, c in cats.items():
        by_cat.setdefault(str(c), []).append(k)
    out = {}
    for c in sorted(by_cat):
        keys = by_cat[c]
        out[c] = {
            "n_prompts": len(keys),
            "means": model_means(tables, scorers, n_boot=n_boot, ci=ci, seed=seed, prompts=keys),
            "win_rates": pairwise_win_rates(tables, scorers, pairs, baseline, n_boot=n_boot, ci=ci, seed=seed, prompts=keys, category=c),
        }
    return out
