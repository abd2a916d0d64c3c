"""``RLGDenoiser``: what the RL-guidance wrappers share, whatever the denoiser (UNet or flow transformer).

RLG (docs/ALGORITHMS.md section 5) mixes the CFG predictions of the base and the aligned model::

    pred = CFG_g(base) + w * (CFG_g(tuned) - CFG_g(base))

Every guidance the diffusers pipelines apply to the model outputs (two-branch CFG on ``[uncond; cond]``,
FLUX's true CFG over two calls, SD3's skip-layer guidance over an extra call) is a linear combination of
the denoiser's outputs at one step, so mixing each call's raw outputs, ``base_out + w * (tuned_out -
base_out)``, and letting the pipeline combine them gives exactly this, each model with its own branches.
That holds for any scheduler and for epsilon, v and flow (velocity) predictions, but not with
``guidance_rescale > 0`` (non-linear), which the wrapper refuses. A guidance-distilled model (FLUX.1-dev:
the guidance scale is an input, one call per step) mixes its distilled-guided velocities the same way.

Two kinds of aligned model:
* a full model (``tuned`` is another module): two sequential forwards per step;
* a LoRA on the base (``tuned=None``; base = the same model with its adapters off): by default ONE forward
  on the batch duplicated, ``[x; x]``, where forward hooks on every peft ``lora_B`` multiply the adapter's
  output by a per-sample mask (0 for the base half, 1 for the tuned half). ``batched=False`` (or a CUDA
  out-of-memory error in the batched forward) uses two sequential forwards instead.

``w == 0`` and ``w == 1`` run a single model. ``w`` may follow a per-step schedule: the step index is the
position of the current timestep among the pipeline scheduler's distinct timesteps (so a Heun-type
scheduler evaluating twice at the same timestep uses the same ``w``); the wrapper finds the scheduler
through the pipeline it was attached to (``attach``, done by ``make_rlg_pipeline``).

Subclasses (``RLGUNet``, ``RLGTransformer``) give the call signature, the output type and the attributes of
the wrapped model that their pipelines read.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Optional, Sequence

import torch
from torch import nn

from t2ialign.errors import UserFacingError

logger = logging.getLogger(__name__)


class RLGError(UserFacingError):
    """A setting under which RL guidance would not compute what it promises."""


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _maskable(layers) -> tuple[bool, str]:
    """Whether every LoRA layer computes ``result + lora_B(lora_A(dropout(x))) * scaling`` (plain LoRA on a
    Linear / Conv layer), so that masking ``lora_B``'s output per sample removes the adapter per sample."""
    from peft.tuners.lora.layer import Linear, _ConvNd

    for layer in layers:
        if not isinstance(layer, (Linear, _ConvNd)):
            return False, f"{type(layer).__name__} LoRA layers"
        if getattr(layer, "lora_variant", None):
            return False, "LoRA variants (DoRA, ...)"
    return True, ""


@contextlib.contextmanager
def _adapters_enabled(layers, enabled: bool):
    """Inside, these LoRA layers are all on (``enabled``) or all off; the previous state comes back.
    (Sets peft's flag directly: ``enable_adapters`` would also flip ``requires_grad`` of the adapter weights.)"""
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = not enabled
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was


class _LoraMask:
    """Forward hooks on every ``lora_B`` multiplying its output by a per-sample mask (batch on dim 0).

    The hooks stay registered (a no-op while ``mask`` is None), so a torch.compile'd model sees stable hooks."""

    def __init__(self, layers):
        self.mask: Optional[torch.Tensor] = None
        self.handles = [b.register_forward_hook(self._hook) for layer in layers for b in layer.lora_B.values()]

    def _hook(self, module, args, output):
        mask = self.mask
        if mask is None:
            return None
        if output.shape[0] != mask.shape[0]:
            raise RuntimeError(f"LoRA output batch {output.shape[0]} != mask batch {mask.shape[0]}: a LoRA layer "
                               "does not keep the batch on dim 0; use batched=False")
        return output * mask.view(-1, *([1] * (output.ndim - 1))).to(output.dtype)

    @contextlib.contextmanager
    def applied(self, mask: torch.Tensor):
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _duplicate(value: Any, n: int) -> Any:
    """``[v; v]`` for every tensor with batch ``n`` on dim 0 (recursing into dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.ndim > 0 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _duplicate(v, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_duplicate(v, n) for v in value)
    return value


class RLGDenoiser(nn.Module):
    """``base_out + w * (tuned_out - base_out)`` around a diffusers denoiser (subclasses give its signature).

    Args:
        base: the base model (for a LoRA: the model carrying the adapter; base = adapters off).
        tuned: the aligned full model, or ``None`` (or ``base`` itself) for a LoRA on ``base``.
        w: the guidance scale (0 = base, 1 = aligned, > 1 extrapolates); settable between calls.
        schedule: optional per-step scales (one per distinct scheduler timestep) overriding ``w``.
        batched: LoRA only: base and adapted branches in one forward on the duplicated batch.
    """

    # attributes of the base model the pipelines (and users) may read through the wrapper
    _FORWARDED: tuple = ("config", "dtype", "device", "attn_processors", "peft_config", "_hf_hook")
    # keyword inputs that carry no batch dimension (never duplicated for the batched LoRA forward)
    _NOT_BATCHED: frozenset = frozenset()
    _MODEL = "denoiser"  # how messages name the wrapped model

    def __init__(self, base: nn.Module, tuned: Optional[nn.Module] = None, w: float = 1.0,
                 schedule: Optional[Sequence[float]] = None, batched: bool = True):
        super().__init__()
        self.base = base
        self.is_lora = tuned is None or tuned is base
        if self.is_lora:
            layers = _lora_layers(base)
            if not layers:
                raise RLGError(f"RL guidance with tuned=None needs a {self._MODEL} with LoRA adapters (a LoRA directory "
                               f"or add_lora); for a full aligned {self._MODEL} pass it as `tuned`")
            if any(getattr(layer, "merged", False) for layer in layers):
                raise RLGError("the LoRA is fused into the base weights (fuse_lora); unfuse it for RL guidance, "
                               "which needs the base with the adapter off")
            ok, why = _maskable(layers)
            if batched and not ok:
                logger.warning("RLG: %s cannot be masked per sample; evaluating base and LoRA sequentially", why)
            self._lora_layers = layers
            self._lora_mask = _LoraMask(layers) if ok else None
            self.batched = bool(batched and ok)
        else:
            self.tuned = tuned
            self._lora_layers = []
            self._lora_mask = None
            self.batched = False
        self.w = float(w)
        self.schedule = [float(x) for x in schedule] if schedule is not None else None
        self.last_w: Optional[float] = None
        self._pipe = None
        self._steps_cache: tuple = (None, None)
        self._masks: dict = {}

    # ------------------------------------------------------------------ what the pipelines read
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        base = self._modules.get("base")
        if base is None or name not in self._FORWARDED:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r} (it forwards {', '.join(self._FORWARDED)} from the "
                f"base {self._MODEL}; call other {self._MODEL} methods on .base / .tuned)")
        return getattr(base, name)

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def config(self):
        return self.base.config

    def remove_hooks(self) -> None:
        """Take the LoRA mask hooks off the (shared) model; the wrapper then evaluates LoRA branches sequentially."""
        if self._lora_mask is not None:
            self._lora_mask.remove()
            self._lora_mask = None
        self.batched = False

    @property
    def tuned_model(self) -> nn.Module:
        return self.base if self.is_lora else self.tuned

    def models(self) -> list:
        """The distinct modules the wrapper runs (one for a LoRA, two for a full aligned model)."""
        return [self.base] if self.is_lora else [self.base, self.tuned]

    def attach(self, pipe) -> "RLGDenoiser":
        """Remember the pipeline (weakly): its scheduler maps timesteps to steps, its ``guidance_rescale`` is checked."""
        self._pipe = weakref.ref(pipe)
        return self

    @property
    def pipeline(self):
        return self._pipe() if self._pipe is not None else None

    # ------------------------------------------------------------------ w per step
    def step_index(self, timestep) -> int:
        """Position of ``timestep`` among the attached pipeline scheduler's distinct timesteps."""
        pipe = self.pipeline
        if pipe is None:
            raise RLGError("an RLG schedule needs the pipeline's scheduler: call attach(pipe) on the RLG wrapper "
                           "(make_rlg_pipeline does)")
        timesteps = pipe.scheduler.timesteps
        key, index = self._steps_cache
        if key is None or key[0] is not timesteps:
            index = {}
            for t in timesteps.detach().cpu().tolist():
                index.setdefault(float(t), len(index))
            self._steps_cache = ((timesteps,), index)
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if t not in index:
            raise RLGError(f"timestep {t} is not one of the scheduler's timesteps; the RLG schedule cannot be "
                           "mapped to a step (set the wrapper's w yourself, e.g. from callback_on_step_end)")
        if self.schedule is not None and len(index) != len(self.schedule):
            raise RLGError(f"rlg schedule has {len(self.schedule)} values but the scheduler runs {len(index)} steps; "
                           "give one value per inference step")
        return index[t]

    def _scheduler_timestep(self, timestep):
        """The scheduler's own timestep of this call. Pipelines that rescale it for the model (FLUX feeds
        ``t / 1000`` in the latents' dtype, where bf16 merges neighbouring steps) record the exact one in
        ``_current_timestep``; the others pass it unchanged."""
        current = getattr(self.pipeline, "_current_timestep", None)
        return current if current is not None else timestep

    def current_w(self, timestep) -> float:
        if self.schedule is None:
            return self.w
        return self.schedule[self.step_index(self._scheduler_timestep(timestep))]

    # ------------------------------------------------------------------ forward
    def _check_linear(self) -> None:
        pipe = self.pipeline
        rescale = float(getattr(pipe, "_guidance_rescale", 0.0) or 0.0) if pipe is not None else 0.0
        if rescale > 0:
            pipe._guidance_rescale = 0.0  # the pipeline sets it anew each call; don't let a refused call linger
            raise RLGError(f"guidance_rescale={rescale} is not linear in the model outputs, so RL guidance would not "
                           "equal CFG(base) + w * (CFG(tuned) - CFG(base)); use guidance_rescale=0")

    def _mask(self, n: int, device, dtype) -> torch.Tensor:
        key = (n, device, dtype)
        if key not in self._masks:
            self._masks[key] = torch.cat([torch.zeros(n), torch.ones(n)]).to(device=device, dtype=dtype)
        return self._masks[key]

    def _run(self, model, lora_on: Optional[bool], args, kwargs) -> torch.Tensor:
        ctx = _adapters_enabled(self._lora_layers, lora_on) if lora_on is not None else contextlib.nullcontext()
        with ctx:
            return model(*args, **kwargs, return_dict=False)[0]

    def _duplicated(self, args, kwargs, n: int) -> tuple:
        kwargs = {k: v if k in self._NOT_BATCHED else _duplicate(v, n) for k, v in kwargs.items()}
        return _duplicate(args, n), kwargs

    def _both(self, sample, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_lora and self.batched and self._lora_mask is not None:
            n = sample.shape[0]
            try:
                with self._lora_mask.applied(self._mask(n, sample.device, sample.dtype)):
                    out = self._run(self.base, True, *self._duplicated(args, kwargs, n))
                return out[:n], out[n:]
            except torch.cuda.OutOfMemoryError:
                logger.warning("RLG: out of memory in the batched LoRA forward; switching to sequential evaluation")
                self.batched = False
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if self.is_lora:
            return self._run(self.base, False, args, kwargs), self._run(self.base, True, args, kwargs)
        return self._run(self.base, None, args, kwargs), self._run(self.tuned, None, args, kwargs)

    def _guided(self, sample: torch.Tensor, timestep, args: tuple, kwargs: dict) -> torch.Tensor:
        """The mixed prediction for the model call ``model(*args, **kwargs)`` whose input is ``sample``."""
        self._check_linear()
        w = self.current_w(timestep)
        self.last_w = w
        if w == 0.0:
            return self._run(self.base, False if self.is_lora else None, args, kwargs)
        if w == 1.0:
            return self._run(self.tuned_model, True if self.is_lora else None, args, kwargs)
        base_out, tuned_out = self._both(sample, args, kwargs)
        return (base_out.float() + w * (tuned_out.float() - base_out.float())).to(base_out.dtype)
