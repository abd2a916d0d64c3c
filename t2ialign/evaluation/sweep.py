"""``rlg_sweep``: sample one folder per RL-guidance scale ``w`` (identical seeds), score them, plot score vs w.

Output (``output_dir``)::

    w0/ w0.5/ w1/ ...   model folders of ``t2ialign sample`` (images/, metadata.jsonl) + scores.jsonl
    sweep.json          per w: mean score per scorer with a bootstrap CI over prompts, win rate vs w = 0
    sweep.png           score vs w, one panel per scorer (error bars: the CI)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

logger = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"


def scale_key(w: float) -> str:
    return f"{float(w):g}"


class _Named:
    """Gives a scorer object the ``name`` under which its scores are stored."""

    def __init__(self, name: str, scorer):
        self.name, self.scorer = name, scorer

    def score(self, images, prompts):
        return self.scorer.score(images, prompts)


def _scored_rows(model_dir: str, scorers: Mapping[str, object]) -> list[dict]:
    """``scores.jsonl`` rows of a sampled folder, scoring only what is missing (resumed sweeps reuse scores)."""
    from t2ialign.evaluation.folders import SCORES, read_metadata, read_scores, write_jsonl
    from t2ialign.evaluation.recipes import score_rows

    rows = read_metadata(model_dir)
    old = read_scores(model_dir)
    if old and [o.get("file") for o in old] == [r["file"] for r in rows]:
        for o, r in zip(old, rows):
            r["scores"] = dict(o.get("scores", {}))
        if all(name in r["scores"] for r in rows for name in scorers):
            return rows
    rows = score_rows(model_dir, rows, [_Named(name, s) for name, s in scorers.items()])
    write_jsonl(os.path.join(model_dir, SCORES), rows)
    return rows


def _summaries(rows_by_key: dict, scorer_names: Sequence[str], n_boot: int, ci: float, seed: int) -> dict:
    from t2ialign.evaluation.stats import bootstrap_mean, bootstrap_win_rate, per_prompt

    out = {}
    base = rows_by_key.get(scale_key(0))
    for key, rows in rows_by_key.items():
        entry = {"scores": {}, "win_rate_vs_w0": {}}
        for name in scorer_names:
            values = per_prompt(rows, name)
            iv = bootstrap_mean(list(values.values()), n_boot=n_boot, ci=ci, seed=seed)
            entry["scores"][name] = {"mean": iv.estimate, "low": iv.low, "high": iv.high, "n": iv.n}
            if base is not None and key != scale_key(0):
                ref = per_prompt(base, name)
                common = sorted(set(values) & set(ref))
                wr = bootstrap_win_rate([values[i] for i in common], [ref[i] for i in common], n_boot=n_boot, ci=ci,
                                        seed=seed, model_a=f"w{key}", model_b="w0", scorer=name)
                entry["win_rate_vs_w0"][name] = {"win_rate": wr.win_rate, "low": wr.low, "high": wr.high, "n": wr.n}
        out[key] = entry
    return out


def plot_sweep(sweep: dict, path) -> Path:
    """Score vs w (mean and CI error bars), one panel per scorer; matplotlib's Agg canvas, no global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = sweep["scorers"]
    fig = Figure(figsize=(4.0 * max(1, len(names)), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    scales = sweep["scales"]
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, max(1, len(names)), i + 1)
        stats = [sweep["results"][scale_key(w)]["scores"][name] for w in scales]
        means = [s["mean"] for s in stats]
        err = [[m - s["low"] for m, s in zip(means, stats)], [s["high"] - m for m, s in zip(means, stats)]]
        ax.errorbar(scales, means, yerr=err, marker="o", capsize=3)
        ax.axvline(1.0, color="0.7", lw=0.8, ls="--")
        ax.set_xlabel("RLG scale w (0 = base, 1 = aligned)")
        ax.set_ylabel(f"mean {name}")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def scale_config(base_config, w: float, output_dir):
    """The sample config of scale ``w``'s folder (``output_dir/w<w>``) in a sweep of ``base_config``.

    Callers may sample a scale's folder beforehand (e.g. in parallel, or by copying the base model's folder
    for w = 0, which it equals exactly); the sweep then finds its images done and only scores them.
    """
    aligned = base_config.guide_with or base_config.aligned
    folder = Path(output_dir) / f"w{scale_key(w)}"
    return dataclasses.replace(base_config, aligned=None, guide_with=str(aligned), rlg_scale=float(w), rlg_schedule=None,
                               output_dir=str(folder))


def rlg_sweep(base_config, scales: Sequence[float], scorers: Mapping[str, object], output_dir, records=None,
              n_boot: int = 1000, ci: float = 0.95, seed: int = 0, plot: bool = True) -> dict:
    """Sample ``base_config`` with RL guidance at each scale in ``scales`` and score every folder.

    ``base_config`` is a ``SampleConfig`` whose ``guide_with`` (or ``aligned``) names the aligned model; its
    ``output_dir``, ``rlg_scale`` and ``rlg_schedule`` are replaced per scale. ``scorers`` maps a name to any
    object with ``.score(images, prompts) -> sequence of floats``. ``records``: prompt records (default: the
    config's prompt set). Returns what ``sweep.json`` holds. Interrupted sweeps resume (images and scores kept).
    """
    from t2ialign.config import ConfigError
    from t2ialign.data.files import prepare_output_dir, reported_write
    from t2ialign.evaluation.sampling import sample

    aligned = base_config.guide_with or base_config.aligned
    if not aligned:
        raise ConfigError("guide_with: an RLG sweep needs the aligned model (training export, UNet or LoRA directory)")
    if not scorers:
        raise ConfigError("scorers: give at least one scorer for the sweep")
    scales = [float(w) for w in scales]
    if not scales or len({scale_key(w) for w in scales}) != len(scales):
        raise ConfigError(f"scales: give distinct values, got {scales}")
    output_dir = prepare_output_dir(output_dir, "--out")
    rows_by_key, dirs = {}, {}
    for w in scales:
        key = scale_key(w)
        config = scale_config(base_config, w, output_dir)
        folder = Path(config.output_dir)
        logger.info("RLG sweep: w = %s -> %s", key, folder)
        sample(config, records=records)
        rows_by_key[key] = _scored_rows(str(folder), scorers)
        dirs[key] = folder.name
    results = _summaries(rows_by_key, list(scorers), n_boot, ci, seed)
    for key in results:
        results[key] = {"w": float(key), "dir": dirs[key], **results[key]}
    sweep = {
        "pretrained": base_config.pretrained, "aligned": str(aligned), "scales": scales, "scorers": list(scorers),
        "guidance_scale": base_config.guidance_scale, "num_inference_steps": base_config.num_inference_steps,
        "seed": base_config.seed, "ci": ci, "n_boot": n_boot, "results": results,
    }
    if plot:
        plot_sweep(sweep, output_dir / SWEEP_PNG)
        sweep["plot"] = SWEEP_PNG
    tmp = output_dir / (SWEEP_JSON + ".tmp")
    with reported_write(output_dir / SWEEP_JSON, "every scale's images and scores.jsonl are intact: a rerun reuses them",
                        cleanup=tmp):
        tmp.write_text(json.dumps(sweep, indent=2))
        os.replace(tmp, output_dir / SWEEP_JSON)
    return sweep
