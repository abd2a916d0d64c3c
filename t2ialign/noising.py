"""The ELBO surrogate shared by every objective: noising, targets and per-sample denoising error.

Latents are laid out winners first, ``[w_1..w_B, l_1..l_B]``. Noise and timestep are drawn once
per pair and reused for its loser, so the winner/loser error difference measures the images, not
the luck of the draw (docs/ALGORITHMS.md section 0).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def sample_pair_noise(latents: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Gaussian noise for ``B`` winners, repeated for the ``B`` losers: shape of ``latents``.

    Drawn in fp32 on the generator's device (so a seed gives the same noise whatever the latent dtype,
    and a CPU generator can seed CUDA latents), then cast and moved to the latents.
    """
    if latents.shape[0] % 2:
        raise ValueError(f"latents must hold winners then losers (an even batch), got {latents.shape[0]} samples")
    half = latents.shape[0] // 2
    draw_device = generator.device if generator is not None else latents.device
    eps = torch.randn(latents[:half].shape, generator=generator, device=draw_device, dtype=torch.float32)
    return eps.to(device=latents.device, dtype=latents.dtype).repeat(2, 1, 1, 1)


def sample_pair_timesteps(num_pairs: int, num_train_timesteps: int, device, generator: Optional[torch.Generator] = None) -> Tensor:
    """Integer timesteps ``U{0..T-1}``, one per pair, repeated for the losers: shape ``(2B,)``."""
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, num_train_timesteps, (num_pairs,), generator=generator, device=draw_device)
    return t.to(device).repeat(2).long()


def denoising_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """Epsilon or v target, following the scheduler's ``prediction_type``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"prediction_type '{prediction_type}' is not supported for preference training; use a scheduler "
        "configured for 'epsilon' or 'v_prediction'"
    )


def noisy_latents_and_target(scheduler, latents: Tensor, generator: Optional[torch.Generator] = None):
    """Forward-process sample for a winners-first batch: returns ``(zt, timesteps, target)``."""
    noise = sample_pair_noise(latents, generator)
    timesteps = sample_pair_timesteps(latents.shape[0] // 2, scheduler.config.num_train_timesteps, latents.device, generator)
    zt = scheduler.add_noise(latents, noise, timesteps)
    return zt, timesteps, denoising_target(scheduler, latents, noise, timesteps)


def per_sample_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean over (C, H, W) of the squared error, in at least fp32: shape ``(N,)``.

    Half-precision inputs give fp32 errors; fp64 inputs (either of the two) give fp64.
    """
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, target.dtype), torch.float32)
    diff = prediction.to(dtype) - target.to(dtype)
    return diff.pow(2).flatten(1).mean(dim=1)
