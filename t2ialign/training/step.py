"""One micro-batch: images/latents -> conditioning -> noising -> per-sample errors -> objective.

The objective's spec decides what is computed (reference pass or not, one caption per image or per
pair, forward noising or DDIM inversion, losers or not); this module never looks at its name.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from diffusers.utils.torch_utils import randn_tensor

from t2ialign.inversion import ddim_inversion_target
from t2ialign.models.lora import adapters_disabled
from t2ialign.models.reference import SharedGraphReference, reference_compute_dtype
from t2ialign.models.text_encoding import PromptEmbeddings, drop_prompts, encode_prompts, prompt_keep_mask, sdxl_time_ids, unet_conditioning
from t2ialign.noising import noisy_latents_and_target, per_sample_error, sample_pair_timesteps
from t2ialign.objectives import ObjectiveOutput, ObjectiveSpec


@dataclass
class StepModels:
    policy: torch.nn.Module  # trainable UNet, possibly wrapped by accelerate (DDP/FSDP)
    policy_unwrapped: torch.nn.Module
    reference: Optional[torch.nn.Module]  # frozen copy (full fine-tune); None for LoRA or reference-free
    components: object  # DiffusionComponents: vae, text encoders, tokenizers, noise_scheduler, is_sdxl
    lora: bool = False


def _latents_from_batch(models: StepModels, batch: dict, generator: torch.Generator) -> Tensor:
    if "latent_mean" in batch or "latents" in batch:  # pre-encoded cache (t2ialign.data.cache)
        device = next(models.policy_unwrapped.parameters()).device
        if "latents" in batch:
            return batch["latents"].to(device, non_blocking=True)
        # the VAE posterior, sampled with the same generator draw as latent_dist.sample(generator) below
        mean, std = (batch[k].to(device, torch.float32, non_blocking=True) for k in ("latent_mean", "latent_std"))
        eps = randn_tensor(mean.shape, generator=generator, device=device, dtype=torch.float32)
        return _shift_and_scale(mean + std * eps, batch.get("latent_shift_factor"), batch["latent_scaling_factor"])
    vae = models.components.vae
    pixels = batch["pixel_values"].to(vae.device, vae.dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    # contiguous: the CPU VAE returns channels_last, which sends the UNet down other kernels (1e-7 apart) than cached latents
    return _shift_and_scale(latents, vae.config.get("shift_factor"), vae.config.scaling_factor).contiguous()


def _shift_and_scale(latents: Tensor, shift, scale) -> Tensor:
    """``(z - shift) * scale``: SD3 / FLUX VAEs have a shift_factor, SD / SDXL ones none (left out, not subtracted)."""
    return (latents - shift) * scale if shift else latents * scale


def _pair_captions(spec: ObjectiveSpec, batch: dict, dropout: float, generator: torch.Generator) -> list[str]:
    """2B captions, winners first; dropout decisions are per pair, so both images lose the prompt together."""
    num_pairs = len(batch["captions"])
    keep = drop_prompts(["x"] * num_pairs, dropout, generator) if dropout > 0 else ["x"] * num_pairs
    if spec.per_image_captions:
        winners, losers = batch["captions_w"], batch["captions_l"]
    else:
        winners = losers = batch["captions"]
    winners = [c if k else "" for c, k in zip(winners, keep)]
    losers = [c if k else "" for c, k in zip(losers, keep)]
    return winners + losers


def _drop_cached_prompts(embeds: PromptEmbeddings, batch: dict, dropout: float, generator) -> PromptEmbeddings:
    """Prompt dropout on cached embeddings: the same per-pair draw as ``_pair_captions``, rows -> embedding of "".

    Done on the generator's device (the GPU in training), where the embeddings are moved first: the
    decisions never travel to the host, so the step does not wait for the GPU.
    """
    if "null_prompt_embeds" not in batch:
        raise ValueError("data.prompt_dropout > 0 needs the cache's embedding of \"\" (batch['null_prompt_embeds'])")
    dropped = ~prompt_keep_mask(len(embeds) // 2, dropout, generator).repeat(2)

    def swap(rows, null_row):
        if rows is None:
            return None
        rows = rows.to(dropped.device, non_blocking=True)
        mask = dropped.view(-1, *[1] * (rows.ndim - 1))
        return torch.where(mask, null_row.to(rows, non_blocking=True), rows)

    return PromptEmbeddings(swap(embeds.prompt_embeds, batch["null_prompt_embeds"]),
                            swap(embeds.pooled_prompt_embeds, batch.get("null_pooled_prompt_embeds")))


def _time_ids(batch: dict, resolution: int, mode: str) -> Tensor:
    """SDXL time_ids (2B, 6) under ``data.time_ids``, from the image path's measured sizes and crops, or from
    the cache's measured ``[orig_h, orig_w, top, left, R, R]`` rows: one function for both paths."""
    if "time_ids" in batch:  # pre-encoded cache: sdxl_time_ids("measured", ...) rows (t2ialign.data.cache)
        stored = batch["time_ids"]
        if mode == "measured":  # as stored (pinned by the loader: the copy to the GPU stays asynchronous)
            return stored
        return sdxl_time_ids(mode, stored[:, 0:2], stored[:, 2:4], resolution)
    return sdxl_time_ids(mode, batch["original_sizes"], batch["crop_top_left"], resolution)


def _conditioning(models: StepModels, spec: ObjectiveSpec, batch: dict, resolution: int, dropout: float, generator,
                  time_ids_mode: str = "measured") -> dict:
    is_sdxl = models.components.is_sdxl
    if "prompt_embeds" in batch:  # pre-encoded cache already holds 2B rows, winners first
        embeds = PromptEmbeddings(batch["prompt_embeds"], batch.get("pooled_prompt_embeds"))
        if dropout > 0:
            embeds = _drop_cached_prompts(embeds, batch, dropout, generator)
    else:
        captions = _pair_captions(spec, batch, dropout, generator)
        embeds = encode_prompts(models.components, captions)
    time_ids = _time_ids(batch, resolution, time_ids_mode) if is_sdxl else None
    return unet_conditioning(is_sdxl, embeds, time_ids)


def _select(cond: dict, index) -> dict:
    """Conditioning rows for a subset of the batch (SFT runs winners only)."""
    out = {"encoder_hidden_states": cond["encoder_hidden_states"][index]}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: v[index] for k, v in cond["added_cond_kwargs"].items()}
    return out


def _to_device(cond: dict, device, dtype) -> dict:
    """non_blocking: cached batches arrive pinned (make_loader), so the copies do not wait for the GPU."""
    out = {"encoder_hidden_states": cond["encoder_hidden_states"].to(device, dtype, non_blocking=True)}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: v.to(device, dtype, non_blocking=True) for k, v in cond["added_cond_kwargs"].items()}
    return out


def _noised(models: StepModels, spec: ObjectiveSpec, params: dict, latents: Tensor, cond: dict, generator) -> tuple:
    scheduler = models.components.noise_scheduler
    if not spec.uses_inversion:
        return noisy_latents_and_target(scheduler, latents, generator)
    timesteps = sample_pair_timesteps(latents.shape[0] // 2, scheduler.config.num_train_timesteps, latents.device, generator)
    policy = models.policy_unwrapped

    def noise_pred_fn(x, s, rows):  # only the samples whose inversion depth is not yet reached
        return policy(x.to(latents.dtype), s, **_select(cond, rows)).sample

    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)
    zt, target = ddim_inversion_target(
        noise_pred_fn, latents, timesteps, alphas_cumprod, generator=generator,
        num_steps=int(params["inversion_steps"]), eta=float(params["inversion_eta"]),
        steps_offset=scheduler.config.get("steps_offset", 1), only_active=True,
        first_timestep=str(params.get("inversion_first_timestep", "authors")),
    )
    return zt, timesteps, target


def preference_step(
    models: StepModels, spec: ObjectiveSpec, params: dict, batch: dict, *, resolution: int, prompt_dropout: float, generator,
    time_ids_mode: str = "measured",
) -> ObjectiveOutput:
    """Compute the objective for one micro-batch (winners first); call ``.loss.backward()`` on the result.

    ``time_ids_mode``: ``data.time_ids`` (SDXL micro-conditioning, see ``sdxl_time_ids``)."""
    latents = _latents_from_batch(models, batch, generator).float()
    cond = _conditioning(models, spec, batch, resolution, prompt_dropout, generator, time_ids_mode)
    dtype = next(models.policy_unwrapped.parameters()).dtype
    cond = _to_device(cond, latents.device, torch.float32 if dtype == torch.float32 else dtype)
    zt, timesteps, target = _noised(models, spec, params, latents, cond, generator)
    ref_err_w = ref_err_l = None
    if spec.needs_reference:  # first: a reference pass that saves activations (compile) frees them before the policy's
        ref_err_w, ref_err_l = reference_errors(models, zt, timesteps, cond, target).chunk(2)
    rows = slice(None) if spec.uses_loser else slice(0, latents.shape[0] // 2)
    pred = models.policy(zt[rows], timesteps[rows], **_select(cond, rows)).sample
    model_err = per_sample_error(pred, target[rows])
    model_err_w, model_err_l = model_err.chunk(2) if spec.uses_loser else (model_err, None)
    return spec(model_err_w, model_err_l, ref_err_w, ref_err_l, **params)


def reference_errors(models: StepModels, zt: Tensor, timesteps: Tensor, cond: dict, target: Tensor) -> Tensor:
    """Errors of the frozen reference, off the autograd graph (LoRA: the same UNet, adapters off)."""
    if isinstance(models.reference, SharedGraphReference):  # compile: the policy's own graph, reference weights
        return per_sample_error(models.reference.predict(models.policy_unwrapped, zt, timesteps, **cond), target)
    with torch.no_grad():
        if models.reference is not None:  # an exact reference (t2ialign.models.reference) takes the policy's inputs
            ref_dtype = reference_compute_dtype(models.reference)
            ref_cond = _to_device(cond, zt.device, ref_dtype)
            pred = models.reference(zt.to(ref_dtype), timesteps, **ref_cond).sample
        else:
            with adapters_disabled(models.policy_unwrapped) if models.lora else nullcontext():
                pred = models.policy_unwrapped(zt, timesteps, **cond).sample
    return per_sample_error(pred, target)
