"""SD / SDXL components: loading, prompt conditioning, LoRA, attention backend, tiny offline builders.

Submodules import diffusers / transformers / peft, so this package re-exports lazily: importing
``t2ialign.models`` stays cheap until a name is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DiffusionComponents": "loading",
    "load_components": "loading",
    "load_unet": "loading",
    "load_vae": "loading",
    "load_noise_scheduler": "loading",
    "set_attention_backend": "loading",
    "PromptEmbeddings": "text_encoding",
    "encode_prompts": "text_encoding",
    "make_time_ids": "text_encoding",
    "sdxl_time_ids": "text_encoding",
    "unet_conditioning": "text_encoding",
    "drop_prompts": "text_encoding",
    "prompt_keep_mask": "text_encoding",
    "add_lora": "lora",
    "adapters_disabled": "lora",
    "save_lora_weights": "lora",
    "is_lora_model": "lora",
    "build_clip_tokenizer": "tiny",
    "tiny_sdxl_components": "tiny",
    "tiny_sd_components": "tiny",
    "save_pipeline": "tiny",
    "build_tiny_sdxl_pipeline": "tiny",
    "build_tiny_sd_pipeline": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
