"""``RLGTransformer``: the RL-guidance denoiser for the rectified-flow pipelines (SD3 / SD3.5, FLUX).

A drop-in ``transformer`` for ``StableDiffusion3Pipeline`` and ``FluxPipeline``: the pipelines call it with
keywords (``hidden_states=, timestep=, encoder_hidden_states=, pooled_projections=`` and FLUX's ``guidance=,
txt_ids=, img_ids=``), read ``config`` and ``dtype``, and FLUX enters ``cache_context(...)`` around each call.
The velocity is ``base + w * (aligned - base)`` per call (guidance/denoiser.py says why that is
``CFG(base) + w * (CFG(aligned) - CFG(base))`` for SD3's CFG and skip-layer guidance and FLUX's true CFG).
"""
from __future__ import annotations

import contextlib
import inspect

from .denoiser import RLGDenoiser, RLGError


class RLGTransformer(RLGDenoiser):
    """``base_out + w * (tuned_out - base_out)`` with the call signature of ``SD3Transformer2DModel`` /
    ``FluxTransformer2DModel``. Arguments as ``RLGDenoiser``'s (a LoRA: ``tuned=None`` on a transformer with
    peft adapters; a full aligned transformer: ``tuned``)."""

    _FORWARDED = ("config", "dtype", "device", "attn_processors", "peft_config", "_hf_hook", "encoder_hid_proj")
    # FLUX's positional ids are (sequence, 3), without a batch: never duplicate them (their length may equal n)
    _NOT_BATCHED = frozenset({"txt_ids", "img_ids"})
    _MODEL = "transformer"

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """FLUX names each call ("cond" / "uncond") for diffusers' caching hooks: pass it to every model run."""
        with contextlib.ExitStack() as stack:
            for model in self.models():
                if hasattr(model, "cache_context"):
                    stack.enter_context(model.cache_context(name, **kwargs))
            yield

    def _timestep(self, hidden_states, args, kwargs):
        if "timestep" in kwargs:
            return kwargs["timestep"]
        bound = inspect.signature(self.base.forward).bind_partial(hidden_states, *args, **kwargs)
        if "timestep" not in bound.arguments:
            raise RLGError(f"{type(self.base).__name__} was called without a timestep")
        return bound.arguments["timestep"]

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        timestep = self._timestep(hidden_states, args, kwargs)
        out = self._guided(hidden_states, timestep, (hidden_states, *args), kwargs)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
