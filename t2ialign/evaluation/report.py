"""Evaluation reports: ``report.json``, a self-contained ``report.html`` and PNG plots.

``write_report(out_dir, tables, ...)`` takes per-model score tables (``{model: [row, ...]}``, rows as in
``folders.py``: ``prompt_index``, ``prompt``, ``category``, ``seed``, ``file``, ``scores``) or plain arrays
(``{model: {scorer: [score per prompt, ...]}}``, e.g. from the toy world; see ``tables_from_arrays``) and
writes::

    report.json      means with bootstrap CIs, pairwise win rates with CIs, per-category breakdown,
                     scorer descriptions, settings
    report.html      one file, no external resources: tables, the plots and an image grid embedded as
                     base64 (JPEG thumbnails side by side per prompt, PNG plots)
    winrates.png     win-rate bars with CI whiskers per scorer
    histograms.png   score histograms per scorer, one colour per model
    grid.png         the image grid (only when images are available)

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from datetime import datetime, timezone

import numpy as np
from PIL import Image, ImageDraw

from .stats import category_breakdown, model_means, pairwise_win_rates, per_prompt, scorers_in


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


# -- plots --------------------------------------------------------------------------------------------
def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def plot_win_rates(win_rates) -> bytes | None:
    if not win_rates:
        return None
    pairs = list(dict.fromkeys((w.model_a, w.model_b) for w in win_rates))
    scorers = list(dict.fromkeys(w.scorer for w in win_rates))
    fig = _figure(max(4.0, 1.2 * len(scorers) * max(1, len(pairs)) + 1.5), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(pairs)
    for j, (a, b) in enumerate(pairs):
        ws = [next((w for w in win_rates if (w.model_a, w.model_b, w.scorer) == (a, b, s)), None) for s in scorers]
        x = np.arange(len(scorers)) + (j - (len(pairs) - 1) / 2) * width
        y = np.array([w.win_rate if w else np.nan for w in ws])
        lo = np.array([w.win_rate - w.low if w else 0 for w in ws])
        hi = np.array([w.high - w.win_rate if w else 0 for w in ws])
        ax.bar(x, y, width * 0.9, yerr=np.vstack([lo, hi]), capsize=3, label=f"{a} vs {b}")
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(scorers)))
    ax.set_xticklabels(scorers)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate (95% CI)")
    ax.legend(fontsize=8, loc="lower right")
    return _png_bytes(fig)


def plot_histograms(tables, scorers) -> bytes | None:
    if not scorers:
        return None
    fig = _figure(3.4 * len(scorers), 2.8)
    for k, s in enumerate(scorers):
        ax = fig.add_subplot(1, len(scorers), k + 1)
        vals = {m: np.array([r["scores"][s] for r in rows if s in r.get("scores", {})], dtype=float) for m, rows in tables.items()}
        allv = np.concatenate([v for v in vals.values() if v.size]) if any(v.size for v in vals.values()) else np.zeros(1)
        allv = allv[np.isfinite(allv)]
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
        for m, v in vals.items():
            ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.5, label=m)
        ax.set_title(s, fontsize=10)
        if k == 0:
            ax.legend(fontsize=7)
    return _png_bytes(fig)


# -- images -------------------------------------------------------------------------------------------
def _thumb(path, size) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            return im.copy()
    except (OSError, ValueError):
        return None


def _grid_prompts(tables, max_prompts) -> list[int]:
    common = None
    for rows in tables.values():
        keys = {int(r["prompt_index"]) for r in rows if r.get("file")}
        common = keys if common is None else common & keys
    return sorted(common or [])[:max_prompts]


def _first_row(rows, k):
    return next((r for r in rows if int(r["prompt_index"]) == k and r.get("file")), None)


def build_grid(tables, image_roots, prompt_keys, thumb=192) -> Image.Image | None:
    models = list(tables)
    if not prompt_keys:
        return None
    label_h, pad = 18, 4
    W = len(models) * (thumb + pad) + pad
    H = len(prompt_keys) * (thumb + label_h + pad) + label_h + pad
    grid = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(grid)
    for j, m in enumerate(models):
        d.text((pad + j * (thumb + pad), 2), m[:30], fill="black")
    for i, k in enumerate(prompt_keys):
        y = label_h + pad + i * (thumb + label_h + pad)
        for j, m in enumerate(models):
            r = _first_row(tables[m], k)
            t = _thumb(_resolve(image_roots, m, r), thumb) if r else None
            if t is not None:
                grid.paste(t, (pad + j * (thumb + pad), y))
        first = _first_row(tables[models[0]], k)
        d.text((pad, y + thumb + 2), (first or {}).get("prompt", "")[: 6 * len(models) * thumb // 40], fill="black")
    return grid


def _resolve(image_roots, model, row):
    if row is None or not row.get("file"):
        return None
    f = row["file"]
    if os.path.isabs(f) or not image_roots or model not in image_roots:
        return f
    return os.path.join(image_roots[model], f)


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# -- report -------------------------------------------------------------------------------------------
def _fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


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


def write_report(out_dir: str, tables: dict, scorers=None, image_roots: dict | None = None, baseline: str | None = None,
                 pairs=None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, scorer_info: dict | None = None,
                 title: str | None = None, max_grid_prompts: int = 16, thumb_size: int = 192, settings: dict | None = None) -> dict:
    """Write report.json, report.html and PNG plots into ``out_dir``; returns ``{name: path}``.

    ``tables``: ``{model: [row]}`` (see module docstring) or ``{model: {scorer: array}}``.
    ``image_roots``: ``{model: folder}`` that row ``file`` paths are relative to (absolute paths need none).
    """
    if tables and all(isinstance(v, dict) for v in tables.values()):
        tables = tables_from_arrays(tables)
    os.makedirs(out_dir, exist_ok=True)
    report, wrs = build_report(tables, scorers, baseline, pairs, n_boot, ci, seed, scorer_info, title, settings)
    scorers = report["scorers"]
    paths = {}

    wr_png = plot_win_rates(wrs)
    hist_png = plot_histograms(tables, scorers)
    keys = _grid_prompts(tables, max_grid_prompts)
    grid = build_grid(tables, image_roots, keys, thumb_size) if keys else None
    for name, data in (("winrates.png", wr_png), ("histograms.png", hist_png)):
        if data:
            paths[name] = os.path.join(out_dir, name)
            with open(paths[name], "wb") as fh:
                fh.write(data)
    if grid is not None:
        paths["grid.png"] = os.path.join(out_dir, "grid.png")
        grid.save(paths["grid.png"])

    report["files"] = {k: os.path.basename(v) for k, v in paths.items()}
    paths["report.json"] = os.path.join(out_dir, "report.json")
    with open(paths["report.json"], "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, ensure_ascii=False, default=float)
    paths["report.html"] = os.path.join(out_dir, "report.html")
    with open(paths["report.html"], "w", encoding="utf-8") as fh:
        fh.write(render_html(report, tables, image_roots, keys, wr_png, hist_png, thumb_size))
    return paths


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fff}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}
th{background:#f0f0f0}td.l,th.l{text-align:left}.grid td{vertical-align:top;text-align:center}.grid img{display:block;margin:auto}
.p{max-width:260px;text-align:left;font-size:12px}.s{font-size:11px;color:#444}.win{background:#e6f4e6}.lose{background:#f8e6e6}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}code{background:#f4f4f4;padding:1px 3px}"""


def render_html(report, tables, image_roots, grid_keys, wr_png, hist_png, thumb_size=192) -> str:
    e = html.escape
    models, scorers = report["models"], report["scorers"]
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(report['title'])}</title><style>{_CSS}</style></head><body>"]
    out.append(f"<h1>{e(report['title'])}</h1><p class='s'>created {e(report['created'])}; "
               f"{e(str(report['settings']['n_boot']))} bootstrap resamples over prompts, {int(report['settings']['ci'] * 100)}% "
               f"percentile intervals, seed {e(str(report['settings']['seed']))}.</p>")
    # means
    out.append("<h2>Mean score per model</h2><table id='means'><tr><th class='l'>model</th><th>prompts</th><th>images</th>")
    out += [f"<th>{e(s)}</th>" for s in scorers]
    out.append("</tr>")
    for m in models:
        out.append(f"<tr><td class='l'>{e(m)}</td><td>{report['n_prompts'][m]}</td><td>{report['n_images'][m]}</td>")
        for s in scorers:
            iv = report["means"][m][s]
            out.append(f"<td>{_fmt(iv['estimate'])} <span class='s'>[{_fmt(iv['low'])}, {_fmt(iv['high'])}]</span></td>")
        out.append("</tr>")
    out.append("</table>")
    # win rates
    if report["win_rates"]:
        out.append("<h2>Win rates</h2><table id='winrates'><tr><th class='l'>A</th><th class='l'>B</th><th class='l'>scorer</th>"
                   "<th>win rate of A</th><th>CI</th><th>wins / ties / losses</th><th>N</th></tr>")
        for w in report["win_rates"]:
            cls = "win" if w["low"] > 0.5 else ("lose" if w["high"] < 0.5 else "")
            out.append(f"<tr class='{cls}'><td class='l'>{e(w['model_a'])}</td><td class='l'>{e(w['model_b'])}</td>"
                       f"<td class='l'>{e(w['scorer'])}</td><td>{_fmt(w['win_rate'])}</td><td>[{_fmt(w['low'])}, {_fmt(w['high'])}]</td>"
                       f"<td>{w['wins']} / {w['ties']} / {w['losses']}</td><td>{w['n']}</td></tr>")
        out.append("</table>")
    if wr_png:
        out.append(f"<img alt='win rates' src='{_b64(wr_png, 'image/png')}'>")
    if hist_png:
        out.append(f"<h2>Score distributions</h2><img alt='histograms' src='{_b64(hist_png, 'image/png')}'>")
    # categories
    if report["categories"]:
        out.append("<h2>Per category</h2><table id='categories'><tr><th class='l'>category</th><th>prompts</th>")
        out += [f"<th>{e(m)}: {e(s)}</th>" for m in models for s in scorers]
        wr_cols = list(dict.fromkeys((w["model_a"], w["model_b"], w["scorer"]) for w in report["win_rates"]))
        out += [f"<th>win {e(a)} vs {e(b)} ({e(s)})</th>" for a, b, s in wr_cols]
        out.append("</tr>")
        for c, v in report["categories"].items():
            out.append(f"<tr><td class='l'>{e(c)}</td><td>{v['n_prompts']}</td>")
            out += [f"<td>{_fmt(v['means'][m][s]['estimate'])}</td>" for m in models for s in scorers]
            for a, b, s in wr_cols:
                w = next((w for w in v["win_rates"] if (w["model_a"], w["model_b"], w["scorer"]) == (a, b, s)), None)
                out.append(f"<td>{_fmt(w['win_rate']) if w else 'n/a'}</td>")
            out.append("</tr>")
        out.append("</table>")
    # scorer info
    if report["scorer_info"]:
        out.append("<h2>Scorers</h2><table id='scorers'><tr><th class='l'>scorer</th><th class='l'>details</th></tr>")
        for s, info in report["scorer_info"].items():
            det = "; ".join(f"{e(str(k))}: {e(str(v))}" for k, v in info.items())
            out.append(f"<tr><td class='l'>{e(s)}</td><td class='l'>{det}</td></tr>")
        out.append("</table>")
    # image grid
    if grid_keys:
        out.append(f"<h2>Samples (first {len(grid_keys)} prompts)</h2><table class='grid' id='grid'><tr><th class='l'>prompt</th>")
        out += [f"<th>{e(m)}</th>" for m in models]
        out.append("</tr>")
        for k in grid_keys:
            first = _first_row(tables[models[0]], k) or {}
            out.append(f"<tr><td class='p'>{e(str(first.get('prompt', '')))}"
                       + (f"<br><span class='s'>{e(str(first.get('category')))}</span>" if first.get("category") else "") + "</td>")
            for m in models:
                r = _first_row(tables[m], k)
                t = _thumb(_resolve(image_roots, m, r), thumb_size) if r else None
                img = f"<img alt='{e(m)} {k}' src='{_b64(_jpeg(t), 'image/jpeg')}'>" if t is not None else "<span class='s'>missing</span>"
                pp = {s: per_prompt([r], s).get(k) for s in scorers} if r else {}
                sc = " ".join(f"{e(s)}={_fmt(v)}" for s, v in pp.items() if v is not None)
                out.append(f"<td>{img}<span class='s'>{sc}</span></td>")
            out.append("</tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
