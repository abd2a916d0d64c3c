"""Preference pairs from the base toy model, labelled by a programmatic preference, in Pick-a-Pic v2 form.

For each prompt the base pipeline draws two images from different noise; the chosen preference
labels the pair (optionally with Bradley-Terry noise and ties), and the world's captioner describes
each image as it actually came out (``caption_0`` / ``caption_1``, what DCPO conditions on). The rows
carry the Pick-a-Pic v2 columns (``docs/DATA.md``) so the ordinary data loader reads them, plus
``reward_0`` / ``reward_1`` for inspection. The base is either toy pipeline: the SDXL-structured one
(``toy.pretrain``) or the rectified-flow SD3 one (``toy.flow_pretrain``), sampled by its own diffusers class.
"""
from __future__ import annotations

import io
import json
import logging
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from t2ialign.toy import world
from t2ialign.toy.preferences import DEFAULT_PREFERENCE, get_preference, label_pairs

logger = logging.getLogger(__name__)

BASE_MODEL_NAME = "toy-base"
FLOW_BASE_MODEL_NAME = "toy-sd3-base"
PARQUET_NAME = "train.parquet"
DISK_DIR_NAME = "hf_dataset"
INFO_NAME = "pairs_info.json"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0


def load_toy_pipeline(base: Optional[str | Path] = None):
    """The base toy pipeline on CPU (the SDXL toy, pretrained and cached on first use, when ``base`` is None).

    Any toy base directory: the SDXL one (``toy.pretrain``) or the SD3 one (``toy.flow_pretrain``); its
    model_index.json names the pipeline class."""
    from diffusers import DiffusionPipeline

    from t2ialign.toy.pretrain import get_toy_pipeline

    directory = Path(base) if base is not None else get_toy_pipeline()
    pipeline = DiffusionPipeline.from_pretrained(directory)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def is_flow_pipeline(pipeline) -> bool:
    """Whether ``pipeline`` is a rectified-flow toy base (a transformer instead of a UNet)."""
    return getattr(pipeline, "transformer", None) is not None


def toy_call_kwargs(pipeline) -> dict:
    """Extra ``__call__`` arguments of a toy pipeline: the SD3 toy reads ``flow_pretrain.T5_LENGTH`` T5 tokens
    (trained so; the pipeline's default 256 would condition it on padding it never saw)."""
    if not is_flow_pipeline(pipeline):
        return {}
    from t2ialign.toy.flow_pretrain import T5_LENGTH

    return {"max_sequence_length": T5_LENGTH}


def base_model_name(base: Optional[str | Path]) -> str:
    """The pairs' ``model_0`` / ``model_1``: which toy base drew them."""
    if base is None or not (Path(base) / "model_index.json").is_file():
        return BASE_MODEL_NAME
    class_name = json.loads((Path(base) / "model_index.json").read_text()).get("_class_name")
    return FLOW_BASE_MODEL_NAME if class_name == "StableDiffusion3Pipeline" else BASE_MODEL_NAME


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one sampling batch: a function of the run's seed and the batch's position only."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def prompt_batches(num_prompts: int, images_per_prompt: int = 2, batch_size: int = 256) -> list[slice]:
    """The prompt ranges ``sample_toy_images`` samples together, in order."""
    per_batch = max(1, batch_size // images_per_prompt)
    return [slice(start, min(start + per_batch, num_prompts)) for start in range(0, num_prompts, per_batch)]


@torch.no_grad()
def sample_toy_images(
    pipeline,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    images_per_prompt: int = 1,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 256,
    batches: Optional[Sequence[int]] = None,
) -> Tensor:
    """Images ``(len(prompts) * images_per_prompt, 3, H, W)`` in [0, 1], prompt-major order.

    Each batch has its own generator seeded from ``(seed, batch index)``, so the result is a function of
    the seed and the batch size (not of wall time or thread count), and ``batches`` (indices into
    ``prompt_batches``) samples any subset: split across processes, the batches concatenate to the
    same bytes one process draws.
    """
    prompts = list(prompts)
    ranges = prompt_batches(len(prompts), images_per_prompt, batch_size)
    chunks = []
    for index in batches if batches is not None else range(len(ranges)):
        output = pipeline(
            prompt=prompts[ranges[index]],
            num_images_per_prompt=images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(batch_seed(seed, index)),
            output_type="pt",
            **toy_call_kwargs(pipeline),
        )
        # contiguous: the pipeline returns channels-last tensors, and a reward's reductions over another memory
        # layout (e.g. the copy another process sends back) can differ in the last bit
        chunks.append(output.images.float().clamp(0, 1).cpu().contiguous())
    return torch.cat(chunks)


def image_bytes(image: Tensor, image_format: str = "png") -> bytes:
    """Encode one ``(3, H, W)`` [0, 1] image; PNG keeps colours exact, JPEG is what Pick-a-Pic ships."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    if image_format.lower() in ("jpg", "jpeg"):
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    elif image_format.lower() == "png":
        Image.fromarray(array).save(buffer, format="PNG")
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    return buffer.getvalue()


def _pickapic_rows(
    captions: Sequence[str],
    images_0: Tensor,
    images_1: Tensor,
    labels: Tensor,
    rewards: tuple[Tensor, Tensor],
    image_format: str,
    seed: int,
    model_name: str = BASE_MODEL_NAME,
) -> dict[str, list]:
    """Column-major rows in the Pick-a-Pic v2 schema (+ DCPO captions, + rewards)."""
    ids = np.random.default_rng(seed)
    uid = lambda: str(uuid.UUID(bytes=ids.bytes(16), version=4))  # noqa: E731 - seeded, reproducible uids
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    columns: dict[str, list] = {name: [] for name in (
        "are_different", "best_image_uid", "caption", "created_at", "has_label", "image_0_uid", "image_0_url",
        "image_1_uid", "image_1_url", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1",
        "ranking_id", "user_id", "num_example_per_prompt", "caption_0", "caption_1", "reward_0", "reward_1",
    )}
    described_0, described_1 = world.describe(images_0), world.describe(images_1)
    for i, caption in enumerate(captions):
        uid_0, uid_1, label_0 = uid(), uid(), float(labels[i])
        best = uid_0 if label_0 == 1.0 else uid_1 if label_0 == 0.0 else ""
        row = {
            "are_different": True, "best_image_uid": best, "caption": caption,
            "created_at": start + timedelta(seconds=i), "has_label": True,
            "image_0_uid": uid_0, "image_0_url": "", "image_1_uid": uid_1, "image_1_url": "",
            "jpg_0": image_bytes(images_0[i], image_format), "jpg_1": image_bytes(images_1[i], image_format),
            "label_0": label_0, "label_1": 1.0 - label_0, "model_0": model_name, "model_1": model_name,
            "ranking_id": i, "user_id": 0, "num_example_per_prompt": 1,
            "caption_0": described_0[i], "caption_1": described_1[i],
            "reward_0": float(rewards[0][i]), "reward_1": float(rewards[1][i]),
        }
        for name, value in row.items():
            columns[name].append(value)
    return columns


def _summary(preference: str, labels: Tensor, rewards_0: Tensor, rewards_1: Tensor, settings: dict) -> dict:
    rewards = torch.cat([rewards_0, rewards_1])
    decided = labels != 0.5
    agree = ((rewards_0 > rewards_1) == (labels == 1.0))[decided & (rewards_0 != rewards_1)]
    return {
        **settings,
        "preference": preference,
        "num_pairs": len(labels),
        "ties": int((~decided).sum()),
        "label_0_share": float((labels == 1.0).float().mean()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "mean_abs_reward_gap": float((rewards_0 - rewards_1).abs().mean()),
        "labels_agreeing_with_reward": float(agree.float().mean()) if agree.numel() else None,
    }


def build_preference_pairs(
    base: Optional[str | Path] = None,
    out_dir: str | Path = "toy_pairs",
    *,
    preference: str = DEFAULT_PREFERENCE,
    num_pairs: int = 512,
    prompts: Optional[Sequence[str]] = None,
    label_noise: float = 0.0,
    tie_margin: float = 0.0,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    image_format: str = "png",
    save_to_disk: bool = False,
    batch_size: int = 256,
    images: Optional[Tensor] = None,
) -> Path:
    """Sample pairs from the toy pipeline at ``base`` (default: the cached SDXL toy; an SD3 toy base from
    ``toy.flow_pretrain`` works alike), label, write them.

    Returns the path of ``out_dir/train.parquet`` (``datasets.load_dataset("parquet", data_files=...)``
    reads it); ``out_dir`` also gets ``pairs_info.json`` (settings, label statistics) and, with
    ``save_to_disk``, ``hf_dataset/`` for ``datasets.load_from_disk``. ``prompts`` defaults to
    ``num_pairs`` random world captions drawn with ``seed``; ``label_noise`` is the Bradley-Terry
    temperature and ``tie_margin`` the tie band, both in units of the preference's ``scale``.
    ``images``: the pairs' images already sampled (``sample_toy_images(..., images_per_prompt=2)`` with these
    settings, e.g. batch by batch in several processes); None samples them here.
    """
    import datasets

    chosen = get_preference(preference)  # fail on a bad name before any sampling
    prompts = list(prompts) if prompts is not None else world.sample_captions(num_pairs, seed=seed)
    if images is None:
        images = sample_toy_images(
            load_toy_pipeline(base), prompts, seed=seed, images_per_prompt=2, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, batch_size=batch_size,
        )
    if len(images) != 2 * len(prompts):
        raise ValueError(f"images: expected {2 * len(prompts)} (two per prompt), got {len(images)}")
    images_0, images_1 = images[0::2], images[1::2]
    generator = torch.Generator().manual_seed(seed + 1)
    rewards_0, rewards_1, labels = label_pairs(
        chosen, images_0, images_1, prompts, temperature=label_noise, tie_margin=tie_margin, generator=generator
    )
    columns = _pickapic_rows(prompts, images_0, images_1, labels, (rewards_0, rewards_1), image_format, seed,
                             base_model_name(base))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_dict(columns)
    parquet_path = out_dir / PARQUET_NAME
    dataset.to_parquet(str(parquet_path))
    if save_to_disk:
        dataset.save_to_disk(str(out_dir / DISK_DIR_NAME))
    settings = {
        "base": str(base) if base is not None else "cached toy base", "seed": seed, "label_noise": label_noise,
        "tie_margin": tie_margin, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
    }
    summary = _summary(preference, labels, rewards_0, rewards_1, settings)
    (out_dir / INFO_NAME).write_text(json.dumps(summary, indent=2))
    logger.info("wrote %d %s pairs to %s (%d ties)", len(prompts), preference, parquet_path, summary["ties"])
    return parquet_path
