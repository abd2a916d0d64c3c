"""``summary.png``: each scorer's score distribution over the run and the candidate pairs' margin histogram."""
from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def candidate_margins(groups: Sequence[Sequence[int]], combined) -> np.ndarray:
    """|margin| of every within-prompt image pair (what --min-margin cuts)."""
    return np.array([abs(combined[a] - combined[b]) for g in groups for a, b in combinations(g, 2)], dtype=np.float64)


def plot_summary(raw: Mapping[str, np.ndarray], combined, groups, min_margin: float, path: Path) -> Path:
    # Figure + Agg canvas, not pyplot: no global backend state, safe in threads and headless runs
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = len(raw) + 1
    fig = Figure(figsize=(4 * panels, 3.2))
    FigureCanvasAgg(fig)
    for i, (name, values) in enumerate(raw.items()):
        ax = fig.add_subplot(1, panels, i + 1)
        ax.hist(values, bins=30, color="tab:blue")
        ax.set(title=f"{name} (per image)", xlabel="score", ylabel="images")
    ax = fig.add_subplot(1, panels, panels)
    ax.hist(candidate_margins(groups, combined), bins=30, color="tab:orange")
    if min_margin > 0:
        ax.axvline(min_margin, color="k", linestyle="--", label=f"--min-margin {min_margin:g}")
        ax.legend()
    ax.set(title="within-prompt margins", xlabel="|score_a - score_b|" + (" (z units)" if len(raw) > 1 else ""),
           ylabel="candidate pairs")
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    tmp.replace(path)
    return Path(path)
