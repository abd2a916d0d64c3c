"""DDIM inversion for DDIM-InPO (docs/ALGORITHMS.md section 4): ``zt`` and its implied noise target.

Instead of the forward process ``zt = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``, DDIM-InPO obtains ``zt``
by running DDIM *inversion* of ``z0`` with the current policy and uses the noise implied by that
latent, ``(zt - sqrt(abar_t) z0) / sqrt(1 - abar_t)``, as the epsilon target.

The inverse step is written directly from ``alphas_cumprod`` so it depends on no diffusers
scheduler convention (recent ``DDIMInverseScheduler`` releases shifted their grid and step meaning).

Documented choices
------------------
* Grid: ``K = num_steps`` inverse steps of size ``T // K`` with leading spacing and
  ``steps_offset = 1``: sources ``[1 - T//K, 1, 1 + T//K, ..., 1 + (K-2) T//K]``; for T = 1000, K = 10
  that is ``[-99, 1, 101, ..., 801]`` and each step moves ``s -> s + 100`` (diffusers 0.20's grid,
  which the reference ran on).
* Depth: sample ``i`` runs the steps whose source ``s < t[i]`` (so 1 to K steps: ``t <= 1`` runs only
  the first step, ``t = 999`` all 10, ending at level 901). Each sample has its own depth; the reference
  handled one pair per micro-batch and took the depth from ``t[0]``.
* ``abar`` at the negative first source: ``alphas_cumprod[0]``. This is what the reference computed:
  diffusers 0.20's ``DDIMInverseScheduler.step`` used ``initial_alpha_cumprod`` for ``s < 0``, which is
  ``alphas_cumprod[0]`` when ``set_alpha_to_one`` is false, as in the SD 1.x / SD 2.x / SDXL scheduler
  configs the reference loaded; the DDIM ``_get_variance`` used for the ``eta`` noise likewise falls
  back to ``final_alpha_cumprod = alphas_cumprod[0]``. Pass ``initial_alpha_cumprod=1.0`` to get the
  ``set_alpha_to_one=True`` behaviour (first step then ignores the prediction and adds no noise).
* UNet timestep: the network is evaluated at the SOURCE level of each step, the first one included:
  ``-99`` by default, exactly what the authors' trainer fed (JaydenLyh/InPO ``train.py`` iterates
  ``inverse_scheduler.timesteps``, whose first entry is ``-99`` under its pinned diffusers 0.20). The
  sinusoidal timestep embedding is defined there, though outside the training range.
  ``first_timestep="zero"`` clamps it to 0 (``max(s, 0)``), the level whose ``abar`` the step uses.
* Batching: by default every call is ONE batched call over ALL ``N`` samples (same source timestep
  for every row), and samples whose depth is exhausted are masked: their latent is no longer updated
  and the prediction for them is discarded. This keeps ``noise_pred_fn(x, s)`` a plain closure over
  the full conditioning batch. With ``only_active=True`` the call is restricted to the samples still
  active and the callback receives their row indices as a third argument,
  ``noise_pred_fn(x_active, s_active, index)``, so it can select the matching conditioning rows;
  the result is identical, only cheaper when depths differ.
* Noise (``eta > 0``): after each executed step, ONE ``randn`` of the full ``z0`` shape is drawn from
  ``generator`` (in the compute dtype, on the generator's device, then moved to ``z0``'s), in step
  order, and applied to the active rows only; so draws do not depend on ``only_active`` and a seeded
  call is reproducible. With ``eta == 0`` no random numbers are drawn.
* Precision: computed in ``promote_types(z0.dtype, float32)`` (fp64 stays fp64); ``noise_pred_fn``
  receives latents in that dtype (cast them for a half-precision UNet) and its output is upcast.
  ``zt`` and ``target`` are returned in that dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["ddim_inversion_target", "inversion_grid", "FIRST_TIMESTEP_CHOICES"]

FIRST_TIMESTEP_CHOICES = ("authors", "zero")  # UNet timestep of the first (negative-source) inverse step


def inversion_grid(num_train_timesteps: int = 1000, num_steps: int = 10, steps_offset: int = 1) -> Tensor:
    """Source timesteps of the DDIM inverse steps (leading spacing): ``[-99, 1, 101, ..., 801]`` by default."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    step = num_train_timesteps // num_steps
    return torch.arange(num_steps, dtype=torch.long) * step + steps_offset - step


def _draw_device(generator: Optional[torch.Generator], default):
    """Draw on the generator's own device (a CPU generator can seed CUDA latents), else on ``default``."""
    return generator.device if generator is not None else default


@torch.no_grad()
def ddim_inversion_target(
    noise_pred_fn: Callable[..., Tensor],
    z0: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    num_steps: int = 10,
    eta: float = 0.1,
    generator: Optional[torch.Generator] = None,
    *,
    steps_offset: int = 1,
    initial_alpha_cumprod: Optional[float] = None,
    only_active: bool = False,
    first_timestep: str = "authors",
):
    """DDIM-invert each sample of ``z0`` with the policy up to its timestep; return ``(zt, target)``.

    Args:
        noise_pred_fn: ``noise_pred_fn(x, s) -> eps`` predicted noise for latents ``x`` at integer
            timesteps ``s`` (LongTensor, one entry per row of ``x``); conditional branch only, no CFG.
            With ``only_active=True`` it is called as ``noise_pred_fn(x, s, index)`` (see module doc).
        z0: clean latents ``(N, C, H, W)`` (winners first; every row is inverted independently).
        t: integer timesteps ``(N,)`` in ``[0, T-1]`` (the caller shares them per pair).
        alphas_cumprod: ``(T,)`` cumulative alpha products of the training noise schedule.
        num_steps: number of DDIM inverse steps ``K`` over the whole range (step ``T // K``).
        eta: scale of the Gaussian noise added after every step, ``eta * sqrt(var(s + step, s))``.
        generator: torch generator for the ``eta`` noise (reproducibility).
        steps_offset: grid offset (1 for SD / SDXL scheduler configs).
        initial_alpha_cumprod: ``abar`` used for a negative source; default ``alphas_cumprod[0]``.
        only_active: call ``noise_pred_fn`` on the still-active rows only (callback gets their indices).
        first_timestep: ``"authors"`` feeds the UNet the negative first source as is (``-99``), ``"zero"``
            clamps it to 0.

    Returns:
        ``zt``: the inverted latents ``(N, C, H, W)``; ``target``: ``(zt - sqrt(abar_t) z0) / sqrt(1 - abar_t)``.
    """
    if z0.dim() < 2:
        raise ValueError(f"z0 must be batched (N, ...), got shape {tuple(z0.shape)}")
    n = z0.shape[0]
    t = torch.as_tensor(t, device=z0.device).long().reshape(-1)
    if t.numel() != n:
        raise ValueError(f"t must have one timestep per sample ({n}), got {t.numel()}")
    num_train_timesteps = int(alphas_cumprod.shape[0])
    if n and (int(t.min()) < 0 or int(t.max()) >= num_train_timesteps):
        raise ValueError(f"t must lie in [0, {num_train_timesteps - 1}], got [{int(t.min())}, {int(t.max())}]")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if first_timestep not in FIRST_TIMESTEP_CHOICES:
        raise ValueError(f"first_timestep must be one of {FIRST_TIMESTEP_CHOICES}, got {first_timestep!r}")

    dtype = torch.promote_types(z0.dtype, torch.float32)
    abar = alphas_cumprod.detach().to(device=z0.device, dtype=dtype)
    if initial_alpha_cumprod is None:
        abar_init = abar[0]
    else:
        abar_init = torch.tensor(float(initial_alpha_cumprod), device=z0.device, dtype=dtype)
    step = num_train_timesteps // num_steps
    grid = inversion_grid(num_train_timesteps, num_steps, steps_offset).tolist()

    z0c = z0.detach().to(dtype)
    x = z0c.clone()
    bshape = (-1,) + (1,) * (z0.dim() - 1)
    for s in grid:
        active = t > s
        if not bool(active.any()):
            break  # the grid is increasing, so no later step is active either
        a_s = abar[s] if s >= 0 else abar_init
        a_next = abar[s + step]
        s_unet = max(s, 0) if first_timestep == "zero" else s
        if only_active:
            index = active.nonzero(as_tuple=True)[0]
            x_in = x[index]
            s_vec = torch.full((index.numel(),), s_unet, dtype=torch.long, device=z0.device)
            e = noise_pred_fn(x_in, s_vec, index).to(dtype)
        else:
            x_in = x
            s_vec = torch.full((n,), s_unet, dtype=torch.long, device=z0.device)
            e = noise_pred_fn(x_in, s_vec).to(dtype)
        # DDIM inverse step s -> s + step, written from alphas_cumprod.
        x0_pred = (x_in - (1 - a_s).sqrt() * e) / a_s.sqrt()
        x_new = a_next.sqrt() * x0_pred + (1 - a_next).sqrt() * e
        if eta > 0:
            # var(s', s) = (1 - abar_s)/(1 - abar_s') * (1 - abar_s'/abar_s), s' = s + step
            var = (1 - a_s) / (1 - a_next) * (1 - a_next / a_s)
            noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=_draw_device(generator, z0.device))
            noise = noise.to(z0.device)
            if only_active:
                noise = noise[index]
            x_new = x_new + eta * var.clamp_min(0).sqrt() * noise
        if only_active:
            x = x.index_copy(0, index, x_new)
        else:
            x = torch.where(active.reshape(bshape), x_new, x)

    abar_t = abar[t].reshape(bshape)
    target = (x - abar_t.sqrt() * z0c) / (1 - abar_t).sqrt()
    return x, target
