"""Evaluation reports: ``report.json``, a self-contained ``report.html`` and PNG plots.

``write_report(out_dir, tables, ...)`` takes per-model score tables (``{model: [row, ...]}``, rows as in
``folders.py``: ``prompt_index``, ``prompt``, ``category``, ``seed``, ``file``, ``scores``) or plain arrays
(``{model: {scorer: [score per prompt, ...]}}``, e.g. from the toy world; see ``tables_from_arrays``).
Optional extras: ``curves`` (reward over training, ``{name: [{"step", "mean_reward"}, ...]}``), ``runs``
(training output folders, ``{name: dir}``, whose ``metrics.jsonl`` gives loss / implicit accuracy curves)
and ``sweep`` (an RLG sweep: its folder, its ``sweep.json`` or that file's contents). It writes::

    report.json               means with bootstrap CIs, pairwise win rates with CIs, per-category breakdown,
                              scorer descriptions, settings, and the curves / sweep it was given
    report.html               one file, no external resources (templates/report.html.j2, autoescaped):
                              every table and plot, and the sample grid, embedded as base64
    winrates.png              win-rate bars with CI whiskers per scorer
    histograms.png            score histograms per scorer, one colour per model
    grid.png                  the sample grid (only when images are available)
    reward_over_training.png  (with ``curves``)   training_metrics.png  (with ``runs``)
    rlg_sweep.png             (with ``sweep``)
"""
from __future__ import annotations

import base64
import json
import math
import os
from datetime import datetime, timezone

import numpy as np

from t2ialign.errors import UserFacingError

from . import report_plots as plots
from .stats import category_breakdown, model_means, pairwise_win_rates, per_prompt, scorers_in

METRICS_JSONL = "metrics.jsonl"
SWEEP_JSON = "sweep.json"  # the file evaluation/sweep.py writes (not imported: sweep.py pulls in sampling)


def tables_from_arrays(scores: dict, prompts=None, categories=None, files=None) -> dict:
    """``{model: {scorer: array (N,)}}`` -> score tables (prompt_index = position).
    ``files`` (optional): ``{model: [image path per prompt]}``."""
    out = {}
    for m, per_scorer in scores.items():
        n = len(next(iter(per_scorer.values())))
        rows = []
        for i in range(n):
            row = {"prompt_index": i, "prompt": prompts[i] if prompts is not None else f"prompt {i}",
                   "category": categories[i] if categories is not None else None, "seed": 0,
                   "scores": {s: float(np.asarray(v)[i]) for s, v in per_scorer.items()}}
            if files is not None and m in files:
                row["file"] = str(files[m][i])
            rows.append(row)
        out[m] = rows
    return out


# -- inputs besides the score tables -------------------------------------------------------------------
def read_training_metrics(run: str) -> list[dict]:
    """The records of a training run's ``metrics.jsonl`` (``run``: the run's output folder or the file)."""
    path = os.path.join(run, METRICS_JSONL) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UserFacingError(f"{run}: no {METRICS_JSONL} (give a training output_dir, as written by `t2ialign train`)")
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [r for r in records if isinstance(r.get("step"), (int, float))]


def read_sweep(sweep) -> dict:
    """An RLG sweep summary: a ``sweep.json`` dict passes through; a folder or file path is read."""
    if isinstance(sweep, dict):
        return sweep
    path = os.path.join(sweep, SWEEP_JSON) if os.path.isdir(sweep) else str(sweep)
    if not os.path.isfile(path):
        raise UserFacingError(f"{sweep}: no {SWEEP_JSON} (give the output folder of `t2ialign sweep`)")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _training_runs(runs) -> dict:
    """``{name: dir or [record]}`` -> ``{name: [record]}``."""
    return {name: list(r) if isinstance(r, (list, tuple)) else read_training_metrics(str(r)) for name, r in (runs or {}).items()}


def _run_summary(records: list[dict]) -> dict:
    """Logged steps and the last logged value of each metric, for report.json and the training table."""
    last = records[-1] if records else {}
    return {"n_records": len(records), "last_step": last.get("step"),
            "last": {k: v for k, v in last.items() if k != "step" and isinstance(v, (int, float))}}


# -- statistics -------------------------------------------------------------------------------------------
def build_report(tables, scorers=None, baseline=None, pairs=None, n_boot=1000, ci=0.95, seed=0, scorer_info=None, title=None,
                 settings=None) -> dict:
    scorers = scorers or scorers_in(tables)
    means = model_means(tables, scorers, n_boot=n_boot, ci=ci, seed=seed)
    wrs = pairwise_win_rates(tables, scorers, pairs=pairs, baseline=baseline, n_boot=n_boot, ci=ci, seed=seed)
    has_cats = any(r.get("category") is not None for rows in tables.values() for r in rows)
    cats = category_breakdown(tables, scorers, pairs=pairs, baseline=baseline, n_boot=n_boot, ci=ci, seed=seed) if has_cats else {}
    n_prompts = {m: len({int(r["prompt_index"]) for r in rows}) for m, rows in tables.items()}
    return {
        "title": title or "t2ialign evaluation",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": list(tables),
        "scorers": scorers,
        "scorer_info": scorer_info or {},
        "n_prompts": n_prompts,
        "n_images": {m: len(rows) for m, rows in tables.items()},
        "settings": {"n_boot": n_boot, "ci": ci, "seed": seed, "baseline": baseline,
                     "win_rate": "(#prompts s_A > s_B + 0.5 #ties) / N, per-prompt means over images; percentile bootstrap over prompts",
                     **(settings or {})},
        "means": {m: {s: iv.to_dict() for s, iv in d.items()} for m, d in means.items()},
        "win_rates": [w.to_dict() for w in wrs],
        "categories": {c: {"n_prompts": v["n_prompts"],
                           "means": {m: {s: iv.to_dict() for s, iv in d.items()} for m, d in v["means"].items()},
                           "win_rates": [w.to_dict() for w in v["win_rates"]]} for c, v in cats.items()},
    }, wrs


# -- the sample grid --------------------------------------------------------------------------------------
def _grid_prompts(tables, max_prompts) -> list[int]:
    common = None
    for rows in tables.values():
        keys = {int(r["prompt_index"]) for r in rows if r.get("file")}
        common = keys if common is None else common & keys
    return sorted(common or [])[:max_prompts]


def _first_row(rows, k):
    return next((r for r in rows if int(r["prompt_index"]) == k and r.get("file")), None)


def _sample_rows(tables, image_roots, keys, scorers, thumb_size) -> list[dict]:
    """One entry per grid prompt: its caption, category and one cell (thumbnail, scores) per model.
    Thumbnails are made once here and shared by report.html and grid.png."""
    models = list(tables)
    out = []
    for k in keys:
        first = _first_row(tables[models[0]], k) or {}
        cells = []
        for m in models:
            row = _first_row(tables[m], k)
            image = plots.thumb(plots.resolve(image_roots, m, row), thumb_size) if row else None
            scores = {s: per_prompt([row], s).get(k) for s in scorers} if row else {}
            cells.append({"model": m, "image": image, "scores": {s: v for s, v in scores.items() if v is not None}})
        out.append({"index": k, "prompt": str(first.get("prompt", "")), "category": first.get("category"), "cells": cells})
    return out


# -- html ---------------------------------------------------------------------------------------------------
def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _template_env():
    import jinja2

    # autoescape everywhere: captions, model and scorer names come from user files (a prompt may hold "<script>")
    env = jinja2.Environment(loader=jinja2.PackageLoader("t2ialign.evaluation", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env


def _html_samples(samples) -> list[dict]:
    """Grid entries with each thumbnail as a data URI and its pixel size (so the browser shows it 1:1)."""
    out = []
    for s in samples:
        cells = []
        for c in s["cells"]:
            img = None
            if c["image"] is not None:
                data, mime = plots.image_bytes(c["image"])
                img = {"src": _data_uri(data, mime), "width": c["image"].width, "height": c["image"].height}
            cells.append({**c, "image": img})
        out.append({**s, "cells": cells})
    return out


def _sweep_view(sweep: dict) -> dict:
    """The sweep table: one row per scale w, per scorer the mean [CI] and the win rate vs w = 0 [CI]."""
    rows = []
    for w in sweep.get("scales", []):
        entry = sweep.get("results", {}).get(f"{float(w):g}", {})
        rows.append({"w": float(w), "dir": entry.get("dir", ""), "scores": entry.get("scores", {}),
                     "win": entry.get("win_rate_vs_w0", {})})
    details = {k: sweep[k] for k in ("pretrained", "aligned", "guidance_scale", "num_inference_steps", "seed") if k in sweep}
    # the sweep may sample fewer prompts than the win-rate table above (the demo: the first 64), so say how many
    counts = {stats["n"] for row in rows for stats in row["scores"].values() if "n" in stats}
    if counts:
        details["prompts"] = "/".join(str(n) for n in sorted(counts))
    return {"scorers": list(sweep.get("scorers", [])), "rows": rows, "details": details}


def _curve_steps(curves: dict) -> list:
    return sorted({p["step"] for points in curves.values() for p in points})


def render_html(report: dict, plot_uris: dict, samples: list, curves: dict | None = None, runs: dict | None = None,
                sweep: dict | None = None) -> str:
    """report.html from ``templates/report.html.j2``; ``plot_uris``: ``{plot name: data URI}``."""
    models, scorers = report["models"], report["scorers"]
    wr_cols = list(dict.fromkeys((w["model_a"], w["model_b"], w["scorer"]) for w in report["win_rates"]))
    context = {
        "r": report, "models": models, "scorers": scorers, "plots": plot_uris, "wr_cols": wr_cols,
        "samples": _html_samples(samples),
        "curves": curves or {}, "curve_steps": _curve_steps(curves or {}),
        "curve_values": {n: {p["step"]: p["mean_reward"] for p in pts} for n, pts in (curves or {}).items()},
        "runs": {name: _run_summary(recs) for name, recs in (runs or {}).items()},
        "sweep": _sweep_view(sweep) if sweep else None,
        "extra_settings": {k: v for k, v in report["settings"].items() if k not in ("n_boot", "ci", "seed")},
    }
    return _template_env().get_template("report.html.j2").render(**context)


# -- report -------------------------------------------------------------------------------------------------
REPORT_KEPT = "nothing else was changed, and a rerun writes the report again (eval reuses the scores.jsonl it saved)"


def _saving(path):
    """A report file's write; a full or read-only disk becomes one line (t2ialign.data.files.reported_write)."""
    from t2ialign.data.files import reported_write  # here: t2ialign.data imports datasets (slow)

    return reported_write(path, REPORT_KEPT)


def _write_png(out_dir, name, data, paths):
    if data:
        paths[name] = os.path.join(out_dir, name)
        with _saving(paths[name]), open(paths[name], "wb") as fh:
            fh.write(data)


def _plots(report, tables, wrs, curves, runs, sweep, curve_label) -> dict:
    """``{png file name: PNG bytes}`` of every plot that has data (report order)."""
    pngs = {
        "winrates.png": plots.plot_win_rates(wrs),
        "histograms.png": plots.plot_histograms(tables, report["scorers"], report["scorer_info"]),
        "reward_over_training.png": plots.plot_reward_curves(curves, curve_label) if curves else None,
        "training_metrics.png": plots.plot_training_metrics(runs) if runs else None,
        "rlg_sweep.png": plots.plot_rlg_sweep(sweep) if sweep else None,
    }
    return {k: v for k, v in pngs.items() if v}


def write_report(out_dir: str, tables: dict, scorers=None, image_roots: dict | None = None, baseline: str | None = None,
                 pairs=None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, scorer_info: dict | None = None,
                 title: str | None = None, max_grid_prompts: int = 16, thumb_size: int = 192, settings: dict | None = None,
                 curves: dict | None = None, curve_label: str = "mean reward", runs: dict | None = None,
                 sweep=None) -> dict:
    """Write report.json, report.html and PNG plots into ``out_dir``; returns ``{name: path}``.

    ``tables``: ``{model: [row]}`` (see module docstring) or ``{model: {scorer: array}}``.
    ``image_roots``: ``{model: folder}`` that row ``file`` paths are relative to (absolute paths need none).
    ``curves``: reward over training, ``{name: [{"step", "mean_reward"}]}``; ``curve_label`` its y axis.
    ``runs``: ``{name: training output folder (or its metrics.jsonl records)}``: loss / implicit accuracy.
    ``sweep``: an RLG sweep (folder, ``sweep.json`` path or its dict).
    """
    if tables and all(isinstance(v, dict) for v in tables.values()):
        tables = tables_from_arrays(tables)
    from t2ialign.data.files import prepare_output_dir  # here: t2ialign.data imports datasets (slow)

    prepare_output_dir(out_dir, "report folder")
    runs, sweep = _training_runs(runs), read_sweep(sweep) if sweep else None
    report, wrs = build_report(tables, scorers, baseline, pairs, n_boot, ci, seed, scorer_info, title, settings)
    paths = {}
    pngs = _plots(report, tables, wrs, curves, runs, sweep, curve_label)
    for name, data in pngs.items():
        _write_png(out_dir, name, data, paths)
    samples = _sample_rows(tables, image_roots, _grid_prompts(tables, max_grid_prompts), report["scorers"], thumb_size)
    grid = plots.build_grid(report["models"], [[c["image"] for c in s["cells"]] for s in samples],
                            [s["prompt"] for s in samples], thumb_size)
    if grid is not None:
        paths["grid.png"] = os.path.join(out_dir, "grid.png")
        with _saving(paths["grid.png"]):
            grid.save(paths["grid.png"])

    report.update(reward_over_training=curves or None, training_runs={n: _run_summary(r) for n, r in runs.items()} or None,
                  rlg_sweep=sweep)
    report["files"] = {k: os.path.basename(v) for k, v in paths.items()}
    paths["report.json"] = os.path.join(out_dir, "report.json")
    with _saving(paths["report.json"]), open(paths["report.json"], "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, ensure_ascii=False, default=float)
    html = render_html(report, {k.removesuffix(".png"): _data_uri(v) for k, v in pngs.items()}, samples, curves, runs, sweep)
    paths["report.html"] = os.path.join(out_dir, "report.html")
    with _saving(paths["report.html"]), open(paths["report.html"], "w", encoding="utf-8") as fh:
        fh.write(html)
    return paths
