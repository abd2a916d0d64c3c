"""One micro-batch for a rectified-flow model (SD3 / SD3.5, FLUX): latents -> conditioning -> flow noising ->
per-sample velocity errors -> the objective (docs/FLOW.md).

The objective's spec decides what runs (reference pass, per-image captions, losers), exactly as in
``training/step.py``, whose latent and caption helpers this step shares; only the forward process and the
transformer call differ.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from t2ialign.flow_noising import FlowNoised, FlowTimestepSampling, flow_noisy_latents_and_target, training_table, weighted_per_sample_error
from t2ialign.models.flow_text import encode_flow_prompts
from t2ialign.models.lora import adapters_disabled
from t2ialign.models.reference import reference_compute_dtype
from t2ialign.models.text_encoding import PromptEmbeddings
from t2ialign.objectives import ObjectiveOutput, ObjectiveSpec
from t2ialign.training.step import StepModels, _drop_cached_prompts, _latents_from_batch, _pair_captions


@dataclass(frozen=True)
class FlowSettings:
    sampling: FlowTimestepSampling = FlowTimestepSampling()
    guidance_scale: float = 3.5  # FLUX.1-dev's distilled guidance input; unused by models without guidance_embeds
    max_sequence_length: Optional[int] = None  # T5 tokens; None = the pipeline's default

    @classmethod
    def from_config(cls, flow) -> "FlowSettings":
        """From a train config's ``flow:`` section (``FlowConfig``)."""
        sampling = FlowTimestepSampling(flow.weighting_scheme, flow.logit_mean, flow.logit_std, flow.mode_scale,
                                        flow.loss_weighting)
        return cls(sampling, flow.guidance_scale, flow.max_sequence_length)


def pack_flux_latents(latents: Tensor) -> Tensor:
    """``(N, C, H, W)`` -> FLUX's 2x2-patch sequence ``(N, H/2 * W/2, 4C)`` (the pipeline's own packing)."""
    from diffusers import FluxPipeline

    n, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, n, c, h, w)


def flow_velocity(family: str, transformer, noisy: Tensor, timesteps: Tensor, embeds: PromptEmbeddings,
                  guidance_scale: float = 3.5) -> Tensor:
    """The transformer's velocity for unpacked latents ``(N, C, H, W)``, called as the family's pipeline calls it.

    FLUX: packed 2x2 patches with their position ids, timestep / 1000, and the distilled guidance value when the
    model has a guidance embedding; the output comes back unpacked.
    """
    if family == "sd3":
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds.prompt_embeds,
                           pooled_projections=embeds.pooled_prompt_embeds, return_dict=False)[0]
    from diffusers import FluxPipeline

    n, _, h, w = noisy.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
    txt_ids = torch.zeros(embeds.prompt_embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    config = getattr(transformer, "config", None) or getattr(transformer, "module", transformer).config
    guidance = torch.full((n,), float(guidance_scale), device=noisy.device) if config.guidance_embeds else None
    packed = transformer(hidden_states=pack_flux_latents(noisy), timestep=timesteps / 1000, guidance=guidance,
                         pooled_projections=embeds.pooled_prompt_embeds, encoder_hidden_states=embeds.prompt_embeds,
                         txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(packed, h, w, 1)


def _flow_conditioning(models: StepModels, spec: ObjectiveSpec, batch: dict, dropout: float, generator,
                       settings: FlowSettings) -> PromptEmbeddings:
    if "prompt_embeds" in batch:  # pre-encoded cache (2B rows, winners first)
        embeds = PromptEmbeddings(batch["prompt_embeds"], batch["pooled_prompt_embeds"])
        return _drop_cached_prompts(embeds, batch, dropout, generator) if dropout > 0 else embeds
    captions = _pair_captions(spec, batch, dropout, generator)
    return encode_flow_prompts(models.components, captions, settings.max_sequence_length)


def flow_preference_step(models: StepModels, spec: ObjectiveSpec, params: dict, batch: dict, *, prompt_dropout: float,
                         generator, settings: FlowSettings = FlowSettings(), **_unused) -> ObjectiveOutput:
    """The objective for one micro-batch of a flow model (winners first); call ``.loss.backward()`` on the result."""
    if spec.uses_inversion:
        raise ValueError(f"objective '{spec.name}' runs DDIM inversion, which is defined for epsilon-prediction "
                         "UNets only (docs/FLOW.md)")
    components = models.components
    latents = _latents_from_batch(models, batch, generator).float()
    dtype = next(models.policy_unwrapped.parameters()).dtype
    embeds = _flow_conditioning(models, spec, batch, prompt_dropout, generator, settings)
    embeds = embeds.to(latents.device, torch.float32 if dtype == torch.float32 else dtype)
    table = getattr(components, "_flow_training_table", None)
    if table is None:  # read once per run: a fresh copy of the scheduler's config, as the training scripts do
        table = components._flow_training_table = training_table(components.noise_scheduler)
    noised = flow_noisy_latents_and_target(components.noise_scheduler, latents, settings.sampling, generator, table)
    ref_err_w = ref_err_l = None
    if spec.needs_reference:
        ref_err_w, ref_err_l = flow_reference_errors(models, noised, embeds, settings).chunk(2)
    rows = slice(None) if spec.uses_loser else slice(0, latents.shape[0] // 2)
    pred = flow_velocity(components.family, models.policy, noised.noisy[rows], noised.timesteps[rows], embeds[rows],
                         settings.guidance_scale)
    model_err = weighted_per_sample_error(pred, noised.target[rows], noised.weights[rows])
    model_err_w, model_err_l = model_err.chunk(2) if spec.uses_loser else (model_err, None)
    return spec(model_err_w, model_err_l, ref_err_w, ref_err_l, **params)


def flow_reference_errors(models: StepModels, noised: FlowNoised, embeds: PromptEmbeddings, settings: FlowSettings) -> Tensor:
    """Errors of the frozen reference, off the autograd graph (LoRA: the same transformer, adapters off)."""
    family = models.components.family
    with torch.no_grad():
        if models.reference is not None:
            ref_dtype = reference_compute_dtype(models.reference)
            pred = flow_velocity(family, models.reference, noised.noisy.to(ref_dtype), noised.timesteps,
                                 embeds.to(dtype=ref_dtype), settings.guidance_scale)
        else:
            with adapters_disabled(models.policy_unwrapped) if models.lora else nullcontext():
                pred = flow_velocity(family, models.policy_unwrapped, noised.noisy, noised.timesteps, embeds,
                                     settings.guidance_scale)
    return weighted_per_sample_error(pred, noised.target, noised.weights)
