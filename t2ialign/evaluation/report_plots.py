"""PNG plots and image thumbnails of the evaluation report (``report.py``).

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed) and return PNG bytes.
"""
from __future__ import annotations

import io
import math
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw

# thumbnails smaller than this (e.g. the toy world's 32 px images) are upscaled, nearest-neighbour, by an
# integer factor so that their pixels stay visible instead of being blurred
MIN_THUMB = 128


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
    ax.set_xlim(-0.9, len(scorers) - 0.1)  # room beside the bars: one pair of one scorer would fill the axes
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate (95% CI)")
    ax.legend(fontsize=8, loc="lower right")
    return _png_bytes(fig)


def scorer_label(scorer: str, scorer_info: dict | None = None) -> str:
    """The x-axis label of a scorer's histogram: ``"<name> score"``, and its scale on a second line when the
    scorer's description names one (e.g. PickScore's ``logit_scale.exp() * cos``)."""
    scale = ((scorer_info or {}).get(scorer) or {}).get("scale")
    if not scale:
        return f"{scorer} score"
    return f"{scorer} score\n" + "\n".join(textwrap.wrap(f"({textwrap.shorten(str(scale), 100)})", 50))


def plot_histograms(tables, scorers, scorer_info: dict | None = None) -> bytes | None:
    """Score histograms as PNG bytes (``histogram_figure``)."""
    return _png_bytes(histogram_figure(tables, scorers, scorer_info)) if scorers else None


def histogram_figure(tables, scorers, scorer_info: dict | None = None):
    """Score histograms, one panel per scorer (x: the score, with its scale; y: count), one colour per model."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(3.6 * len(scorers), 3.0)
    for k, s in enumerate(scorers):
        ax = fig.add_subplot(1, len(scorers), k + 1)
        vals = {m: np.array([r["scores"][s] for r in rows if s in r.get("scores", {})], dtype=float) for m, rows in tables.items()}
        allv = np.concatenate([v for v in vals.values() if v.size]) if any(v.size for v in vals.values()) else np.zeros(1)
        allv = allv[np.isfinite(allv)]
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
        for m, v in vals.items():
            # outlines from 3 models on: filled bars of many models blend into one brown mass
            style = {"histtype": "step", "lw": 1.5} if len(vals) > 2 else {"alpha": 0.5}
            ax.hist(v[np.isfinite(v)], bins=bins, label=m, **style)
        ax.set_title(s, fontsize=10)
        ax.set_xlabel(scorer_label(s, scorer_info), fontsize=8)
        ax.set_ylabel("count (images)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, title="model", title_fontsize=7)
    fig.tight_layout()
    return fig


def plot_reward_curves(curves: dict, label: str = "mean reward") -> bytes | None:
    """``{name: [{"step", "mean_reward"}, ...]}`` -> reward vs optimizer step, one line per name."""
    curves = {k: v for k, v in (curves or {}).items() if v}
    if not curves:
        return None
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in curves.items():
        ax.plot([p["step"] for p in points], [p["mean_reward"] for p in points], marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.set_title("reward over training", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png_bytes(fig)


TRAINING_METRICS = (("loss", "loss"), ("implicit_acc", "implicit accuracy"))


def plot_training_metrics(runs: dict) -> bytes | None:
    """``{run: [metrics.jsonl record, ...]}`` -> loss and implicit accuracy vs step, one line per run."""
    panels = [(key, label) for key, label in TRAINING_METRICS if any(key in r for recs in runs.values() for r in recs)]
    if not panels:
        return None
    fig = _figure(4.6 * len(panels), 3.4)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=name)
        if key == "implicit_acc":
            ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_bytes(fig)


def plot_rlg_sweep(sweep: dict) -> bytes | None:
    """Mean score vs RLG scale w with CI error bars, one panel per scorer (``sweep.json`` of ``rlg_sweep``)."""
    names = list(sweep.get("scorers") or [])
    scales = list(sweep.get("scales") or [])
    results = sweep.get("results") or {}
    if not names or not scales:
        return None
    fig = _figure(4.2 * len(names), 3.4)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        stats = [(w, (results.get(f"{float(w):g}") or {}).get("scores", {}).get(name)) for w in scales]
        stats = [(w, s) for w, s in stats if s]
        means = np.array([s["mean"] for _, s in stats])
        err = np.vstack([means - [s["low"] for _, s in stats], [s["high"] for _, s in stats] - means])
        ax.errorbar([w for w, _ in stats], means, yerr=err, marker="o", capsize=3)
        ax.axvline(1.0, color="0.7", lw=0.8, ls="--")
        ax.set_xlabel("RLG scale w (0 = base, 1 = aligned)")
        ax.set_ylabel(f"mean {name}")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png_bytes(fig)


# -- images -------------------------------------------------------------------------------------------
def thumb(path, size, min_size: int = MIN_THUMB) -> Image.Image | None:
    """The image shrunk to fit ``size`` (antialiased), or, when smaller than ``min_size``, enlarged by an
    integer factor with nearest-neighbour so that each pixel becomes a visible block."""
    if not path:
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.load()
    except (OSError, ValueError):
        return None
    if max(im.size) > size:
        im.thumbnail((size, size))
    elif max(im.size) < min_size:
        f = math.ceil(min_size / max(im.size))
        im = im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
    return im.copy()


def image_bytes(im: Image.Image, small: int = 2 * MIN_THUMB) -> tuple[bytes, str]:
    """PNG for small (upscaled pixel-art) images, whose block edges JPEG would smear; JPEG otherwise."""
    buf = io.BytesIO()
    if max(im.size) <= small:
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), "image/png"
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), "image/jpeg"


def build_grid(models, cells, captions, thumb_size=192) -> Image.Image | None:
    """``grid.png``: a header row of model names, then one row per prompt: its caption in a left column
    beside that prompt's images (``cells[i][j]``: a PIL image or None), so no caption sits between rows."""
    if not captions:
        return None
    th = max([thumb_size] + [max(c.size) for row in cells for c in row if c is not None])
    cap_w, label_h, pad = 200, 18, 6
    W = cap_w + len(models) * (th + pad) + pad
    H = label_h + len(captions) * (th + pad) + pad
    grid = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(grid)
    for j, m in enumerate(models):
        d.text((cap_w + pad + j * (th + pad), 3), str(m)[:30], fill="black")
    for i, caption in enumerate(captions):
        y = label_h + pad + i * (th + pad)
        d.line([(0, y - pad // 2), (W, y - pad // 2)], fill=(220, 220, 220))
        lines = textwrap.wrap(str(caption), 30)[: max(1, th // 14)]
        d.multiline_text((pad, y + 2), "\n".join(lines), fill="black", spacing=3)
        for j, t in enumerate(cells[i]):
            if t is not None:
                grid.paste(t, (cap_w + pad + j * (th + pad), y))
    return grid


def resolve(image_roots, model, row):
    if row is None or not row.get("file"):
        return None
    f = row["file"]
    if os.path.isabs(f) or not image_roots or model not in image_roots:
        return f
    return os.path.join(image_roots[model], f)
