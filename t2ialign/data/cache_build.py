"""Building the cache: ``build_cache(config)`` runs the VAE and text encoders once over the dataset.

See ``t2ialign.data.cache`` for the format and the design. The build is a pure function of the
config: shard ``k`` holds dataset positions ``[k*S, (k+1)*S)`` (map-style) or stream rows
``[k*S, (k+1)*S)`` minus bad rows (streaming), and process ``r`` of ``W`` builds the shards with
``k % W == r``; so a resumed build, or one with another number of processes, writes the same shards.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from t2ialign.config import ConfigError, TrainConfig
from t2ialign.data.cache_read import FORMAT_VERSION, MANIFEST, NULL_TEXT, SHARD_PATTERN, SPEC, shard_metadata
from t2ialign.data.cache_shards import (
    STORAGE_DTYPES, CacheEncoder, ShardBuilder, shard_complete, write_safetensors_atomic,
)
from t2ialign.data.files import prepare_output_dir, reported_write
from t2ialign.errors import DataError

logger = logging.getLogger(__name__)

SPEC_DATA_KEYS = (
    "dataset", "split", "streaming", "caption_column", "image_columns", "label_columns", "image_caption_columns",
    "resolution", "random_crop", "random_flip", "drop_ties", "max_rows", "min_image_size", "model_names",
    "drop_duplicates", "shuffle_seed", "cache_variants", "cache_dtype", "cache_latent_std", "cache_shard_size",
)


@dataclass
class CacheBuildResult:
    cache_dir: Path
    process_index: int
    num_processes: int
    complete: bool  # manifest.json written: every shard exists
    num_pairs: Optional[int]  # pairs in the whole cache (None until complete)
    shards_written: int  # by this process in this call
    shards_skipped: int  # already complete from an earlier (interrupted) build
    images_encoded: int  # by this process in this call (pairs x 2 x variants)
    seconds: float  # from models loaded to shards written (this process)
    bad_rows: str = ""  # this process's bad-row summary, with the rows it covers (what ``train`` logs)

    @property
    def images_per_second(self) -> float:
        return self.images_encoded / self.seconds if self.seconds > 0 else 0.0


def requires_image_captions(config: TrainConfig) -> bool:
    """The objective conditions each image on its own caption (DCPO): the build then requires them."""
    from t2ialign.objectives import get_objective

    return get_objective(config.objective.name).per_image_captions


def cache_spec(config: TrainConfig) -> dict:
    """Everything that decides the cache's contents; a resumed build must match it exactly."""
    model = config.model
    spec = {
        "format": FORMAT_VERSION,
        "model": {"pretrained": model.pretrained, "revision": model.revision, "variant": model.variant, "vae": model.vae},
        "mixed_precision": config.mixed_precision,  # the VAE / text-encoder precision, as in training
        "seed": config.seed,  # augmentation seed (PairTransform)
        "data": {key: getattr(config.data, key) for key in SPEC_DATA_KEYS},
    }
    if requires_image_captions(config):  # rows with an empty per-image caption are bad rows then (only then in
        spec["require_image_captions"] = True  # the spec, so the build.json of other caches stays as it was)
    return spec


def validate_cache_config(config: TrainConfig) -> None:
    data = config.data
    if not data.cache_dir:
        raise ConfigError("data.cache_dir: set it to the directory the cache is written to (and trained from)")
    if data.cache_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"data.cache_dtype: {data.cache_dtype!r} is not allowed; allowed: {', '.join(STORAGE_DTYPES)}")
    for key in ("cache_variants", "cache_shard_size", "cache_batch_size"):
        if getattr(data, key) < 1:
            raise ConfigError(f"data.{key}: must be at least 1, got {getattr(data, key)}")
    if data.cache_variants > 1 and not (data.random_flip or data.random_crop):
        logger.warning("data.cache_variants=%d without random_flip/random_crop stores identical copies", data.cache_variants)


# ---------------------------------------------------------------- the build


def build_cache(config: TrainConfig, *, max_new_shards: Optional[int] = None, progress: Optional[bool] = None) -> CacheBuildResult:
    """Encode ``config.data``'s pairs into ``config.data.cache_dir`` (resumable, multi-process).

    ``max_new_shards``: stop after writing that many shards in this process (a chunked build, e.g.
    on preemptible machines; rerun to continue). Launch with ``accelerate launch`` / ``torchrun`` to
    split the shards across processes; rank 0 writes ``manifest.json`` once every shard exists.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from t2ialign.data import BadRowReport, build_preference_pairs

    validate_cache_config(config)
    # as Accelerator(): ACCELERATE_USE_CPU=1 makes torchrun / accelerate launch processes a gloo group on CPU
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    rank, world = state.process_index, state.num_processes
    cache_dir = Path(config.data.cache_dir)
    spec = cache_spec(config)
    _check_or_write_spec(cache_dir, spec, state)

    report = BadRowReport()
    data_cfg = dataclasses.replace(config.data, cache_dir=None)
    # DCPO: no per-image caption columns -> DataError here, before any model loads; empty ones are bad rows
    pairs = build_preference_pairs(data_cfg, seed=config.seed, report=report,
                                   require_image_captions=requires_image_captions(config))
    load_report = report.to_dict()
    encoder = CacheEncoder(config, state.device)
    started = time.perf_counter()  # images/s counts decoding + encoding + writing, not model loading
    data = config.data
    shard_size, variants = data.cache_shard_size, data.cache_variants
    dtype = STORAGE_DTYPES[data.cache_dtype]

    def new_builder(k: int) -> ShardBuilder:
        return ShardBuilder(k, encoder, variants, data.cache_batch_size, dtype, data.cache_latent_std)

    def shard_path(k: int) -> Path:
        return cache_dir / SHARD_PATTERN.format(k)

    def todo(k: int) -> bool:
        return k % world == rank and not shard_complete(shard_path(k))

    show = state.is_main_process if progress is None else progress
    written = images = 0
    stopped_early = False
    if data.streaming:
        shard_stream, totals = _stream_shards(pairs, shard_size, variants, todo, new_builder)
    else:
        num_shards = math.ceil(len(pairs) / shard_size)
        totals = {"num_shards": num_shards}
        shard_stream = _map_shards(pairs, shard_size, variants, [k for k in range(rank, num_shards, world) if todo(k)],
                                   new_builder, data.cache_batch_size, data.num_workers)
    # a context: the bar ends its line on an error too, so the CLI's one-line error starts a line of its own
    with tqdm(desc=f"caching (process {rank}/{world})", unit="shard", disable=not show) as bar:
        for builder in shard_stream:
            write_safetensors_atomic(shard_path(builder.shard), builder.tensors(), builder.metadata())
            written += 1
            images += builder.images
            bar.update(1)
            if max_new_shards is not None and written >= max_new_shards:
                stopped_early = True
                break
    if data.streaming and not stopped_early and totals.get("num_shards") == 0:  # every rank read the whole stream
        raise DataError(f"data.dataset: {data.dataset} (split '{data.split}') streamed no rows; nothing to cache")
    skipped = max(0, sum(1 for k in range(rank, totals.get("num_shards", 0), world) if shard_complete(shard_path(k))) - written)
    state.wait_for_everyone()

    complete, num_pairs = False, None
    if state.is_main_process and not stopped_early and "num_shards" in totals:
        manifest = _write_manifest(cache_dir, totals["num_shards"], encoder, config, spec, load_report)
        if manifest is not None:
            complete, num_pairs = True, manifest["num_pairs"]
    state.wait_for_everyone()
    if not state.is_main_process and (cache_dir / MANIFEST).is_file():
        complete, num_pairs = True, json.loads((cache_dir / MANIFEST).read_text())["num_pairs"]
    bad_rows = report.coverage_summary(totals.get("rows")) if data.streaming else pairs.bad_row_summary()
    result = CacheBuildResult(cache_dir, rank, world, complete, num_pairs, written, skipped, images, time.perf_counter() - started,
                              bad_rows)
    logger.info(
        "cache %s: process %d wrote %d shards (%d already done), %.1f images/s; %s", cache_dir, rank, written, skipped,
        result.images_per_second, f"complete, {num_pairs} pairs" if complete else "not complete yet (rerun to resume)",
    )
    return result


def _check_or_write_spec(cache_dir: Path, spec: dict, state) -> None:
    path = cache_dir / SPEC
    if state.is_main_process:
        prepare_output_dir(cache_dir, "data.cache_dir")
        if not path.is_file():
            tmp = path.with_name(f".{SPEC}.tmp")
            with reported_write(path, "nothing of the cache was written yet", cleanup=tmp):
                tmp.write_text(json.dumps(spec, indent=1, sort_keys=True))
                os.replace(tmp, path)
        for torn in cache_dir.glob(".*.tmp-*"):  # half-written shards of an interrupted build
            torn.unlink()
    state.wait_for_everyone()
    existing = json.loads(path.read_text())
    if existing != json.loads(json.dumps(spec)):
        differing = sorted(_diff_keys(existing, json.loads(json.dumps(spec))))
        raise ConfigError(
            f"data.cache_dir: {cache_dir} holds a cache built with a different config ({', '.join(differing)} differ); "
            "use a new data.cache_dir, or delete this one to rebuild it"
        )


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class _PairVariants(torch.utils.data.Dataset):
    """Position -> the pair's transformed samples for variants 0..V-1 (decoded in DataLoader workers)."""

    def __init__(self, pairs, variants: int):
        self.pairs, self.variants = pairs, variants

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, position: int) -> list:
        return [self.pairs[(position, v)] for v in range(self.variants)]


def _as_list(rows):
    return rows


def _map_shards(pairs, shard_size: int, variants: int, shards: list, new_builder, batch_pairs: int, num_workers: int) -> Iterator:
    batches, owners = [], []
    for k in shards:
        stop = min((k + 1) * shard_size, len(pairs))
        for start in range(k * shard_size, stop, batch_pairs):
            batches.append(list(range(start, min(start + batch_pairs, stop))))
            owners.append(k)
    if not batches:
        return
    loader = torch.utils.data.DataLoader(_PairVariants(pairs, variants), batch_sampler=batches, collate_fn=_as_list,
                                         num_workers=num_workers)
    dataset = pairs.dataset
    source_rows = dataset.select_columns(["source_row"])["source_row"] if "source_row" in dataset.column_names else None
    builder = None
    for k, batch in zip(owners, loader):
        if builder is not None and builder.shard != k:
            yield builder
            builder = None
        builder = builder or new_builder(k)
        for samples in batch:
            row = samples[0]["index"]
            events = samples[0].get("bad_rows", ())
            # DataLoader workers count in their own copy of the report: merge what they met into this process's
            pairs.report.record_events(events)
            pairs.report.record_read(samples[0].get("rows_read", ()))
            builder.add(samples, row if source_rows is None else source_rows[row], events)
    if builder is not None:
        yield builder


def _stream_shards(pairs, shard_size: int, variants: int, todo, new_builder) -> tuple:
    """Shards of an IterablePreferencePairs' stream. Every process reads the whole stream so that
    positions agree; rows of shards it does not build are only checked for duplicates, never decoded.
    ``totals["num_shards"]`` is known once the stream is exhausted."""
    from t2ialign.data.badrows import DUPLICATE, BadRow
    from t2ialign.data.pairs import _handle_bad_row

    totals: dict = {}

    def shards():
        seen: set = set()
        builder, current, rows = None, -1, 0
        for row, record in enumerate(pairs.dataset):
            rows = row + 1
            if row // shard_size != current:
                if builder is not None:
                    yield builder
                current = row // shard_size
                builder = new_builder(current) if todo(current) else None
            events: list = []
            try:
                problem = pairs._row_problem(record)
                if problem is not None:
                    raise problem
                if pairs.drop_duplicates and pairs._is_duplicate(record, seen):
                    raise BadRow(DUPLICATE, "same caption and images as an earlier row")
                if builder is None:
                    continue
                samples = [pairs._build(record, row, v, events) for v in range(variants)]
            except BadRow as problem:
                if builder is not None:
                    _handle_bad_row(pairs.report, pairs.strict, row, problem)
                    builder.events.append([row, problem.reason])
                continue
            builder.add(samples, row, events)
        if builder is not None:
            yield builder
        totals["num_shards"], totals["rows"] = math.ceil(rows / shard_size), rows

    return shards(), totals


def _write_manifest(cache_dir: Path, num_shards: int, encoder: CacheEncoder, config: TrainConfig, spec: dict,
                    load_report: dict) -> Optional[dict]:
    """Rank 0, after every process finished: the list of shards, or None if some are missing."""
    shards, events, without_captions = [], Counter(), 0
    for k in range(num_shards):
        path = cache_dir / SHARD_PATTERN.format(k)
        if not shard_complete(path):
            logger.warning("shard %s is missing (a process stopped early); rerun to finish the cache", path.name)
            return None
        meta = shard_metadata(path)
        shards.append({"file": path.name, "pairs": int(meta["pairs"])})
        events.update(reason for _, reason in meta.get("bad_rows", []))
        without_captions += int(meta.get("pairs_without_image_captions", 0))
    null_path = cache_dir / NULL_TEXT
    write_safetensors_atomic(null_path, {k: v.to("cpu", STORAGE_DTYPES[config.data.cache_dtype]).contiguous()
                                         for k, v in encoder.null_text.items()}, {"text": ""})
    null = encoder.null_text["prompt_embeds"]
    manifest = {
        "format": FORMAT_VERSION,
        "num_pairs": sum(s["pairs"] for s in shards),
        "num_shards": num_shards,
        "shards": shards,
        "variants": config.data.cache_variants,
        "augmentation": "variant v = the image pipeline's epoch-v crop/flip (PairTransform seed = spec.seed); epoch e reads e % variants",
        "is_sdxl": encoder.is_sdxl,
        # the stored time_ids are [orig_h, orig_w, crop_top, crop_left, R, R]; training applies data.time_ids to them
        "time_ids": "measured" if encoder.is_sdxl else None,
        "resolution": config.data.resolution,
        "latent_shape": list(encoder.latent_shape),
        "scaling_factor": encoder.scaling_factor,
        "shift_factor": encoder.shift_factor,
        "family": encoder.family,
        "dtype": config.data.cache_dtype,
        "latent_std": config.data.cache_latent_std,
        "text_shape": list(null.shape[1:]),
        "null_text": NULL_TEXT,
        "data_report": {"load": load_report, "build_events": dict(sorted(events.items()))},
        # pairs whose per-image captions were missing or empty, stored as the prompt: DCPO refuses such a cache
        "pairs_without_image_captions": without_captions,
        "spec": spec,
    }
    tmp = cache_dir / f".{MANIFEST}.tmp"
    with reported_write(cache_dir / MANIFEST, "every shard is intact: a rerun only writes the manifest", cleanup=tmp):
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, cache_dir / MANIFEST)
    return manifest
