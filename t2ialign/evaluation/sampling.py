"""``sample(config)``: images for a prompt set with a fixed seed per (prompt, image), resumable.

Output folder layout (read by ``t2ialign score`` / ``eval``):
  images/00000_0.png ...   one PNG per (prompt index, image index)
  metadata.jsonl           one row per image: prompt, prompt_index, image_index, seed, file, category
  sample_config.json       what produced them
The initial latents of image k of prompt i come from ``seed + i * num_images_per_prompt + k`` alone,
so two models sampled with the same config start from identical noise (the papers' protocol).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from t2ialign.config import SampleConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def image_seed(config: SampleConfig, prompt_index: int, image_index: int) -> int:
    return config.seed + prompt_index * config.num_images_per_prompt + image_index


def initial_latents(pipe, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """Per-image noise drawn on the CPU from its own seed: identical across models, devices and batch sizes.

    In the layout the pipeline takes as ``latents=``: (C, H/f, W/f) per image, and for FLUX the same noise
    packed into 2x2 patches (``FluxPipeline._pack_latents``), as its own ``prepare_latents`` draws it."""
    from t2ialign.models.pipeline import pipeline_denoiser

    channels = pipeline_denoiser(pipe).config.in_channels
    pack = getattr(pipe, "_pack_latents", None)
    if pack is None:
        shape = (channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    else:  # packed latents: in_channels counts the 2x2 patch, the latent size is a multiple of 2
        channels //= 4
        shape = (channels, 2 * (height // (2 * pipe.vae_scale_factor)), 2 * (width // (2 * pipe.vae_scale_factor)))
    noise = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
    return noise if pack is None else pack(noise, len(seeds), *shape)


def default_size(pipe) -> int:
    """The pipeline's own default image size (SDXL, SD3, FLUX: ``default_sample_size``; SD 1.x: the UNet's)."""
    from t2ialign.models.pipeline import pipeline_denoiser

    sample_size = getattr(pipe, "default_sample_size", None) or pipeline_denoiser(pipe).config.sample_size
    return int(sample_size) * pipe.vae_scale_factor


def sampling_dtype(config: SampleConfig, device: str) -> str:
    """The precision the pipeline really runs at: ``config.dtype`` on a GPU, fp32 on the CPU."""
    return config.dtype if torch.device(device).type != "cpu" else "fp32"


def _done_files(output_dir: Path) -> set:
    meta = output_dir / "metadata.jsonl"
    if not meta.is_file():
        return set()
    done = set()
    for line in meta.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if (output_dir / row["file"]).is_file():
                done.add(row["file"])
    return done


def _drop_torn_tail(meta: Path) -> None:
    """Cut a last line without its newline (a run killed mid-write): rows appended after it would join it."""
    if not meta.is_file():
        return
    data = meta.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(meta, data.rfind(b"\n") + 1)


def _write_sample_config(config: SampleConfig, device: str, output_dir: Path) -> None:
    """What produced the images: the device and dtype actually used (a CPU run is fp32 whatever was asked)."""
    from t2ialign.data.files import reported_write
    recorded = {**asdict(config), "device": device, "dtype": sampling_dtype(config, device)}
    if (recorded["device"], recorded["dtype"]) != (config.device, config.dtype):
        recorded["requested"] = {"device": config.device, "dtype": config.dtype}
    path = output_dir / "sample_config.json"
    tmp = path.with_suffix(".json.tmp")
    with reported_write(path, "the images and metadata.jsonl rows there are intact", cleanup=tmp):
        tmp.write_text(json.dumps(recorded, indent=2))
        os.replace(tmp, path)


def _jobs(config: SampleConfig, records, done: set) -> list[dict]:
    jobs = []
    for prompt_index, record in enumerate(records):
        for image_index in range(config.num_images_per_prompt):
            file = f"images/{prompt_index:05d}_{image_index}.png"
            if file in done:
                continue
            jobs.append({
                "prompt": record.prompt, "prompt_index": prompt_index, "image_index": image_index,
                "seed": image_seed(config, prompt_index, image_index), "file": file,
                "category": getattr(record, "category", None),
            })
    return jobs


def build_sampler(config: SampleConfig, device: str):
    """The pipeline to sample from, and extra call kwargs (RL guidance wraps the base pipeline)."""
    from t2ialign.models.pipeline import load_pipeline

    dtype = DTYPES[sampling_dtype(config, device)]
    if config.guide_with:
        from t2ialign.guidance import rlg_pipeline

        pipe, extra = rlg_pipeline(config, dtype=dtype, device=device)
    else:
        pipe, extra = load_pipeline(config.pretrained, aligned=config.aligned, dtype=dtype, device=device,
                                    scheduler=config.scheduler), {}
    _apply_speed_levers(config, pipe)
    return pipe, extra


def _apply_speed_levers(config: SampleConfig, pipe) -> None:
    """compile / channels-last on the denoisers inside the pipeline (with RL guidance: the base and the aligned one)."""
    if not (config.compile or config.channels_last):
        return
    from t2ialign.guidance import RLGDenoiser
    from t2ialign.models.pipeline import pipeline_denoiser
    from t2ialign.models.speed import apply_speed_settings

    denoiser = pipeline_denoiser(pipe)
    apply_speed_settings(config, *(denoiser.models() if isinstance(denoiser, RLGDenoiser) else [denoiser]))


def sample(config: SampleConfig, records=None, shard: Optional[tuple[int, int]] = None, pipe=None,
           call_kwargs: Optional[dict] = None) -> Path:
    """Sample ``config.prompts`` (or the given prompt records) into ``config.output_dir``; returns it.

    ``shard=(rank, world)``: one process of a multi-process run (``feedback.build``). It samples only batch b
    of the full job list for b % world == rank (the batches a single process would draw, so the same bytes),
    appends its rows to ``metadata.rank{rank}.jsonl`` (no two processes write one file), and only rank 0 writes
    sample_config.json. The caller merges the rank files into metadata.jsonl once every process is done.

    ``pipe``: a pipeline already built (validation during training: the live policy UNet inside the training
    components) instead of loading ``config.pretrained`` / ``config.aligned``. ``call_kwargs``: extra arguments of
    every pipeline call (validation of a flow model: its T5 ``max_sequence_length``)."""
    from t2ialign.data.files import prepare_output_dir
    from t2ialign.evaluation.prompts import load_prompt_set
    from t2ialign.models.pipeline import pipeline_denoiser

    records = records if records is not None else load_prompt_set(config.prompts, limit=config.limit)
    output_dir = prepare_output_dir(config.output_dir, "output_dir (--out)")
    prepare_output_dir(output_dir / "images", "output_dir (--out)")
    device = pick_device(config.device)
    rank, world = shard or (0, 1)
    if rank == 0:
        _write_sample_config(config, device, output_dir)
    meta = "metadata.jsonl" if shard is None else f"metadata.rank{rank}.jsonl"
    _drop_torn_tail(output_dir / meta)
    jobs = _jobs(config, records, _done_files(output_dir))
    if shard is not None:
        full = _jobs(config, records, set())
        mine = {job["file"] for b, start in enumerate(range(0, len(full), config.batch_size)) if b % world == rank
                for job in full[start : start + config.batch_size]}
        jobs = [job for job in jobs if job["file"] in mine]
    if not jobs:
        return output_dir
    pipe, extra = build_sampler(config, device) if pipe is None else (pipe, {})
    extra = {**extra, **_sequence_length_kwargs(config, pipe), **(call_kwargs or {})}
    size = config.resolution or default_size(pipe)
    # a context: the bar ends its line on an error too, so the CLI's one-line error starts a line of its own
    with tqdm(total=len(jobs), desc=f"sampling {output_dir.name}", unit="img", disable=not config.progress_bar) as bar:
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start : start + config.batch_size]
            seeds = [job["seed"] for job in batch]
            latents = initial_latents(pipe, seeds, size, size).to(device, pipeline_denoiser(pipe).dtype)
            images = pipe(
                prompt=[job["prompt"] for job in batch], latents=latents, height=size, width=size,
                num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s + 1) for s in seeds], **extra,
            ).images
            _save_batch(output_dir, batch, images, meta)
            bar.update(len(batch))
    return output_dir


def _sequence_length_kwargs(config: SampleConfig, pipe) -> dict:
    """``max_sequence_length`` for a flow pipeline's call; refused for a UNet pipeline, which has no T5."""
    from t2ialign.models.pipeline import denoiser_name

    if config.max_sequence_length is None:
        return {}
    if denoiser_name(pipe) != "transformer":
        from t2ialign.config import ConfigError

        raise ConfigError(f"max_sequence_length: {type(pipe).__name__} has no T5 encoder; the key is for SD3 / FLUX "
                          "pipelines, remove it")
    return {"max_sequence_length": int(config.max_sequence_length)}


KEPT = "the images and metadata.jsonl rows written before are intact, and a rerun continues from them"


def _save_batch(output_dir: Path, batch: list, images: list, meta: str = "metadata.jsonl") -> None:
    """Images first (each atomically), then their metadata rows in one append: a row never names a missing image."""
    for job, image in zip(batch, images):
        _save_atomic(image, output_dir / job["file"])
    _append_rows(output_dir / meta, batch)


def _save_atomic(image, path: Path) -> None:
    from t2ialign.data.files import reported_write

    tmp = path.with_suffix(".tmp.png")
    with reported_write(path, KEPT, cleanup=tmp):
        image.save(tmp)
        os.replace(tmp, path)


def _append_rows(path: Path, rows: list) -> None:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    from t2ialign.data.files import reported_write

    size = path.stat().st_size if path.exists() else 0
    with reported_write(path, KEPT):
        try:
            with open(path, "ab") as handle:
                handle.write(data)
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(path, size)  # no torn row: the rerun samples these images again
            raise
