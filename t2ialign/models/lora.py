"""LoRA adapters on the UNet through peft and diffusers' own PEFT integration.

The DPO reference for a LoRA run is the same UNet with its adapters switched off
(``adapters_disabled``), so no second UNet is held in memory. LoRA B matrices start at zero, so at
initialisation policy == reference exactly (the Diffusion-DPO self-check ``loss = ln 2`` holds).
Exports use the diffusers LoRA format, readable by ``pipeline.load_lora_weights(dir)``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_CONFIG_NAME = "lora_config.json"
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def _unwrap(model):
    """The bare model under an accelerate / DDP / torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def add_lora(
    unet,
    *,
    rank: int = 8,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    adapter_name: str = "default",
    init_lora_weights="gaussian",
) -> list:
    """Attach a LoRA adapter, freeze everything else, and return the trainable (LoRA) parameters.

    ``init_lora_weights="gaussian"`` (the diffusers training scripts' choice) draws A from a Gaussian
    and sets B = 0; ``True`` is peft's Kaiming-uniform A, also with B = 0.
    """
    unet = _unwrap(unet)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
        target_modules=list(target_modules),
    )
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=adapter_name)
    trainable = []
    for name, parameter in unet.named_parameters():
        is_lora = "lora_" in name and f".{adapter_name}." in f"{name}."
        parameter.requires_grad_(is_lora)
        if is_lora:
            trainable.append(parameter)
    if not trainable:
        raise ValueError(f"LoRA target modules {list(target_modules)} matched no layer of the UNet")
    return trainable


def _lora_layers(unet) -> list[BaseTunerLayer]:
    return [module for module in _unwrap(unet).modules() if isinstance(module, BaseTunerLayer)]


def is_lora_model(unet) -> bool:
    return bool(_lora_layers(unet))


@contextlib.contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """Inside, the UNet computes its base (reference) model; the previous state is restored on exit."""
    model = _unwrap(unet)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("adapters_disabled() needs a UNet with LoRA adapters (see add_lora)")
    were_enabled = not all(layer.disable_adapters for layer in layers)
    model.disable_adapters()
    try:
        yield
    finally:
        if were_enabled:
            model.enable_adapters()


def _pipeline_class(is_sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline


def lora_config_summary(unet, adapter_name: str = "default") -> dict:
    config = _unwrap(unet).peft_config[adapter_name]
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
        "adapter_name": adapter_name,
    }


def save_lora_weights(unet, output_dir, is_sdxl: bool, adapter_name: str = "default") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format) and ``lora_config.json`` beside it.

    Returns the directory, which is what ``pipeline.load_lora_weights`` takes.
    """
    model = _unwrap(unet)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=adapter_name))
    # The adapter metadata carries lora_alpha, so loaders do not silently fall back to alpha = rank.
    metadata = model.peft_config[adapter_name].to_dict()
    _pipeline_class(is_sdxl).save_lora_weights(
        output_dir,
        unet_lora_layers=state_dict,
        unet_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHTS_NAME,
        safe_serialization=True,
    )
    (output_dir / LORA_CONFIG_NAME).write_text(json.dumps(lora_config_summary(model, adapter_name), indent=2))
    return output_dir
