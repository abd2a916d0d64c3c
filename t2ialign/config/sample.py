"""``SampleConfig`` (``t2ialign sample`` / ``sweep`` / ``eval``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from t2ialign.config.parsing import ConfigError, _check_choice, apply_overrides, from_dict, load_yaml

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class SampleConfig:
    """``t2ialign sample``: images for a prompt set, identical initial latents across models."""

    # the base pipeline (hub id or directory); the CLI (sample, sweep) requires --model or pretrained in --config,
    # so this default serves only the Python API
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"
    aligned: Optional[str] = None  # a training export, UNet or LoRA directory: sample this model instead of the base
    guide_with: Optional[str] = None  # RL guidance: mix the base with this aligned model at scale rlg_scale
    rlg_scale: float = 1.0
    rlg_schedule: Optional[list] = None  # optional per-step scales (length num_inference_steps) overriding rlg_scale
    prompts: str = "partiprompts"  # a prompt-set name, or a .txt/.tsv/.jsonl file
    limit: Optional[int] = None  # first N prompts only
    output_dir: str = "samples/base"
    num_images_per_prompt: int = 1
    seed: int = 0
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    resolution: Optional[int] = None  # default: the model's native size
    batch_size: int = 4
    dtype: str = "fp16"  # fp32 | fp16 | bf16 (fp32 on CPU)
    device: str = "auto"
    scheduler: Optional[str] = None  # a diffusers scheduler class name, e.g. DDIMScheduler
    progress_bar: bool = True
    # speed levers (t2ialign.models.speed), applied to every UNet the sampler runs (both RLG models)
    compile: bool = False
    compile_mode: Optional[str] = None  # None (Inductor default) | reduce-overhead (CUDA graphs) | max-autotune
    compile_cache_dir: Optional[str] = None
    channels_last: bool = False
    # T5 tokens of a flow pipeline's prompts (SD3 / FLUX); None: the pipeline's default (SD3 256, FLUX 512). Sample with
    # the length the model was trained with (a training run's flow.max_sequence_length)
    max_sequence_length: Optional[int] = None


def load_sample_config(path=None, overrides=None, data=None) -> SampleConfig:
    raw = dict(data or {})
    if path is not None:
        raw = load_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    config = from_dict(SampleConfig, raw)
    _check_choice(config, "dtype", ("fp32", "fp16", "bf16"))
    if config.compile_mode is not None:
        _check_choice(config, "compile_mode", COMPILE_MODES)
    if config.max_sequence_length is not None and not 0 < config.max_sequence_length <= 512:
        raise ConfigError(f"max_sequence_length: T5 tokens in (0, 512] (or null for the pipeline's default), "
                          f"got {config.max_sequence_length}")
    for key in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {getattr(config, key)}")
    if config.aligned and config.guide_with:
        raise ConfigError("aligned and guide_with: give one; guide_with samples the base mixed with the aligned model by rlg_scale")
    return config
