"""RLG pipelines: a diffusers pipeline whose denoiser is an RL-guidance wrapper over base + aligned.

SD / SDXL pipelines get an ``RLGUNet`` as ``unet``; the flow pipelines (``StableDiffusion3Pipeline``,
``FluxPipeline``) an ``RLGTransformer`` as ``transformer``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .denoiser import RLGDenoiser, RLGError
from .transformer import RLGTransformer
from .unet import RLGUNet

RLG_ADAPTER_NAME = "rlg_aligned"
WRAPPERS = {"unet": RLGUNet, "transformer": RLGTransformer}


def _denoiser(pipe) -> tuple[str, nn.Module]:
    from t2ialign.models.pipeline import denoiser_name

    name = denoiser_name(pipe)
    return name, getattr(pipe, name)


def _refuse_text_encoder_lora(pipe) -> None:
    """RLG's base is the denoiser with its adapters off; a LoRA that also adapts a text encoder would leave the
    base's conditioning adapted (w = 0 would not be the base model)."""
    from t2ialign.models.lora import is_lora_model

    for name, module in pipe.components.items():
        if name.startswith("text_encoder") and isinstance(module, nn.Module) and is_lora_model(module):
            raise RLGError(f"the LoRA also adapts {name}; RL guidance supports LoRAs on the {_denoiser(pipe)[0]} only")


def load_aligned_into(base_pipe, aligned: Union[str, Path, nn.Module]) -> Optional[nn.Module]:
    """Prepare the aligned model for ``base_pipe``: returns the full aligned denoiser, or ``None`` for a LoRA.

    ``aligned`` is a UNet / transformer module (a different one = full aligned model; the base pipeline's own
    denoiser carrying LoRA adapters = LoRA), or a directory ``resolve_aligned`` understands. A LoRA directory is
    loaded into the base pipeline's denoiser (shared, not copied) under the adapter name ``rlg_aligned``.
    """
    name, base = _denoiser(base_pipe)
    if isinstance(base, RLGDenoiser):
        base = base.base
    if isinstance(aligned, nn.Module):
        return None if aligned is base else _like(aligned, base).eval()
    from t2ialign.models.pipeline import check_same_family, denoiser_class, resolve_aligned

    kind, directory = resolve_aligned(aligned)
    check_same_family(base_pipe, aligned)
    if kind == "lora":
        from t2ialign.models.lora import is_lora_model

        if is_lora_model(base):
            raise RLGError(f"the base pipeline's {name} already carries LoRA adapters (base = all adapters off would "
                           "be ambiguous); load a fresh base pipeline for each LoRA to guide with")
        from t2ialign.models.lora import quiet_text_encoder_notice

        with quiet_text_encoder_notice():
            base_pipe.load_lora_weights(str(directory), adapter_name=RLG_ADAPTER_NAME)
        if not is_lora_model(base):
            raise RLGError(f"the LoRA in {directory} adapts no layer of {type(base_pipe).__name__}'s {name}: guide a base "
                           "pipeline with a LoRA trained on it")
        _refuse_text_encoder_lora(base_pipe)
        return None
    cls, base_cls = denoiser_class(directory), type(getattr(base, "_orig_mod", base))  # (under torch.compile)
    if kind != name or cls is not base_cls:
        raise RLGError(f"the aligned model {aligned} is a {cls.__name__}, but {type(base_pipe).__name__} samples with a "
                       f"{base_cls.__name__}: guide a base pipeline with an aligned model of the same family")
    # `dtype=` needs diffusers >= 0.40 (older ones ignore it and load fp32): the declared floor is above that,
    # and the explicit cast below keeps a half-precision base and its aligned model in one dtype regardless
    return _like(cls.from_pretrained(directory, dtype=base.dtype), base).eval()


def _like(model: nn.Module, base: nn.Module) -> nn.Module:
    """``model`` on the base's device and in its dtype (no ``.to`` when it already is: diffusers warns on any
    dtype cast of a transformer with fp32-kept modules)."""
    if (model.device, model.dtype) != (base.device, base.dtype):
        model = model.to(device=base.device, dtype=base.dtype)
    return model


def _with_denoiser(base_pipe, name: str, denoiser):
    """A new pipeline of the same class sharing every component but the denoiser (no dtype cast, unlike ``from_pipe``)."""
    cls = type(base_pipe)
    expected_modules, optional_kwargs = cls._get_signature_keys(cls)
    components = base_pipe.components
    kwargs = {k: components[k] for k in expected_modules if k in components}
    kwargs.update({k: base_pipe.config[k] for k in optional_kwargs if k in base_pipe.config})
    kwargs[name] = denoiser
    pipe = cls(**kwargs)
    if "_name_or_path" in base_pipe.config:
        pipe.register_to_config(_name_or_path=base_pipe.config["_name_or_path"])
    return pipe


def make_rlg_pipeline(base_pipe, aligned: Union[str, Path, nn.Module], w: float = 1.0,
                      schedule: Optional[Sequence[float]] = None, batched: bool = True):
    """A pipeline of ``base_pipe``'s class sharing its components, with the denoiser (``unet`` for SD / SDXL,
    ``transformer`` for SD3 / FLUX) replaced by the RL-guidance wrapper over base and aligned.

    Call it like the base pipeline (``guidance_rescale`` must stay 0). ``pipe.unet.w`` / ``pipe.transformer.w``
    can be changed between calls; ``schedule`` gives one ``w`` per inference step instead. For a LoRA the adapter
    lives in the shared base denoiser: ``base_pipe`` itself then samples the adapted model (use the returned
    pipeline, or w=0, for the base).
    """
    name, base = _denoiser(base_pipe)
    if isinstance(base, RLGDenoiser):
        raise RLGError("base_pipe already uses RL guidance; pass the plain base pipeline")
    tuned = load_aligned_into(base_pipe, aligned)
    wrapper = WRAPPERS[name](base, tuned, w=w, schedule=schedule, batched=batched)
    pipe = _with_denoiser(base_pipe, name, wrapper)
    pipe.set_progress_bar_config(**getattr(base_pipe, "_progress_bar_config", {}))
    wrapper.attach(pipe)
    return pipe


def rlg_pipeline(config, dtype=torch.float32, device="cpu", batched: bool = True):
    """``(pipe, extra_call_kwargs)`` for a ``SampleConfig`` with ``guide_with`` set (used by ``build_sampler``).

    The schedule (``config.rlg_schedule``, one ``w`` per step) is resolved inside the wrapper from the
    scheduler's timesteps, so ``extra_call_kwargs`` is empty.
    """
    from t2ialign.config import ConfigError
    from t2ialign.models.pipeline import load_pipeline

    if not config.guide_with:
        raise ConfigError("guide_with: RL guidance needs the aligned model (training export, UNet, transformer or "
                          "LoRA directory)")
    schedule = config.rlg_schedule
    if schedule is not None and len(schedule) != config.num_inference_steps:
        raise ConfigError(f"rlg_schedule: {len(schedule)} values for num_inference_steps={config.num_inference_steps}; "
                          "give one scale per step")
    base = load_pipeline(config.pretrained, dtype=dtype, device=device, scheduler=config.scheduler)
    pipe = make_rlg_pipeline(base, config.guide_with, w=config.rlg_scale, schedule=schedule, batched=batched)
    return pipe, {}
