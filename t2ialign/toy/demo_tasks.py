"""``t2ialign demo``'s work split into tasks that run in ``workers`` processes, so every core is used.

The toy models' kernels are too small to split across threads (two threads give 1.5x at best, and on
a busy machine OpenMP spin-waiting makes them slower), so the demo uses processes instead: each worker
runs one thread. A task is deterministic on its own (its seeds come from its arguments, never from
what ran before it in the same process), so the results are identical for any number of workers; with
``workers=1`` the tasks run in this process, one after the other, in submission order.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

_PIPELINES: dict = {}  # per worker process: the toy pipeline for pair sampling, loaded once


def _init_worker(log_level: int) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")


class TaskPool:
    """``submit(fn, *args) -> Future`` over ``workers`` spawned processes, or in-process when ``workers == 1``."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.executor = None
        if workers > 1:
            # spawn, not fork: a forked copy of a process that already ran torch ops can deadlock in OpenMP
            self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(logging.getLogger().level,))

    def submit(self, fn, *args) -> Future:
        if self.executor is not None:
            return self.executor.submit(fn, *args)
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self) -> "TaskPool":
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=exc[0] is not None)


# ------------------------------------------------------------------ tasks (module level: they are pickled)

def sample_pair_batch(base_dir: str, prompts: list, batch_index: int, seed: int, steps: int, guidance: float) -> np.ndarray:
    """Batch ``batch_index`` of the preference pairs' images (``pairs.sample_toy_images`` with two per prompt)."""
    from t2ialign.toy.pairs import load_toy_pipeline, sample_toy_images

    started = time.time()
    if base_dir not in _PIPELINES:
        _PIPELINES[base_dir] = load_toy_pipeline(base_dir)
    images = sample_toy_images(_PIPELINES[base_dir], prompts, seed=seed, images_per_prompt=2, num_inference_steps=steps,
                               guidance_scale=guidance, batches=[batch_index])
    logger.info("pairs: batch %d (%d images) sampled in %.0f s", batch_index, len(images), time.time() - started)
    return images.numpy()


def sample_folder(config, records) -> str:
    from t2ialign.evaluation.sampling import sample

    started = time.time()
    folder = sample(config, records)
    logger.info("sampled %s in %.0f s", folder, time.time() - started)
    return str(folder)


def build_latent_cache(raw_config: dict) -> str:
    """``t2ialign cache`` of the pairs (``demo.latent_cache_config``); returns the cache directory."""
    from t2ialign.config import load_train_config
    from t2ialign.data.cache import build_cache

    started = time.time()
    build_cache(load_train_config(data=raw_config), progress=False)
    logger.info("latent cache of the pairs built in %.0f s", time.time() - started)
    return str(raw_config["data"]["cache_dir"])


def align_objective(settings, base_dir, pairs_path, objective: str, records, preference_name: str, out,
                    cache_dir=None) -> tuple:
    """Train ``objective`` in chunks with its reward curve, then sample the held-out prompts with the export."""
    from t2ialign.toy.demo import align_with_curve
    from t2ialign.toy.preferences import get_preference

    started = time.time()
    export_dir, curve = align_with_curve(settings, base_dir, pairs_path, objective, records,
                                         get_preference(preference_name), Path(out), cache_dir=cache_dir)
    logger.info("%s: trained, with its reward curve and held-out samples, in %.0f s", objective, time.time() - started)
    return str(export_dir), curve


# ------------------------------------------------------------------ helpers for the parent

def pair_images(pool: TaskPool, base_dir: Path, prompts: list, seed: int, steps: int, guidance: float) -> torch.Tensor:
    """The preference pairs' images, one task per sampling batch, concatenated in batch order."""
    from t2ialign.toy.pairs import prompt_batches

    futures = [pool.submit(sample_pair_batch, str(base_dir), prompts, index, seed, steps, guidance)
               for index in range(len(prompt_batches(len(prompts))))]
    return torch.cat([torch.from_numpy(f.result()) for f in futures])


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: a copy is as good
        shutil.copy2(source, target)


def reuse_folder(source: Path, target: Path, num_prompts: Optional[int] = None) -> None:
    """Give ``target`` the images and metadata of ``source``'s first ``num_prompts`` prompts (all: None), from a
    sample folder that the target equals exactly (the sampler then finds those images done)."""
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if num_prompts is None or row["prompt_index"] < num_prompts]
    (target / "images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        if not (target / row["file"]).exists():
            _link_or_copy(str(source / row["file"]), str(target / row["file"]))
    (target / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def presample_rlg(pool: TaskPool, base_config, scales, records, exact: dict) -> list[Future]:
    """Fill the sweep's folders before ``rlg_sweep`` scores them: ``exact`` maps a scale to a folder it equals
    (w = 0 is the base, w = 1 the aligned model: RLG reproduces both exactly, tests/test_guidance.py), the
    other scales are sampled as tasks."""
    from t2ialign.evaluation.sweep import scale_config

    futures = []
    for w in scales:
        config = scale_config(base_config, w, base_config.output_dir)
        if float(w) in exact:
            reuse_folder(Path(exact[float(w)]), Path(config.output_dir), len(records))
        else:
            futures.append(pool.submit(sample_folder, config, records))
    return futures
