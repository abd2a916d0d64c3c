"""Inference pipelines: a base model (SD / SDXL UNet, SD3 / FLUX transformer), optionally with an aligned full
denoiser or a LoRA on top."""
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
    """An aligned model is a training export (``final/`` or ``export/``), a denoiser directory or a LoRA directory.

    Returns ("unet" | "transformer" | "lora", directory to load): "unet" for the UNet families (SD / SDXL),
    "transformer" for the flow families (SD3 / FLUX; a training export's ``transformer/``), "lora" for a
    ``pytorch_lora_weights.safetensors`` written by the pipeline class's ``save_lora_weights`` (either family).
    A hub id (``mhdang/dpo-sdxl-text2image-v1``, the released Diffusion-DPO UNet) that is not a local directory
    is downloaded first (its UNet / transformer / LoRA files only).
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
        return _denoiser_kind(path), path
    for kind in DENOISERS:
        if (path / kind / "config.json").is_file():
            return kind, path / kind
    raise ModelNotFoundError(
        f"{path} is not an aligned model: expected a training export (with export.json), a diffusers UNet or "
        "transformer directory (config.json + weights) or a LoRA directory (pytorch_lora_weights.safetensors)"
    )


DENOISERS = ("unet", "transformer")  # the pipeline attribute holding the denoiser: UNet families, flow families


def _denoiser_kind(directory: Path) -> str:
    """"transformer" for a diffusers transformer's config.json (SD3Transformer2DModel, FluxTransformer2DModel), else "unet"."""
    class_name = json.loads((directory / "config.json").read_text()).get("_class_name", "")
    return "transformer" if "Transformer" in class_name else "unet"


def denoiser_class(directory: Path):
    """The diffusers model class a denoiser directory was saved from (its config.json ``_class_name``)."""
    import diffusers

    # diffusers always writes _class_name; a config without one is taken for a UNet, as before flow models
    class_name = json.loads((Path(directory) / "config.json").read_text()).get("_class_name") or "UNet2DConditionModel"
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelNotFoundError(f"{directory}/config.json names no diffusers model class ({class_name!r})")
    return cls


def check_same_family(pipe, aligned) -> None:
    """Refuse an aligned training export of another model family than ``pipe`` (its export.json ``family``): an SD3
    LoRA loads partly into FLUX's same-named attention layers, and would sample a meaningless model."""
    from t2ialign.errors import UserFacingError
    from t2ialign.models.loading import pipeline_family

    manifest = Path(aligned) / "export.json"
    family = json.loads(manifest.read_text()).get("family") if manifest.is_file() else None
    if family is None:  # a bare UNet / transformer / LoRA directory, or an export written before families
        return
    base = pipeline_family({**pipe.config, "_class_name": type(pipe).__name__}, type(pipe).__name__)
    if family != base:
        raise UserFacingError(f"the aligned model {aligned} was trained on a {family} model, but the base pipeline "
                              f"{type(pipe).__name__} is {base}: pair an aligned model with its own base model")


def denoiser_name(pipe) -> str:
    """``"unet"`` or ``"transformer"``: the attribute of ``pipe`` holding its denoiser."""
    for name in DENOISERS:
        if getattr(pipe, name, None) is not None:
            return name
    raise ModelNotFoundError(f"{type(pipe).__name__} has neither a unet nor a transformer to sample with")


def pipeline_denoiser(pipe):
    """The UNet (SD / SDXL) or transformer (SD3 / FLUX) of ``pipe`` (an RL-guidance wrapper when there is one)."""
    return getattr(pipe, denoiser_name(pipe))


ALIGNED_FILES = ["export.json", "*.json", "*.safetensors", "unet/*.json", "unet/*.safetensors",
                 "transformer/*.json", "transformer/*.safetensors", "lora/*"]


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
    """A diffusers text-to-image pipeline for ``pretrained``; ``aligned`` swaps in a UNet / transformer or loads a LoRA."""
    # offline and not cached: fail before the diffusers import (seconds) and before any weights load
    require_cached(pretrained, "base pipeline", BASE_FLAG, filename="model_index.json")
    from diffusers import DiffusionPipeline

    kwargs = {"dtype": dtype, "local_files_only": local_only()}  # dtype: diffusers >= 0.40 name (not torch_dtype)
    kind = None
    if aligned is not None:
        kind, aligned_dir = resolve_aligned(aligned)
        if kind in DENOISERS:
            kwargs[kind] = denoiser_class(aligned_dir).from_pretrained(aligned_dir, dtype=dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(pretrained, **kwargs)
    except (OSError, EnvironmentError) as exc:
        fix = "Fix: pass a diffusers pipeline directory" if Path(pretrained).exists() else fix_hint(pretrained, BASE_FLAG)
        raise ModelNotFoundError(
            f"could not load the pipeline '{pretrained}': {offline_note()}{type(exc).__name__}. {fix}"
        ) from None
    if kind in DENOISERS and getattr(pipe, kind, None) is not kwargs[kind]:
        raise ModelNotFoundError(f"the aligned model {aligned} is a {kind}, but {type(pipe).__name__} ({pretrained}) "
                                 f"samples with a {denoiser_name(pipe)}: pair an aligned model with its own base")
    if kind is not None:
        check_same_family(pipe, aligned)
    if kind == "lora":
        from t2ialign.models.lora import quiet_text_encoder_notice

        with quiet_text_encoder_notice():
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
