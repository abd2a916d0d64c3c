"""Prompt conditioning of the flow pipelines (SD3 / SD3.5, FLUX), computed by the pipelines' own ``encode_prompt``.

Training must condition the transformer exactly as sampling will, so instead of re-deriving the recipe
(SD3: penultimate states of CLIP-L and CLIP-G concatenated, zero-padded to T5's width and joined with the T5
states on the sequence axis, pooled = both CLIP projections; FLUX: T5 states, pooled = CLIP-L's pooled
output), a pipeline object holding only the text encoders and tokenizers is built once and asked.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from t2ialign.models.text_encoding import PromptEmbeddings

DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' __call__ defaults (T5 tokens)


def flow_pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]


def text_only_pipeline(components):
    """The family's pipeline with the text encoders and tokenizers only (no transformer / VAE loaded), cached."""
    cached = getattr(components, "_text_pipeline", None)
    if cached is not None:
        return cached
    cls = flow_pipeline_class(components.family)
    expected, _ = cls._get_signature_keys(cls)
    kwargs = {name: components.text_slots.get(name) for name in expected}
    kwargs["scheduler"] = components.noise_scheduler
    # SD3 without T5 pads with zeros as wide as the transformer's joint_attention_dim, which it reads from there
    kwargs["transformer"] = components.transformer
    pipe = cls(**kwargs)
    components._text_pipeline = pipe
    return pipe


def max_sequence_length(components, configured: Optional[int] = None) -> int:
    return int(configured) if configured else DEFAULT_MAX_SEQUENCE_LENGTH[components.family]


@torch.no_grad()
def encode_flow_prompts(components, prompts: Sequence[str], max_sequence_length_: Optional[int] = None) -> PromptEmbeddings:
    """``PromptEmbeddings(prompt_embeds, pooled)`` for ``prompts``, identical to the pipeline's ``encode_prompt``."""
    if not any(components.text_slots.get(name) is not None for name in ("text_encoder", "text_encoder_2")):
        raise ValueError("no text encoders loaded (load_components(..., load_text_encoders=True) is needed)")
    pipe = text_only_pipeline(components)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = next(e for e in components.text_encoders).device
    length = max_sequence_length(components, max_sequence_length_)
    if components.family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=length)
    else:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=length)
    return PromptEmbeddings(embeds, pooled)
