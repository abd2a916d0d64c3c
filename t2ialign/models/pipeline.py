"""Inference pipelines: a base model, optionally with an aligned full UNet or a LoRA on top."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from t2ialign.errors import ModelNotFoundError
from t2ialign.hub import fix_hint, local_only, offline_note, require_cached

# where the sample command takes each model (named in the fix of a "not found" error)
BASE_FLAG = "pass --model DIR (pretrained: DIR in a sample config)"
ALIGNED_FLAG = "pass --aligned DIR or --guide-with DIR"


def resolve_aligned(path: str | Path) -> tuple[str, Path]:
    """An aligned model is a training export (``final/``), a ``unet`` directory or a LoRA directory.

    Returns ("unet" | "lora", directory to load). A hub id (``mhdang/dpo-sdxl-text2image-v1``, the released
    Diffusion-DPO UNet) that is not a local directory is downloaded first (its UNet / LoRA files only).
    """
    path = Path(path)
    if not path.exists() and _looks_like_hub_id(str(path)):
        path = _download_aligned(str(path))
    manifest = path / "export.json"
    if manifest.is_file():
        kind = json.loads(manifest.read_text())["kind"]
        return kind, path / kind
    if (path / "pytorch_lora_weights.safetensors").is_file():
        return "lora", path
    if (path / "config.json").is_file():
        return "unet", path
    if (path / "unet" / "config.json").is_file():
        return "unet", path / "unet"
    raise ModelNotFoundError(
        f"{path} is not an aligned model: expected a training export (with export.json), a diffusers UNet "
        "directory (config.json + weights) or a LoRA directory (pytorch_lora_weights.safetensors)"
    )


ALIGNED_FILES = ["export.json", "*.json", "*.safetensors", "unet/*.json", "unet/*.safetensors", "lora/*"]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _download_aligned(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    require_cached(repo_id, "aligned model", ALIGNED_FLAG)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALIGNED_FILES, local_files_only=local_only()))
    except Exception as exc:  # offline, unknown repo, gated
        raise ModelNotFoundError(
            f"aligned model {repo_id!r}: {offline_note()}not a local directory and not downloadable from the hub "
            f"({type(exc).__name__}). {fix_hint(repo_id, ALIGNED_FLAG)}"
        ) from None


def load_pipeline(pretrained: str, *, aligned: Optional[str] = None, dtype=torch.float32, device="cpu", scheduler: Optional[str] = None):
    """A diffusers text-to-image pipeline for ``pretrained``; ``aligned`` swaps in a UNet or loads a LoRA."""
    # offline and not cached: fail before the diffusers import (seconds) and before any weights load
    require_cached(pretrained, "base pipeline", BASE_FLAG, filename="model_index.json")
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    kwargs = {"dtype": dtype, "local_files_only": local_only()}  # dtype: diffusers >= 0.40 name (not torch_dtype)
    kind = None
    if aligned is not None:
        kind, aligned_dir = resolve_aligned(aligned)
        if kind == "unet":
            kwargs["unet"] = UNet2DConditionModel.from_pretrained(aligned_dir, dtype=dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(pretrained, **kwargs)
    except (OSError, EnvironmentError) as exc:
        fix = "Fix: pass a diffusers pipeline directory" if Path(pretrained).exists() else fix_hint(pretrained, BASE_FLAG)
        raise ModelNotFoundError(
            f"could not load the pipeline '{pretrained}': {offline_note()}{type(exc).__name__}. {fix}"
        ) from None
    if kind == "lora":
        pipe.load_lora_weights(str(aligned_dir))
    if scheduler:
        pipe.scheduler = _scheduler_by_name(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _scheduler_by_name(name: str, config):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ModelNotFoundError(f"unknown scheduler '{name}'; give a diffusers class name such as EulerDiscreteScheduler or DDIMScheduler")
    return cls.from_config(config)
