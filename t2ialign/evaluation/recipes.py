"""The ``score`` and ``eval`` recipes (the CLI is a thin shell around these).

``score_folder(model_dir, scorers)`` scores every image of a model folder (format: ``folders.py``) with
each scorer, writes ``scores.jsonl`` + ``scores_meta.json`` next to ``metadata.jsonl`` and returns the
rows. ``evaluate({name: model_dir}, scorers, out_dir)`` scores the folders (reusing existing scores of the
same scorers unless ``rescore``), then writes the report (means, win rates with bootstrap CIs,
per-category breakdown, image grid; training curves and an RLG sweep when given).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping, Sequence

from PIL import Image

from t2ialign.errors import DataError, UserFacingError

from .folders import METADATA, SCORES, SCORES_META, image_path, read_metadata, read_scores, write_jsonl
from .report import read_sweep, read_training_metrics, write_report

logger = logging.getLogger(__name__)


def _build_scorers(scorers, device=None, dtype=None, scorer_paths: Mapping[str, str] | None = None, batch_size: int = 32,
                   **scorer_kwargs):
    """Names -> Scorer objects (objects pass through); ``scorer_kwargs`` (tf32, resize_on) go to each loader."""
    from t2ialign.scoring import Scorer, canonical_scorer_name, get_scorer, parse_scorer_list

    if isinstance(scorers, str):
        scorers = parse_scorer_list(scorers)
    out = []
    for s in scorers:
        if isinstance(s, Scorer):
            out.append(s)
        else:
            paths = {canonical_scorer_name(k): v for k, v in (scorer_paths or {}).items()}
            kw = dict(scorer_kwargs)
            if canonical_scorer_name(s) == "imagereward":
                kw.pop("resize_on", None)
            out.append(get_scorer(s, paths.get(canonical_scorer_name(s)), device=device, dtype=dtype, batch_size=batch_size, **kw))
    return out


def score_rows(model_dir: str, rows: Sequence[dict], scorers, chunk: int = 64) -> list[dict]:
    """Add ``row["scores"][scorer.name]`` for each row (images loaded ``chunk`` at a time)."""
    rows = [dict(r, scores=dict(r.get("scores", {}))) for r in rows]
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        images = [_load_image(model_dir, r) for r in part]
        prompts = [r["prompt"] for r in part]
        for sc in scorers:
            vals = sc.score(images, prompts)
            for r, v in zip(part, vals.tolist()):
                r["scores"][sc.name] = float(v)
    return rows


def _load_image(model_dir: str, row: dict) -> Image.Image:
    """The row's image; DataError naming it when it is not an image (e.g. a text file listed in metadata.jsonl)."""
    try:
        with Image.open(image_path(model_dir, row)) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(
            f"{os.path.join(model_dir, METADATA)}: {row['file']} is not an image PIL can read ({type(exc).__name__}); "
            f"nothing was scored and {SCORES} is unchanged. Fix: delete that file and rerun the same 't2ialign sample' "
            "command (it re-creates missing images), or correct the row's \"file\""
        ) from None


def score_folder(model_dir: str, scorers, device=None, dtype=None, scorer_paths=None, batch_size: int = 32,
                 write: bool = True, **scorer_kwargs) -> list[dict]:
    """Score one model folder; writes ``scores.jsonl`` (merging earlier scores of other scorers).
    ``scorers``: names (``"pickscore,hpsv21"`` or a list) or Scorer objects."""
    scorers = _build_scorers(scorers, device, dtype, scorer_paths, batch_size, **scorer_kwargs)
    rows = read_metadata(model_dir)
    old = read_scores(model_dir)
    if old and len(old) == len(rows) and all(o.get("file") == r["file"] for o, r in zip(old, rows)):
        for o, r in zip(old, rows):
            r["scores"] = {k: v for k, v in o.get("scores", {}).items() if k not in {s.name for s in scorers}}
    t0 = time.perf_counter()
    rows = score_rows(model_dir, rows, scorers)
    dt = time.perf_counter() - t0
    logger.info("scored %d images in %s with %s (%.1f images/s)", len(rows), model_dir, ",".join(s.name for s in scorers),
                len(rows) / max(dt, 1e-9))
    if write:
        write_jsonl(os.path.join(model_dir, SCORES), rows)
        _write_scores_meta(model_dir, scorers)
    return rows


def _write_scores_meta(model_dir: str, scorers) -> None:
    from t2ialign.data.files import reported_write  # here: t2ialign.data imports datasets (slow)

    meta_path = os.path.join(model_dir, SCORES_META)
    meta = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
    meta.update({s.name: s.describe() for s in scorers})
    tmp = meta_path + ".tmp"
    with reported_write(meta_path, f"the scores are saved in {SCORES}", cleanup=tmp):  # atomic: no torn JSON
        with open(tmp, "w") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(tmp, meta_path)


def _scorer_names(scorers) -> list[str]:
    from t2ialign.scoring import canonical_scorer_name

    items = scorers.split(",") if isinstance(scorers, str) else scorers
    return [canonical_scorer_name(s) if isinstance(s, str) else s.name for s in items if not isinstance(s, str) or s.strip()]


def parse_model_dirs(specs: Sequence[str], what: str = "model folders") -> dict[str, str]:
    """``["base=runs/base/samples", "runs/dpo/samples"]`` -> ``{"base": ..., "samples": ...}``
    (also training run folders, ``--runs``; ``what`` names them in the error)."""
    out = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
        path = path or spec
        name = name or os.path.basename(os.path.normpath(path))
        if name in out:
            raise UserFacingError(f"two {what} named {name!r}; name them explicitly as NAME=PATH")
        out[name] = path
    return out


def evaluate(model_dirs, scorers, out_dir: str, baseline: str | None = None, device=None, dtype=None, scorer_paths=None,
             batch_size: int = 32, rescore: bool = False, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
             title: str | None = None, max_grid_prompts: int = 16, runs=None, sweep: str | None = None,
             **scorer_kwargs) -> dict:
    """Score the model folders and write the report; returns ``{name: path}`` of the written files.

    ``runs``: training output folders (``{name: dir}`` or ``["NAME=DIR", ...]``) whose ``metrics.jsonl`` the
    report plots (loss, implicit accuracy); ``sweep``: an RLG sweep folder (``sweep.json``) it adds."""
    if runs is not None and not isinstance(runs, Mapping):
        runs = parse_model_dirs(runs, what="training runs")
    # read before any scorer loads, so a wrong path fails in a second rather than after the scoring
    run_metrics = {name: read_training_metrics(d) for name, d in (runs or {}).items()}
    sweep_summary = read_sweep(sweep) if sweep else None
    if not isinstance(model_dirs, Mapping):
        model_dirs = parse_model_dirs(model_dirs)
    if len(model_dirs) < 1:
        raise UserFacingError("no model folders given")
    if baseline is not None and baseline not in model_dirs:
        raise UserFacingError(f"baseline {baseline!r} is not one of the models: {', '.join(model_dirs)}")
    for d in model_dirs.values():  # fail on a bad folder before loading any weights
        read_metadata(d)
    from t2ialign.data.files import prepare_output_dir  # here: t2ialign.data imports datasets (slow)

    prepare_output_dir(out_dir, "--out")  # and on an --out that is a file, before scoring for minutes
    scorer_objs = None
    tables, info = {}, {}
    names = None
    for m, d in model_dirs.items():
        existing = read_scores(d)
        wanted = _scorer_names(scorers)
        if existing and not rescore and all(all(w in r.get("scores", {}) for w in wanted) for r in existing) \
                and len(existing) == len(read_metadata(d, check_files=False)):
            logger.info("%s: reusing %s", d, SCORES)
            tables[m] = existing
        else:
            if scorer_objs is None:
                scorer_objs = _build_scorers(scorers, device, dtype, scorer_paths, batch_size, **scorer_kwargs)
            tables[m] = score_folder(d, scorer_objs)
        names = names or wanted
        meta_path = os.path.join(d, SCORES_META)
        if os.path.isfile(meta_path):
            with open(meta_path) as fh:
                info.update({k: v for k, v in json.load(fh).items() if k in wanted and k not in info})
    return write_report(out_dir, tables, scorers=names, image_roots=dict(model_dirs), baseline=baseline, n_boot=n_boot,
                        ci=ci, seed=seed, scorer_info=info, title=title, max_grid_prompts=max_grid_prompts, runs=run_metrics,
                        sweep=sweep_summary)
