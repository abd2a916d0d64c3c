"""``sample(config)``: images for a prompt set with a fixed seed per (prompt, image), resumable.

Output folder layout (read by ``t2ialign score`` / ``eval``):
  images/00000_0.png ...   one PNG per (prompt index, image index)
  metadata.jsonl           one row per image: prompt, prompt_index, image_index, seed, file, category
  sample_config.json       what produced them
The initial latents of image k of prompt i come from ``seed + i * num_images_per_prompt + k`` alone,
so two models sampled with the same config start from identical noise (the papers' protocol).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

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
    """Per-image noise drawn on the CPU from its own seed: identical across models, devices and batch sizes."""
    channels = pipe.unet.config.in_channels
    shape = (channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


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

    dtype = DTYPES[config.dtype] if device != "cpu" else torch.float32
    if config.guide_with:
        from t2ialign.guidance import rlg_pipeline

        pipe, extra = rlg_pipeline(config, dtype=dtype, device=device)
    else:
        pipe, extra = load_pipeline(config.pretrained, aligned=config.aligned, dtype=dtype, device=device,
                                    scheduler=config.scheduler), {}
    _apply_speed_levers(config, pipe)
    return pipe, extra


def _apply_speed_levers(config: SampleConfig, pipe) -> None:
    """compile / channels-last on the UNets inside the pipeline (with RL guidance: the base and the aligned one)."""
    if not (config.compile or config.channels_last):
        return
    from t2ialign.models.speed import apply_speed_settings

    unet = pipe.unet
    unets = [getattr(unet, "base", unet)]
    tuned = getattr(unet, "tuned", None)
    if tuned is not None and tuned is not unets[0]:
        unets.append(tuned)
    apply_speed_settings(config, *unets)


def sample(config: SampleConfig, records=None) -> Path:
    """Sample ``config.prompts`` (or the given prompt records) into ``config.output_dir``; returns it."""
    from t2ialign.evaluation.prompts import load_prompt_set

    records = records if records is not None else load_prompt_set(config.prompts, limit=config.limit)
    output_dir = Path(config.output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    (output_dir / "sample_config.json").write_text(json.dumps(asdict(config), indent=2))
    jobs = _jobs(config, records, _done_files(output_dir))
    if not jobs:
        return output_dir
    device = pick_device(config.device)
    pipe, extra = build_sampler(config, device)
    size = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    bar = tqdm(total=len(jobs), desc=f"sampling {output_dir.name}", unit="img", disable=not config.progress_bar)
    with open(output_dir / "metadata.jsonl", "a") as meta:
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start : start + config.batch_size]
            seeds = [job["seed"] for job in batch]
            latents = initial_latents(pipe, seeds, size, size).to(device, pipe.unet.dtype)
            images = pipe(
                prompt=[job["prompt"] for job in batch], latents=latents, height=size, width=size,
                num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s + 1) for s in seeds], **extra,
            ).images
            for job, image in zip(batch, images):
                _save_atomic(image, output_dir / job["file"])
                meta.write(json.dumps(job) + "\n")
            meta.flush()
            bar.update(len(batch))
    bar.close()
    return output_dir


def _save_atomic(image, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
