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


def save_transformer_lora_weights(transformer, output_dir, family: str, adapter_name: str = "default") -> Path:
    """A flow transformer's adapter (SD3 / FLUX) through its pipeline class's ``save_lora_weights``: the file
    ``StableDiffusion3Pipeline.load_lora_weights`` / ``FluxPipeline.load_lora_weights`` read (keys ``transformer.*``,
    adapter metadata with lora_alpha in the header)."""
    from t2ialign.models.flow_text import flow_pipeline_class

    model = _unwrap(transformer)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    flow_pipeline_class(family).save_lora_weights(
        output_dir,
        transformer_lora_layers=get_peft_model_state_dict(model, adapter_name=adapter_name),
        transformer_lora_adapter_metadata=model.peft_config[adapter_name].to_dict(),
        weight_name=LORA_WEIGHTS_NAME,
        safe_serialization=True,
    )
    (output_dir / LORA_CONFIG_NAME).write_text(json.dumps(lora_config_summary(model, adapter_name), indent=2))
    return output_dir


@contextlib.contextmanager
def quiet_text_encoder_notice():
    """``load_lora_weights`` of an SD3 / FLUX pipeline warns once per text encoder that a transformer-only LoRA
    (every t2ialign export) has no keys for it; that is expected, so the notice is held back while loading."""
    import logging

    lora_logger = logging.getLogger("diffusers.loaders.lora_base")
    level = lora_logger.level
    lora_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lora_logger.setLevel(level)


# ---------------------------------------------------------------- kohya / A1111 / ComfyUI format

KOHYA_SUFFIX = "_kohya.safetensors"


def _adapter_metadata(metadata: Optional[dict], config_file: Path) -> dict:
    """``{'r', 'lora_alpha', 'use_rslora', 'rank_pattern', 'alpha_pattern'}`` of the UNet adapter: from the
    safetensors header diffusers writes (``lora_adapter_metadata``), else ``lora_config.json`` beside the file."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        entries = json.loads(raw)
        return {key.split(".", 1)[1]: value for key, value in entries.items() if key.startswith("unet.")}
    if config_file.is_file():
        summary = json.loads(config_file.read_text())
        return {"r": summary.get("rank"), "lora_alpha": summary.get("alpha")}
    return {}


def kohya_state_dict(state_dict: dict, adapter: dict) -> dict:
    """A diffusers-format UNet LoRA state dict -> kohya keys (``lora_unet_<module>.lora_down.weight`` /
    ``lora_up.weight`` / ``alpha``), with each module's alpha set so that kohya's scale (alpha / rank) equals
    peft's (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA).

    diffusers' ``convert_state_dict_to_kohya`` does the key mapping but writes alpha = rank (scale 1), which is
    wrong for any run with lora.alpha != lora.rank; the alphas are rewritten here."""
    import math
    import re

    import torch
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    peft_keys = convert_unet_state_dict_to_peft(state_dict)  # ".lora.down" (our files) -> ".lora_A"
    kohya = convert_state_dict_to_kohya(peft_keys)
    # kohya module name -> diffusers module name, to resolve peft's per-module rank/alpha patterns
    modules = {}
    for key in peft_keys:
        if ".lora_A." in key or key.endswith(".lora_A.weight"):
            module = key.rsplit(".lora_A", 1)[0]
            modules[module.replace("unet", "lora_unet", 1).replace(".", "_")] = module.split(".", 1)[1]
    base_alpha = adapter.get("lora_alpha")
    use_rslora = bool(adapter.get("use_rslora"))
    out = {}
    for key, value in kohya.items():
        if not key.endswith(".alpha"):
            out[key] = value.contiguous()
            continue
        name = key[: -len(".alpha")]
        rank = int(kohya[f"{name}.lora_down.weight"].shape[0])
        alpha = base_alpha
        module = modules.get(name, "")
        for pattern, pattern_alpha in (adapter.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # peft's own matching of per-module patterns
                alpha = pattern_alpha
        if alpha is None:
            alpha = rank
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        out[key] = torch.tensor(float(scale * rank))
    return out


def export_kohya_lora(diffusers_lora_file, out_file) -> Path:
    """Write the diffusers LoRA ``diffusers_lora_file`` (``pytorch_lora_weights.safetensors``) in the kohya
    format that AUTOMATIC1111, ComfyUI, Forge, SD.Next and kohya's tools load, as ``out_file``.

    Keys name diffusers' UNet modules (``lora_unet_down_blocks_1_..._to_q``), which A1111 and ComfyUI map
    themselves and ``pipe.load_lora_weights`` reads too; the per-module ``alpha`` carries the LoRA scale."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    diffusers_lora_file, out_file = Path(diffusers_lora_file), Path(out_file)
    with safe_open(str(diffusers_lora_file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    unknown = sorted({key.split(".", 1)[0] for key in state_dict} - {"unet"})
    if unknown:
        raise ValueError(f"{diffusers_lora_file}: only UNet LoRA weights are converted, found {', '.join(unknown)} keys")
    adapter = _adapter_metadata(metadata, diffusers_lora_file.with_name(LORA_CONFIG_NAME))
    kohya = kohya_state_dict(state_dict, adapter)
    ranks = sorted({int(v.shape[0]) for k, v in kohya.items() if k.endswith("lora_down.weight")})
    alphas = sorted({float(v) for k, v in kohya.items() if k.endswith(".alpha")})
    header = {"ss_network_module": "networks.lora", "ss_network_dim": ",".join(map(str, ranks)),
              "ss_network_alpha": ",".join(f"{a:g}" for a in alphas), "format": "pt"}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(kohya, str(tmp), metadata=header)
    tmp.replace(out_file)
    return out_file
