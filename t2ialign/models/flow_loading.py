"""Loading the rectified-flow families (SD3 / SD3.5, FLUX): the transformer, the text encoders by pipeline slot and
the flow scheduler, into the same ``DiffusionComponents`` the UNet families use (``loading.load_components``
dispatches here from the pipeline's ``model_index.json``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from t2ialign.hub import local_only
from t2ialign.models.loading import (
    DiffusionComponents,
    _has_component,
    _load_model,
    _load_text_encoder,
    _load_tokenizer,
    _load_vae_for,
    _transformers_class,
    _vae_config_or_none,
    load_noise_scheduler,
)

# the pipeline class of each flow family and the text slots of its model_index.json, in its encode_prompt order
FLOW_TEXT_SLOTS = {
    "sd3": (("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),
            ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
            ("text_encoder_3", "tokenizer_3", "T5EncoderModel")),
    "flux": (("text_encoder", "tokenizer", "CLIPTextModel"), ("text_encoder_2", "tokenizer_2", "T5EncoderModel")),
}
FLOW_TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def load_transformer(pretrained_or_dir: str, family: str, *, subfolder: Optional[str] = None, dtype=torch.float32,
                     device="cpu", revision=None, variant=None, local_files_only: bool = False):
    """A flow transformer (SD3Transformer2DModel / FluxTransformer2DModel) from a pipeline's ``transformer/`` or a
    bare export directory (a training run's ``final/transformer``)."""
    import diffusers

    cls = getattr(diffusers, FLOW_TRANSFORMERS[family])
    return _load_model(cls, "transformer", "transformer", pretrained_or_dir, subfolder, hub_uses_subfolder=True,
                       dtype=dtype, device=device, revision=revision, variant=variant,
                       local_files_only=local_only(local_files_only))


def _flow_text_slots(index, location, family, *, dtype, device, revision, variant, local_files_only,
                     load_encoders, load_tokenizers) -> dict:
    slots = {}
    for encoder_name, tokenizer_name, default_class in FLOW_TEXT_SLOTS[family]:
        present = _has_component(index, encoder_name)
        slots[encoder_name] = slots[tokenizer_name] = None
        if present and load_tokenizers:
            slots[tokenizer_name] = _load_tokenizer(location, tokenizer_name, revision=revision,
                                                    local_files_only=local_files_only)
        if present and load_encoders:
            slots[encoder_name] = _load_text_encoder(
                _transformers_class(index, encoder_name, default_class), location, encoder_name, dtype=dtype,
                device=device, revision=revision, variant=variant, local_files_only=local_files_only)
    return slots


def load_flow_components(index, location, pretrained, family, *, vae, dtype, device, variant, revision,
                          local_files_only, load_denoiser, load_vae, load_text_encoders, load_tokenizers, frozen_dtype,
                          denoiser_dtype):
    hub = dict(revision=revision, local_files_only=local_files_only)
    noise_scheduler = load_noise_scheduler(pretrained, family=family, **hub)
    transformer = None
    if load_denoiser:
        transformer = load_transformer(location if Path(location).is_dir() else pretrained, family, subfolder="transformer",
                                       dtype=denoiser_dtype, device=device, variant=variant, **hub)
    vae_dtype = dtype if frozen_dtype == torch.float16 else frozen_dtype  # as SDXL's: fp16 VAEs overflow
    vae_model = _load_vae_for(location, vae, dtype=vae_dtype, device=device, variant=variant, **hub) if load_vae else None
    vae_config = dict(vae_model.config) if vae_model is not None else _vae_config_or_none(location, vae, **hub)
    slots = _flow_text_slots(index, location, family, dtype=frozen_dtype, device=device, variant=variant,
                             load_encoders=load_text_encoders, load_tokenizers=load_tokenizers, **hub)
    names = FLOW_TEXT_SLOTS[family]
    return DiffusionComponents(
        unet=None, vae=vae_model,
        text_encoders=[slots[e] for e, _, _ in names if slots[e] is not None],
        tokenizers=[slots[t] for _, t, _ in names if slots[t] is not None],
        noise_scheduler=noise_scheduler, is_sdxl=False, prediction_type="flow", source=pretrained,
        vae_config=vae_config, family=family, transformer=transformer, text_slots=slots,
    )
