"""``build_pairs``: sample -> score -> pair -> Pick-a-Pic parquet, resumable after a kill at any moment.

Run folder::

    OUT/samples/              the sampler's folder (images/, metadata.jsonl, sample_config.json)
    OUT/image_scores.jsonl    per-image raw scores {file, scores: {scorer: value}} (appended chunk by chunk)
    OUT/pairs_config.json     what produced the run (a rerun with other sampling settings is refused)
    OUT/train.parquet         the pairs (written atomically at the end)
    OUT/summary.json, OUT/summary.png   counts, settings, score distributions and the margin histogram

Several processes (``accelerate launch`` / ``torchrun``, as for ``t2ialign cache``): process r of W samples
the sampler batches b with b % W == r and scores the scoring chunks c with c % W == r (the batches and chunks
one process would form, so the same images and scores), appending to its own ``samples/metadata.rank{r}.jsonl``
and ``image_scores.rank{r}.jsonl``; the main process merges them (sorted by prompt and image index) once all
are done and writes the same files as a single process. Leftover rank files of a killed run are merged at the
start of the next one, whatever its number of processes.
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
from .scores import IMAGE_SCORES, merge_scores, score_images
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
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from t2ialign.evaluation.folders import read_metadata
    from t2ialign.evaluation.recipes import _build_scorers
    from t2ialign.evaluation.sampling import sample

    if config.sample.num_images_per_prompt < 2:
        raise UserFacingError("--num-images: pairs need at least 2 images per prompt")
    # as Accelerator(): ACCELERATE_USE_CPU=1 makes torchrun / accelerate launch processes a gloo group on CPU; each
    # process's "cuda" is its own GPU (PartialState sets the current device)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    rank, world = state.process_index, state.num_processes
    shard = (rank, world) if world > 1 else None
    main = state.is_main_process
    out = Path(config.out_dir)
    samples = out / SAMPLES_DIR
    sample_config = dataclasses.replace(config.sample, output_dir=str(samples), progress_bar=config.progress and main)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _check_same_run(out, sample_config)
        if samples.is_dir():  # what a killed multi-process run left, before any process reads the merged files
            merge_metadata(samples)
            merge_scores(out / IMAGE_SCORES, [])
    state.wait_for_everyone()
    if not main:
        _check_same_run(out, sample_config)  # the file main wrote: every process refuses alike
    scorers = _build_scorers(_scorer_list(config.scorers), **_loader_options(config.scorer_options))
    weights = parse_weights(config.weights, len(scorers)) if len(scorers) > 1 else [1.0]
    sample(sample_config, records=load_records(sample_config.prompts, config.prompt_column, sample_config.limit),
           shard=shard)
    if world > 1:
        state.wait_for_everyone()
        if main:
            merge_metadata(samples)
        state.wait_for_everyone()
    rows = sorted(read_metadata(str(samples)), key=lambda r: (r["prompt_index"], r.get("image_index", 0)))
    named = {s.name: s for s in scorers}
    # chunks of the scorer batch size: the unit a kill can lose, and fixed so reruns batch images identically
    chunk = int(config.scorer_options.get("batch_size") or 32)
    done = score_images(samples, rows, named, out / IMAGE_SCORES, chunk=chunk, progress=config.progress and main,
                        shard=shard)
    if world > 1:
        state.wait_for_everyone()
        if not main:  # the main process pairs and writes; the others wait for it (the CLI reads summary.json)
            state.wait_for_everyone()
            return out / PARQUET_NAME
        done = merge_scores(out / IMAGE_SCORES, [r["file"] for r in rows])
        try:
            return _write(config, out, sample_config, rows, named, weights, done)
        finally:
            state.wait_for_everyone()
    return _write(config, out, sample_config, rows, named, weights, done)


def _write(config: PairsConfig, out: Path, sample_config: SampleConfig, rows: list, named: dict, weights: list,
           done: dict) -> Path:
    """Pair the scored images and write train.parquet, summary.json and summary.png (the main process)."""
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


def merge_metadata(samples: Path) -> None:
    """Fold the processes' ``metadata.rank*.jsonl`` into ``metadata.jsonl`` (one row per image whose file exists,
    sorted by prompt and image index; complete lines only), written atomically, then remove the rank files."""
    parts = sorted(samples.glob("metadata.rank*.jsonl"))
    if not parts:
        return
    meta = samples / "metadata.jsonl"
    rows: dict[str, dict] = {}
    for path in [meta, *parts]:
        data = path.read_bytes() if path.is_file() else b""
        for line in data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines():  # a torn last line: resampled
            if line.strip():
                row = json.loads(line)
                if row["file"] not in rows and (samples / row["file"]).is_file():
                    rows[row["file"]] = row
    ordered = sorted(rows.values(), key=lambda r: (r["prompt_index"], r.get("image_index", 0)))
    tmp = samples / "metadata.jsonl.tmp"
    tmp.write_bytes("".join(json.dumps(r) + "\n" for r in ordered).encode())
    os.replace(tmp, meta)
    for path in parts:
        path.unlink()


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
