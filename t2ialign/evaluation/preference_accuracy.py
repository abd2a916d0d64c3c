"""Implicit-reward preference accuracy of an aligned model on a preference dataset (Diffusion-DPO, Table 2).

The recipe around ``implicit_reward.py``: for each held-out pair, ``draws`` draws of (t, eps), each shared by
winner and loser as in training (``t2ialign.noising``), give the policy's and the reference's per-sample
errors; the aligned model is right on a pair when it lowered the winner's error more than the loser's.

    acc = implicit_reward_on_dataset("stabilityai/stable-diffusion-xl-base-1.0", "mhdang/dpo-sdxl-text2image-v1",
                                     "yuvalkirstain/pickapic_v2", split="test", limit=500, device="cuda")

The reference is the base pipeline's UNet (or, for a LoRA, the same UNet with its adapters off).
Latents are the VAE posterior means, so the number does not depend on a latent draw. Deterministic
for a seed: the same draws for every model compared.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Optional

import torch

from .implicit_reward import implicit_reward_accuracy

logger = logging.getLogger(__name__)
LORA_ADAPTER = "evaluated"


def _aligned_unet(components, aligned: str, dtype, device):
    """(policy, reference, is_lora): a full aligned UNet next to the base one, or the base with a LoRA."""
    from diffusers import UNet2DConditionModel

    from t2ialign.models.pipeline import resolve_aligned

    kind, directory = resolve_aligned(aligned)
    if kind == "transformer" or components.is_flow:
        from t2ialign.errors import UserFacingError

        raise UserFacingError(f"implicit-reward accuracy is computed for UNet models (SD / SDXL); {aligned} is a flow "
                              "transformer (SD3 / FLUX), which it does not support yet")
    base = components.unet.eval().requires_grad_(False)
    if kind == "unet":
        policy = UNet2DConditionModel.from_pretrained(directory, dtype=dtype).to(device, dtype).eval().requires_grad_(False)
        return policy, base, False
    base.load_lora_adapter(str(directory), weight_name="pytorch_lora_weights.safetensors", prefix="unet", adapter_name=LORA_ADAPTER)
    return base, base, True


def _pair_batches(dataset: str, split: str, resolution: int, limit: Optional[int], batch_size: int):
    from t2ialign.config.train import DataConfig
    from t2ialign.data.pairs import build_preference_pairs, collate_pairs

    cfg = DataConfig(dataset=dataset, split=split, resolution=resolution, random_flip=False, random_crop=False,
                     max_rows=limit, drop_duplicates=False)
    pairs = build_preference_pairs(cfg)
    for start in range(0, len(pairs), batch_size):
        yield collate_pairs([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])


def _conditioning(components, batch: dict, resolution: int, time_ids: str, device, dtype) -> dict:
    from t2ialign.models.text_encoding import encode_prompts, sdxl_time_ids, unet_conditioning

    captions = list(batch["captions"]) * 2  # winners then losers, each with the pair's prompt
    with torch.no_grad():
        embeds = encode_prompts(components, captions)
    ids = sdxl_time_ids(time_ids, batch["original_sizes"], batch["crop_top_left"], resolution) if components.is_sdxl else None
    cond = unet_conditioning(components.is_sdxl, embeds, ids)
    out = {"encoder_hidden_states": cond["encoder_hidden_states"].to(device, dtype)}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in cond["added_cond_kwargs"].items()}
    return out


def _batch_errors(components, policy, reference, is_lora, batch, cond, draws, generator, dtype) -> tuple:
    """(policy_err, reference_err), each (2B, draws), winners first."""
    from t2ialign.models.lora import adapters_disabled
    from t2ialign.noising import noisy_latents_and_target, per_sample_error

    vae = components.vae
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        policy_errs, reference_errs = [], []
        for _ in range(draws):
            zt, timesteps, target = noisy_latents_and_target(components.noise_scheduler, latents.float(), generator)
            zt = zt.to(dtype)
            policy_errs.append(per_sample_error(policy(zt, timesteps, **cond).sample, target))
            with adapters_disabled(reference) if is_lora else nullcontext():
                reference_errs.append(per_sample_error(reference(zt, timesteps, **cond).sample, target))
    return torch.stack(policy_errs, 1).cpu(), torch.stack(reference_errs, 1).cpu()


def implicit_reward_on_dataset(pretrained: str, aligned: str, dataset: str, *, split: str = "test", limit: Optional[int] = 500,
                               resolution: Optional[int] = None, draws: int = 4, batch_size: int = 4, time_ids: str = "fixed",
                               device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, n_boot: int = 1000,
                               progress: bool = True) -> dict:
    """``{"accuracy", "low", "high", "n", "ties", "draws"}`` of ``aligned`` against ``pretrained`` on ``dataset``."""
    from tqdm.auto import tqdm

    from t2ialign.models.loading import load_components

    components = load_components(pretrained, dtype=dtype, device=device)
    policy, reference, is_lora = _aligned_unet(components, aligned, dtype, device)
    resolution = int(resolution or components.unet.config.sample_size * components.vae_scale_factor)
    generator = torch.Generator(device).manual_seed(seed)
    errors = {"policy": [], "reference": []}
    for batch in tqdm(_pair_batches(dataset, split, resolution, limit, batch_size), desc="implicit reward", disable=not progress):
        cond = _conditioning(components, batch, resolution, time_ids, device, dtype)
        policy_err, reference_err = _batch_errors(components, policy, reference, is_lora, batch, cond, draws, generator, dtype)
        errors["policy"].append(policy_err)
        errors["reference"].append(reference_err)
    policy_w, policy_l = _winners_losers(errors["policy"])
    reference_w, reference_l = _winners_losers(errors["reference"])
    result = implicit_reward_accuracy(policy_w, policy_l, reference_w, reference_l, n_boot=n_boot, seed=seed)
    logger.info("implicit-reward accuracy %.3f on %d pairs", result["accuracy"], result["n"])
    return {**result, "draws": draws, "dataset": dataset, "split": split}


def _winners_losers(chunks: list) -> tuple:
    winners = torch.cat([c[: c.shape[0] // 2] for c in chunks])
    losers = torch.cat([c[c.shape[0] // 2:] for c in chunks])
    return winners, losers
