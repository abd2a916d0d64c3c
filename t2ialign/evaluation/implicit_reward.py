"""Implicit-reward preference accuracy (Diffusion-DPO paper, Table 2), the pure part.

For a policy p and reference r, Diffusion-DPO's implicit reward of an image x for prompt c is
(up to the positive factor beta * T)::

    R(c, x) = E_{t, eps} [ ||eps - eps_ref(x_t, t, c)||^2 - ||eps - eps_p(x_t, t, c)||^2 ]

i.e. how much the policy lowered the denoising error relative to the reference. On a held-out
preference pair (x_w preferred over x_l) the model is "right" when R(c, x_w) > R(c, x_l), i.e. when::

    margin = (ref_err_w - pol_err_w) - (ref_err_l - pol_err_l) > 0

Accuracy = (#margin > 0 + 0.5 * #margin == 0) / N (ties count half, as in the win rate).

How it plugs in: the trainer's noising + per-sample error code (same shared eps and t for winner and
loser, as in training) produces, for each held-out pair, tensors of per-sample MSEs of the policy and the
reference (with several (t, eps) draws per pair, shape (N, K): averaged over K here). Pass those four
tensors to ``implicit_reward_accuracy``; the DPO-SDXL paper figure on Pick-a-Pic v2 validation is 72.0%
(PickScore as a classifier on the same pairs: 64.2%, computed with ``preference_accuracy``).
"""
from __future__ import annotations

import numpy as np
import torch

from .stats import bootstrap_mean


def _per_pair(x) -> np.ndarray:
    t = torch.as_tensor(x).detach().double().cpu()
    if t.ndim > 1:
        t = t.reshape(t.shape[0], -1).mean(dim=1)
    return t.numpy()


def implicit_reward_margin(policy_err_w, policy_err_l, ref_err_w, ref_err_l) -> np.ndarray:
    """R(x_w) - R(x_l) per pair (errors of shape (N,) or (N, K): averaged over the K draws)."""
    pw, pl, rw, rl = (_per_pair(x) for x in (policy_err_w, policy_err_l, ref_err_w, ref_err_l))
    if not (pw.shape == pl.shape == rw.shape == rl.shape):
        raise ValueError(f"error arrays disagree in length: {pw.shape}, {pl.shape}, {rw.shape}, {rl.shape}")
    return (rw - pw) - (rl - pl)


def _accuracy(margin: np.ndarray, n_boot: int, ci: float, seed: int) -> dict:
    o = np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))
    iv = bootstrap_mean(o, n_boot=n_boot, ci=ci, seed=seed)
    return {"accuracy": iv.estimate, "low": iv.low, "high": iv.high, "n": iv.n, "ties": int((o == 0.5).sum())}


def implicit_reward_accuracy(policy_err_w, policy_err_l, ref_err_w, ref_err_l, n_boot: int = 1000, ci: float = 0.95,
                             seed: int = 0) -> dict:
    """``{"accuracy", "low", "high", "n", "ties"}`` of the implicit reward on preference pairs."""
    return _accuracy(implicit_reward_margin(policy_err_w, policy_err_l, ref_err_w, ref_err_l), n_boot, ci, seed)


def preference_accuracy(score_w, score_l, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Accuracy of a reward model (e.g. PickScore) on the same pairs: score(x_w) > score(x_l)."""
    return _accuracy(_per_pair(score_w) - _per_pair(score_l), n_boot, ci, seed)
