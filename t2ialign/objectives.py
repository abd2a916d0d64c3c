"""Preference objectives: pure functions from per-sample denoising errors to a loss and metrics.

Inputs are the ELBO-surrogate errors of ``t2ialign.noising`` (mean over C,H,W), already split into
winners and losers. Nothing here knows about models, data or the training loop. Results keep the
input dtype, so fp64 inputs give fp64 results (used by the parity tests).

The trainer looks an objective up by name in ``OBJECTIVES``; the ``ObjectiveSpec`` says what the
objective needs (a reference model, per-image captions, DDIM-inverted latents), so the loop never
branches on the name itself. See docs/ALGORITHMS.md sections 1-4 and 6 for the math.
"""
from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar
    metrics: dict = field(default_factory=dict)  # name -> detached scalar tensor


def _tie_aware_accuracy(inside: Tensor) -> Tensor:
    """Fraction of pairs whose implicit reward prefers the winner; exact ties count as half."""
    return (inside > 0).to(inside.dtype).mean() + 0.5 * (inside == 0).to(inside.dtype).mean()


def dpo_loss(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float = 5000.0) -> ObjectiveOutput:
    """Diffusion-DPO (Wallace et al. 2023), as in the authors' released trainer.

    ``inside = -beta/2 * ((m_w - m_l) - (r_w - r_l))``, ``loss = -logsigmoid(inside).mean()``.
    At initialisation (policy == reference) the loss is ln 2 and d loss / d m_w_i = beta / (4B).
    """
    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "implicit_acc": _tie_aware_accuracy(inside.detach()),
        "reward_margin": inside.detach().mean(),
        "model_err_w": model_err_w.detach().mean(),
        "model_err_l": model_err_l.detach().mean(),
        "ref_err_w": ref_err_w.detach().mean(),
        "ref_err_l": ref_err_l.detach().mean(),
    }
    return ObjectiveOutput(loss, metrics)


def _bounded_link(x: Tensor) -> Tensor:
    """f(x) = x / (exp(x) - 1), computed without 0/0 at x = 0 or overflow for large x.

    The literal form (MaPO's reference code) is NaN at exactly 0 and its gradient overflows for
    x > ~88 in fp32. Here: ``expm1`` away from 0 (same value to rounding), the series
    1 - x/2 + x^2/12 - x^4/720 for |x| < 1e-3 (truncation error < 1e-18, below fp64 rounding), and
    x * exp(-x) / (1 - exp(-x)) for x > 20, which is the same function rewritten to avoid inf/inf.
    """
    small = x.abs() < 1e-3
    large = x > 20.0
    safe_mid = torch.where(small | large, torch.ones_like(x), x)
    mid = safe_mid / torch.expm1(safe_mid)
    series = 1.0 - x / 2.0 + x * x / 12.0 - x**4 / 720.0
    safe_large = torch.where(large, x, torch.full_like(x, 21.0))
    tail = safe_large * torch.exp(-safe_large) / (-torch.expm1(-safe_large))
    return torch.where(small, series, torch.where(large, tail, mid))


def mapo_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> ObjectiveOutput:
    """MaPO (Hong et al. 2024): reference-free, margin-aware preference optimisation.

    ``loss = mean(m_w) - beta * mean(logsigmoid(T * (f(a m_w) - f(a m_l))))`` with
    ``f(x) = x / (exp(x) - 1)`` (``a = snr_value``, ``T = num_train_timesteps``).
    For small errors ``T * margin ~ 250 * (m_l - m_w)``: a reference-free DPO with beta ~ 250.

    Difference from the literal reference form: the authors' code evaluates ``x / (exp(x) - 1)``
    literally, which is NaN (0/0) at exactly zero error and has an overflowing (NaN) gradient once
    ``exp(x)`` overflows (``x > ~88`` in fp32, ``~709`` in fp64). ``_bounded_link`` instead uses
    ``x / expm1(x)`` for ``1e-3 <= |x| <= 20`` (equal to the literal form up to rounding, and more
    accurate than it for small ``x`` where ``exp(x) - 1`` cancels), the series
    ``1 - x/2 + x^2/12 - x^4/720`` for ``|x| < 1e-3`` (truncation error below ``x^6/30240 < 4e-23``),
    and ``x exp(-x) / (1 - exp(-x))`` for ``x > 20`` (an exact rewrite). So where the literal form is
    finite the values agree to floating-point rounding; where it is NaN this gives the limits
    ``f(0) = 1``, ``f'(0) = -1/2`` and ``f -> 0``, ``f' -> 0`` for huge errors.

    Metrics: ``win_score = mean f(a m_w)``, ``lose_score = mean f(a m_l)``, ``margin_loss`` (the
    ``-beta * mean logsigmoid`` term), ``implicit_acc`` (winner scores higher; ties count half).
    """
    win_score = _bounded_link(snr_value * model_err_w)
    lose_score = _bounded_link(snr_value * model_err_l)
    margin = win_score - lose_score
    margin_loss = -beta * F.logsigmoid(num_train_timesteps * margin).mean()
    loss = model_err_w.mean() + margin_loss
    metrics = {
        "win_score": win_score.detach().mean(),
        "lose_score": lose_score.detach().mean(),
        "margin_loss": margin_loss.detach(),
        "implicit_acc": _tie_aware_accuracy(margin.detach()),
        "model_err_w": model_err_w.detach().mean(),
        "model_err_l": model_err_l.detach().mean(),
    }
    return ObjectiveOutput(loss, metrics)


def sft_loss(model_err_w: Tensor, model_err_l: Optional[Tensor] = None) -> ObjectiveOutput:
    """Supervised fine-tuning on the preferred image only (the "SFT-chosen" baseline)."""
    loss = model_err_w.mean()
    return ObjectiveOutput(loss, {"model_err_w": model_err_w.detach().mean()})


@dataclass(frozen=True)
class ObjectiveSpec:
    """How the trainer must feed an objective; the loop reads these flags, never the name."""

    name: str
    fn: Callable[..., ObjectiveOutput]
    needs_reference: bool = True  # a frozen reference UNet (or adapters disabled, for LoRA)
    per_image_captions: bool = False  # DCPO: each image conditioned on its own caption
    uses_inversion: bool = False  # DDIM-InPO: zt from DDIM inversion with the policy
    uses_loser: bool = True  # SFT trains on winners only
    description: str = ""
    # settings read by the trainer rather than the loss (e.g. InPO's inversion steps), with defaults
    trainer_params: dict = field(default_factory=dict)
    # defaults that differ for rectified-flow models (velocity errors; docs/FLOW.md section 2)
    flow_defaults: dict = field(default_factory=dict)

    @property
    def loss_param_names(self) -> tuple:
        skip = {"model_err_w", "model_err_l", "ref_err_w", "ref_err_l"}
        return tuple(p for p in inspect.signature(self.fn).parameters if p not in skip)

    @property
    def param_names(self) -> tuple:
        return self.loss_param_names + tuple(self.trainer_params)

    @property
    def defaults(self) -> dict:
        sig = inspect.signature(self.fn).parameters
        return {**{name: sig[name].default for name in self.loss_param_names}, **self.trainer_params}

    def __call__(self, model_err_w, model_err_l, ref_err_w=None, ref_err_l=None, **params) -> ObjectiveOutput:
        params = {k: v for k, v in params.items() if k not in self.trainer_params}
        if self.needs_reference:
            if ref_err_w is None or ref_err_l is None:
                raise ValueError(f"objective '{self.name}' needs the reference model's errors")
            return self.fn(model_err_w, model_err_l, ref_err_w, ref_err_l, **params)
        return self.fn(model_err_w, model_err_l, **params)


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add an objective to the registry (also how users plug in their own)."""
    OBJECTIVES[spec.name] = spec
    return spec


# Flow-DPO's released code (flow_grpo config/dpo.py) trains SD3.5 with beta 100 on mean velocity errors: the same
# loss and reduction as dpo_loss; 5000 (SDXL's) would be ~9x stronger in epsilon-equivalent terms (docs/FLOW.md 2)
FLOW_DPO_BETA = 100.0

register_objective(ObjectiveSpec("dpo", dpo_loss, description="Diffusion-DPO (Wallace et al. 2023)",
                                 flow_defaults={"beta": FLOW_DPO_BETA}))
register_objective(ObjectiveSpec("mapo", mapo_loss, needs_reference=False, description="MaPO, reference-free (Hong et al. 2024)"))
register_objective(
    ObjectiveSpec("dcpo", dpo_loss, per_image_captions=True, description="DCPO: DPO with each image conditioned on its own caption",
                  flow_defaults={"beta": FLOW_DPO_BETA})
)
register_objective(
    ObjectiveSpec(
        "inpo", dpo_loss, uses_inversion=True, description="DDIM-InPO: DPO at DDIM-inverted latents",
        trainer_params={"inversion_steps": 10, "inversion_eta": 0.1, "inversion_first_timestep": "authors"},
    )
)
register_objective(ObjectiveSpec("sft", sft_loss, needs_reference=False, uses_loser=False, description="SFT on the preferred image"))


def get_objective(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"objective.name: unknown objective '{name}'{hint}; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def objective_params(spec: ObjectiveSpec, beta: Optional[float], params: dict, flow: bool = False) -> dict:
    """Merge the objective's defaults (its flow defaults for a rectified-flow model), a config ``beta`` and extra
    params into call kwargs."""
    merged = {**spec.defaults, **(spec.flow_defaults if flow else {})}
    unknown = sorted(set(params) - set(spec.param_names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(spec.param_names), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"objective.params.{unknown[0]}: not a parameter of '{spec.name}'{hint}; "
            f"allowed: {', '.join(spec.param_names) or '(none)'}"
        )
    if beta is not None:
        if "beta" not in merged:
            raise ValueError(f"objective.beta: '{spec.name}' has no beta parameter; remove the key")
        merged["beta"] = float(beta)
    merged.update(params)
    return merged


LN2 = math.log(2.0)
