"""``build_pairs``: sample -> score -> pair -> Pick-a-Pic parquet, resumable after a kill at any moment.

Run folder::

    OUT/samples/              the sampler's folder (images/, metadata.jsonl, sample_config.json)
    OUT/image_scores.jsonl    per-image raw scores {file, scores: {scorer: value}} (appended chunk by chunk)
    OUT/pairs_config.json     what produced the run (a rerun with other sampling settings is refused)
    OUT/train.parquet         the pairs (written atomically at the end)
    OUT/summary.json, OUT/summary.png   counts, settings, score distributions and the margin histogram
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from t2ialign.config import SampleConfig
from t2ialign.errors import UserFacingError

from .ensemble import ensemble_scores, parse_weights
from .schema import PARQUET_NAME, pair_columns, write_parquet_atomic, write_json_atomic
from .scores import IMAGE_SCORES, score_images
from .strategies import make_pairs

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
CONFIG_NAME = "pairs_config.json"
SUMMARY_JSON = "summary.json"
SUMMARY_PNG = "summary.png"
# sampling settings that decide the images: a rerun into the same folder must keep them
SAMPLING_KEYS = ("pretrained", "aligned", "guide_with", "rlg_scale", "rlg_schedule", "prompts", "limit",
                 "num_images_per_prompt", "seed", "num_inference_steps", "guidance_scale", "resolution", "scheduler")


@dataclass
class PairsConfig:
    sample: SampleConfig  # the model and sampler settings (its output_dir is replaced by OUT/samples)
    scorers: Sequence = ("pickscore",)  # names, "module:function" callables, or Scorer objects; or "a,b"
    weights: Optional[Sequence[float]] = None  # one per scorer (ensembles: z-normalised first); None = equal
    strategy: str = "best-worst"  # or "all"
    min_margin: float = 0.0  # drop pairs with |score margin| below this (units: see feedback.ensemble)
    out_dir: str = "pairs"
    prompt_column: str = "caption"  # the prompt column when sample.prompts is a parquet file / dataset
    scorer_options: dict = field(default_factory=dict)  # device, dtype, scorer_paths, batch_size for the loaders
    progress: bool = True
    plot: bool = True


def build_pairs(config: PairsConfig) -> Path:
    """Run (or resume) the whole pipeline; returns ``OUT/train.parquet``."""
    from t2ialign.evaluation.folders import read_metadata
    from t2ialign.evaluation.recipes import _build_scorers
    from t2ialign.evaluation.sampling import sample

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.sample.num_images_per_prompt < 2:
        raise UserFacingError("--num-images: pairs need at least 2 images per prompt")
    sample_config = dataclasses.replace(config.sample, output_dir=str(out / SAMPLES_DIR), progress_bar=config.progress)
    _check_same_run(out, sample_config)
    scorers = _build_scorers(_scorer_list(config.scorers), **_loader_options(config.scorer_options))
    weights = parse_weights(config.weights, len(scorers)) if len(scorers) > 1 else [1.0]
    sample(sample_config, records=load_records(sample_config.prompts, config.prompt_column, sample_config.limit))
    rows = sorted(read_metadata(str(out / SAMPLES_DIR)), key=lambda r: (r["prompt_index"], r.get("image_index", 0)))
    named = {s.name: s for s in scorers}
    # chunks of the scorer batch size: the unit a kill can lose, and fixed so reruns batch images identically
    chunk = int(config.scorer_options.get("batch_size") or 32)
    done = score_images(out / SAMPLES_DIR, rows, named, out / IMAGE_SCORES, chunk=chunk, progress=config.progress)
    raw = {n: np.array([done[r["file"]][n] for r in rows]) for n in named}
    combined = ensemble_scores(raw, weights)
    groups = _groups(rows)
    pairs, counts = make_pairs(groups, combined, config.strategy, config.min_margin)
    settings = _settings(sample_config, list(named), weights, config)
    columns = pair_columns(out / SAMPLES_DIR, rows, pairs, combined, raw, settings)
    parquet = write_parquet_atomic(columns, out / PARQUET_NAME)
    summary = _summary(counts, raw, combined, groups, config, settings)
    write_json_atomic(summary, out / SUMMARY_JSON)
    if config.plot:
        from .summary_plot import plot_summary

        plot_summary(raw, combined, groups, config.min_margin, out / SUMMARY_PNG)
    logger.info("pairs: kept %d of %d candidates (%d near-ties, %d exact ties dropped) -> %s", counts["kept"],
                counts["candidates"], counts["dropped_near_tie"], counts["dropped_tie"], parquet)
    return parquet


def load_records(prompts: str, column: str = "caption", limit: Optional[int] = None):
    """Prompt records of a shipped set / prompt file, or the unique values of ``column`` of a parquet file,
    parquet directory or hub dataset (first-appearance order, so the run is a function of the data)."""
    from t2ialign.evaluation.prompts import PromptRecord, load_prompt_set

    if not _is_table(prompts):
        return load_prompt_set(prompts, limit=limit)
    import datasets

    path = Path(prompts)
    files = sorted(str(p) for p in path.rglob("*.parquet")) if path.is_dir() else [str(path)]
    table = datasets.load_dataset("parquet", data_files=files, split="train") if path.exists() else \
        datasets.load_dataset(prompts, split="train")
    if column not in table.column_names:
        raise UserFacingError(f"--prompt-column: {prompts} has no column {column!r}; columns: {', '.join(table.column_names)}")
    unique = list(dict.fromkeys(str(p) for p in table[column] if p is not None and str(p).strip()))
    records = [PromptRecord(prompt=p, index=i, source=str(prompts)) for i, p in enumerate(unique)]
    return records[:limit] if limit is not None else records


def _is_table(prompts: str) -> bool:
    path = Path(prompts)
    return prompts.endswith(".parquet") or (path.is_dir() and any(path.rglob("*.parquet"))) or \
        (not path.exists() and prompts.count("/") == 1 and not path.suffix)  # owner/name: a hub dataset


def _scorer_list(scorers):
    return [s for s in scorers.split(",") if s.strip()] if isinstance(scorers, str) else list(scorers)


def _loader_options(options: dict) -> dict:
    opts = dict(options)
    return {"device": opts.pop("device", None), "dtype": opts.pop("dtype", None),
            "scorer_paths": opts.pop("scorer_paths", None), "batch_size": opts.pop("batch_size", 32), **opts}


def _check_same_run(out: Path, sample_config: SampleConfig) -> None:
    """Images of two sampling settings must not mix in one folder: a rerun must use the same settings."""
    wanted = {k: getattr(sample_config, k) for k in SAMPLING_KEYS}
    path = out / CONFIG_NAME
    if path.is_file():
        stored = json.loads(path.read_text()).get("sampling", {})
        changed = [k for k in SAMPLING_KEYS if stored.get(k) != wanted[k]]
        if changed:
            raise UserFacingError(f"{out} holds a run sampled with other settings ({', '.join(changed)} differ); "
                                  "rerun with the same settings to resume it, or give a new --out")
        return
    write_json_atomic({"sampling": wanted}, path)


def _groups(rows: Sequence[dict]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["prompt_index"], []).append(i)
    return [groups[k] for k in sorted(groups)]


def provenance(config: SampleConfig) -> str:
    """The model that drew the images, as one string (the rows' ``model_0`` / ``model_1``)."""
    if config.guide_with:
        return f"rlg(base={config.pretrained}, aligned={config.guide_with}, w={config.rlg_scale:g})"
    return config.aligned or config.pretrained


def _settings(config: SampleConfig, names: list, weights: list, pairs: PairsConfig) -> dict:
    return {"model": provenance(config), "pretrained": config.pretrained, "aligned": config.aligned or "",
            "guide_with": config.guide_with or "", "rlg_scale": float(config.rlg_scale) if config.guide_with else float("nan"),
            "num_inference_steps": config.num_inference_steps, "guidance_scale": float(config.guidance_scale),
            "scheduler": config.scheduler or "", "sampler_seed": config.seed, "scorers": ",".join(names),
            "weights": ",".join(f"{w:g}" for w in weights), "strategy": pairs.strategy, "min_margin": float(pairs.min_margin)}


def _summary(counts: dict, raw: dict, combined, groups, config: PairsConfig, settings: dict) -> dict:
    def stats(x):
        x = np.asarray(x, dtype=np.float64)
        return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}

    return {**counts, "dropped": counts["dropped_near_tie"] + counts["dropped_tie"], "prompts": len(groups),
            "images": int(len(combined)), "score_units": "raw" if len(raw) == 1 else "weighted z-scores",
            "settings": {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in settings.items()},
            "scores": {n: stats(v) for n, v in raw.items()}, "combined": stats(combined)}
