"""RLG pipelines: a diffusers SD / SDXL pipeline whose ``unet`` is an ``RLGUNet`` over base + aligned."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .unet import RLGError, RLGUNet

RLG_ADAPTER_NAME = "rlg_aligned"


def load_aligned_into(base_pipe, aligned: Union[str, Path, nn.Module]) -> Optional[nn.Module]:
    """Prepare the aligned model for ``base_pipe``: returns the full aligned UNet, or ``None`` for a LoRA.

    ``aligned`` is a UNet module (a different one = full aligned UNet; ``base_pipe.unet`` itself carrying LoRA
    adapters = LoRA), or a directory ``resolve_aligned`` understands. A LoRA directory is loaded into
    ``base_pipe.unet`` (shared, not copied) under the adapter name ``rlg_aligned``.
    """
    base_unet = base_pipe.unet.base if isinstance(base_pipe.unet, RLGUNet) else base_pipe.unet
    if isinstance(aligned, nn.Module):
        if aligned is base_unet:
            return None
        if (aligned.device, aligned.dtype) != (base_unet.device, base_unet.dtype):
            aligned = aligned.to(device=base_unet.device, dtype=base_unet.dtype)
        return aligned.eval()
    from t2ialign.models.pipeline import resolve_aligned

    kind, directory = resolve_aligned(aligned)
    if kind == "lora":
        from t2ialign.models.lora import is_lora_model

        if is_lora_model(base_unet):
            raise RLGError("the base pipeline's UNet already carries LoRA adapters (base = all adapters off would be "
                           "ambiguous); load a fresh base pipeline for each LoRA to guide with")
        base_pipe.load_lora_weights(str(directory), adapter_name=RLG_ADAPTER_NAME)
        return None
    from diffusers import UNet2DConditionModel

    # `dtype=` needs diffusers >= 0.40 (older ones ignore it and load fp32): the declared floor is above that,
    # and the explicit cast below keeps a half-precision base and its aligned UNet in one dtype regardless
    unet = UNet2DConditionModel.from_pretrained(directory, dtype=base_unet.dtype)
    return unet.to(base_unet.device, base_unet.dtype).eval()


def _with_unet(base_pipe, unet):
    """A new pipeline of the same class sharing every component but ``unet`` (no dtype cast, unlike ``from_pipe``)."""
    cls = type(base_pipe)
    expected_modules, optional_kwargs = cls._get_signature_keys(cls)
    components = base_pipe.components
    kwargs = {k: components[k] for k in expected_modules if k in components}
    kwargs.update({k: base_pipe.config[k] for k in optional_kwargs if k in base_pipe.config})
    kwargs["unet"] = unet
    pipe = cls(**kwargs)
    if "_name_or_path" in base_pipe.config:
        pipe.register_to_config(_name_or_path=base_pipe.config["_name_or_path"])
    return pipe


def make_rlg_pipeline(base_pipe, aligned: Union[str, Path, nn.Module], w: float = 1.0,
                      schedule: Optional[Sequence[float]] = None, batched: bool = True):
    """A pipeline of ``base_pipe``'s class sharing its components, with ``unet`` = ``RLGUNet(base, aligned)``.

    Call it like the base pipeline (``guidance_rescale`` must stay 0). ``pipe.unet.w`` can be changed between
    calls; ``schedule`` gives one ``w`` per inference step instead. For a LoRA the adapter lives in the shared
    base UNet: ``base_pipe`` itself then samples the adapted model (use the returned pipeline, or w=0, for the base).
    """
    if isinstance(base_pipe.unet, RLGUNet):
        raise RLGError("base_pipe already uses RL guidance; pass the plain base pipeline")
    tuned = load_aligned_into(base_pipe, aligned)
    rlg_unet = RLGUNet(base_pipe.unet, tuned, w=w, schedule=schedule, batched=batched)
    pipe = _with_unet(base_pipe, rlg_unet)
    pipe.set_progress_bar_config(**getattr(base_pipe, "_progress_bar_config", {}))
    rlg_unet.attach(pipe)
    return pipe


def rlg_pipeline(config, dtype=torch.float32, device="cpu", batched: bool = True):
    """``(pipe, extra_call_kwargs)`` for a ``SampleConfig`` with ``guide_with`` set (used by ``build_sampler``).

    The schedule (``config.rlg_schedule``, one ``w`` per step) is resolved inside the wrapper from the
    scheduler's timesteps, so ``extra_call_kwargs`` is empty.
    """
    from t2ialign.config import ConfigError
    from t2ialign.models.pipeline import load_pipeline

    if not config.guide_with:
        raise ConfigError("guide_with: RL guidance needs the aligned model (training export, UNet or LoRA directory)")
    schedule = config.rlg_schedule
    if schedule is not None and len(schedule) != config.num_inference_steps:
        raise ConfigError(f"rlg_schedule: {len(schedule)} values for num_inference_steps={config.num_inference_steps}; "
                          "give one scale per step")
    base = load_pipeline(config.pretrained, dtype=dtype, device=device, scheduler=config.scheduler)
    pipe = make_rlg_pipeline(base, config.guide_with, w=config.rlg_scale, schedule=schedule, batched=batched)
    return pipe, {}
