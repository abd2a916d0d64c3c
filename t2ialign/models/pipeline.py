"""Inference pipelines: a base model, optionally with an aligned full UNet or a LoRA on top."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from t2ialign.errors import ModelNotFoundError
from t2ialign.hub import download_hint


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

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALIGNED_FILES))
    except Exception as exc:  # offline, unknown repo, gated
        raise ModelNotFoundError(
            f"aligned model {repo_id!r}: not a local directory and not downloadable from the hub ({type(exc).__name__}); "
            f"download it first ({download_hint(repo_id)}) and pass DIR"
        ) from None


def load_pipeline(pretrained: str, *, aligned: Optional[str] = None, dtype=torch.float32, device="cpu", scheduler: Optional[str] = None):
    """A diffusers text-to-image pipeline for ``pretrained``; ``aligned`` swaps in a UNet or loads a LoRA."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    kwargs = {"dtype": dtype}  # diffusers >= 0.40 name (torch_dtype is deprecated)
    kind = None
    if aligned is not None:
        kind, aligned_dir = resolve_aligned(aligned)
        if kind == "unet":
            kwargs["unet"] = UNet2DConditionModel.from_pretrained(aligned_dir, dtype=dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(pretrained, **kwargs)
    except (OSError, EnvironmentError) as exc:
        raise ModelNotFoundError(
            f"could not load the pipeline '{pretrained}' ({type(exc).__name__}). Pass a local diffusers directory, "
            f"or download it first: {download_hint(pretrained)}"
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
