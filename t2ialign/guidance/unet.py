"""``RLGUNet``: the RL-guidance denoiser, a drop-in ``unet`` for the diffusers SD / SDXL pipelines.

The mixing, the LoRA batching and the per-step schedules are ``RLGDenoiser``'s (guidance/denoiser.py);
this class gives it ``UNet2DConditionModel``'s call signature and output.
"""
from __future__ import annotations

from torch import nn

from .denoiser import RLGDenoiser, RLGError  # noqa: F401  (RLGError: historical import path)


class RLGUNet(RLGDenoiser):
    """``base_out + w * (tuned_out - base_out)`` with the call signature of ``UNet2DConditionModel``.

    Args:
        base: the base UNet (for a LoRA: the UNet carrying the adapter; base = adapters off).
        tuned: the aligned full UNet, or ``None`` (or ``base`` itself) for a LoRA on ``base``.
        w: the guidance scale (0 = base, 1 = aligned, > 1 extrapolates); settable between calls.
        schedule: optional per-step scales (one per distinct scheduler timestep) overriding ``w``.
        batched: LoRA only: base and adapted branches in one forward on the duplicated batch.
    """

    _FORWARDED = ("config", "add_embedding", "encoder_hid_proj", "time_embedding", "conv_in", "dtype", "device",
                  "attn_processors", "peft_config", "_hf_hook")
    _MODEL = "UNet"

    @property
    def tuned_unet(self) -> nn.Module:
        return self.tuned_model

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        out = self._guided(sample, timestep, (sample, timestep, encoder_hidden_states, *args), kwargs)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)
