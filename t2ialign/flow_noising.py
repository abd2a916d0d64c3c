"""The ELBO surrogate for rectified-flow models (SD3 / SD3.5, FLUX): noising, velocity target, per-sample error.

Rectified flow interpolates ``z_sigma = (1 - sigma) x0 + sigma eps`` and the transformer predicts the velocity
``v = eps - x0``. Its training loss at a sigma is a weighted denoising error, so the per-sample velocity error
is the flow model's ELBO surrogate and every objective in ``t2ialign.objectives`` takes it unchanged
(docs/FLOW.md). As for the UNet families (``t2ialign.noising``), a pair's winner and loser share one noise draw
and one sigma, laid out winners first.

Timesteps follow diffusers' SD3 / FLUX training scripts exactly: ``u`` from
``compute_density_for_timestep_sampling`` (logit-normal by default), an index ``int(u * N)`` into the
scheduler's training table, whose sigmas already carry the model's shift (SD3.5: 3.0; FLUX's dynamic shift
is applied only at inference, so its table is unshifted, as in its training script).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from t2ialign.noising import sample_pair_noise

WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")  # timestep density (diffusers' names)
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")  # compute_loss_weighting_for_sd3


@dataclass(frozen=True)
class FlowTimestepSampling:
    """How training sigmas are drawn and how the per-sample error is weighted (the config's ``flow:`` section)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"


@dataclass
class FlowNoised:
    """A winners-first batch after the forward process."""

    noisy: Tensor  # z_sigma, shape of the latents
    timesteps: Tensor  # (2B,) in the scheduler's units (sigma * num_train_timesteps), what the transformer is fed
    sigmas: Tensor  # (2B,) fp32
    target: Tensor  # velocity eps - x0
    weights: Tensor  # (2B,) per-sample loss weights (ones for loss_weighting="none")


def sample_pair_sigma_indices(num_pairs: int, scheduler, sampling: FlowTimestepSampling, device,
                              generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices into the scheduler's training table, one per pair, repeated for the losers: shape ``(2B,)``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    draw_device = generator.device if generator is not None else device
    u = compute_density_for_timestep_sampling(
        sampling.weighting_scheme, num_pairs, logit_mean=sampling.logit_mean, logit_std=sampling.logit_std,
        mode_scale=sampling.mode_scale, device=draw_device, generator=generator,
    )
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    # u can be exactly 1.0 for the uniform / mode densities: clamp to the last entry instead of indexing past it
    indices = (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    return indices.to(device).repeat(2)


def training_table(scheduler) -> tuple[Tensor, Tensor]:
    """``(timesteps, sigmas)`` of the scheduler's training table, read from a fresh copy of its config.

    The pipeline's scheduler object may have run ``set_timesteps`` (inference spacing); the training scripts
    read a copy made before that, which ``from_config`` reproduces.
    """
    fresh = type(scheduler).from_config(scheduler.config)
    sigmas = fresh.sigmas[: int(fresh.config.num_train_timesteps)].float()
    return fresh.timesteps.float(), sigmas


def flow_loss_weights(sampling: FlowTimestepSampling, sigmas: Tensor) -> Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(sampling.loss_weighting, sigmas).float()


def flow_noisy_latents_and_target(scheduler, latents: Tensor, sampling: FlowTimestepSampling,
                                  generator: Optional[torch.Generator] = None, table=None) -> FlowNoised:
    """Forward process for a winners-first batch of (unpacked) latents ``(2B, C, H, W)``."""
    noise = sample_pair_noise(latents, generator)
    timesteps_table, sigmas_table = table if table is not None else training_table(scheduler)
    indices = sample_pair_sigma_indices(latents.shape[0] // 2, scheduler, sampling, latents.device, generator)
    sigmas = sigmas_table.to(latents.device)[indices]
    timesteps = timesteps_table.to(latents.device)[indices]
    sigma = sigmas.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
    noisy = (1.0 - sigma) * latents + sigma * noise
    return FlowNoised(noisy, timesteps, sigmas, noise - latents, flow_loss_weights(sampling, sigmas))


def weighted_per_sample_error(prediction: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """``mean over non-batch dims of w * (pred - v)^2``, in at least fp32: diffusers' SD3 / FLUX loss per sample."""
    from t2ialign.noising import per_sample_error

    error = per_sample_error(prediction, target)
    return error * weights.to(error.dtype)
