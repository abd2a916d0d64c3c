"""Prompt conditioning exactly as the diffusers SD / SDXL pipelines compute it, plus SDXL ``time_ids``.

Training must condition the UNet the same way sampling will, so ``encode_prompts`` reproduces
``StableDiffusionXLPipeline.encode_prompt`` / ``StableDiffusionPipeline.encode_prompt`` (clip_skip None)
and the tests check it against them.
SDXL: penultimate hidden states of both encoders concatenated on the feature axis, pooled output =
encoder 2's projected ``text_embeds``. SD1.x/2.x: last hidden state of the single encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class PromptEmbeddings:
    prompt_embeds: Tensor  # (N, 77, D)
    pooled_prompt_embeds: Optional[Tensor] = None  # (N, D2), SDXL only

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "PromptEmbeddings":
        pooled = self.pooled_prompt_embeds
        return PromptEmbeddings(fn(self.prompt_embeds), None if pooled is None else fn(pooled))

    def to(self, device=None, dtype=None) -> "PromptEmbeddings":
        return self._map(lambda tensor: tensor.to(device=device, dtype=dtype))

    def __getitem__(self, index) -> "PromptEmbeddings":
        return self._map(lambda tensor: tensor[index])

    def repeat(self, times: int) -> "PromptEmbeddings":
        """Whole-batch repeat ``[p1..pB, p1..pB]``: the winners-then-losers layout of a DPO batch."""
        return self._map(lambda tensor: torch.cat([tensor] * times, dim=0))

    @staticmethod
    def cat(parts: Sequence["PromptEmbeddings"]) -> "PromptEmbeddings":
        embeds = torch.cat([part.prompt_embeds for part in parts], dim=0)
        pooled = [part.pooled_prompt_embeds for part in parts]
        if any(p is None for p in pooled):
            if not all(p is None for p in pooled):
                raise ValueError("cannot concatenate SDXL embeddings (with pooled) and SD embeddings (without)")
            return PromptEmbeddings(embeds, None)
        return PromptEmbeddings(embeds, torch.cat(pooled, dim=0))


def _unpack(components_or_parts):
    """Accept a DiffusionComponents or a ``(text_encoders, tokenizers, is_sdxl)`` tuple."""
    if isinstance(components_or_parts, (tuple, list)):
        text_encoders, tokenizers, is_sdxl = components_or_parts
    else:
        text_encoders = components_or_parts.text_encoders
        tokenizers = components_or_parts.tokenizers
        is_sdxl = components_or_parts.is_sdxl
    if not text_encoders:
        raise ValueError("no text encoders loaded (load_components(..., load_text_encoders=True) is needed)")
    if len(text_encoders) != len(tokenizers):
        raise ValueError(f"{len(text_encoders)} text encoders but {len(tokenizers)} tokenizers")
    return list(text_encoders), list(tokenizers), bool(is_sdxl)


def _token_ids(tokenizer, prompts: list[str], device) -> tuple[Tensor, Optional[Tensor]]:
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def _encode_sdxl(text_encoders, tokenizers, prompts) -> PromptEmbeddings:
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids, _ = _token_ids(tokenizer, prompts, encoder.device)
        output = encoder(ids, output_hidden_states=True)
        # Only encoders with a projection return a 2-D first output (text_embeds); the last one wins.
        if output[0].ndim == 2:
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def _encode_sd(text_encoder, tokenizer, prompts) -> PromptEmbeddings:
    ids, attention_mask = _token_ids(tokenizer, prompts, text_encoder.device)
    # SD pipelines pass the mask only to encoders configured for it (not CLIP).
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    output = text_encoder(ids, attention_mask=attention_mask if use_mask else None)
    return PromptEmbeddings(output[0], None)


@torch.no_grad()
def encode_prompts(components_or_parts, prompts: list[str]) -> PromptEmbeddings:
    """Embed ``prompts`` for the UNet, identical to the diffusers pipelines' ``encode_prompt``."""
    text_encoders, tokenizers, is_sdxl = _unpack(components_or_parts)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if is_sdxl:
        return _encode_sdxl(text_encoders, tokenizers, prompts)
    return _encode_sd(text_encoders[0], tokenizers[0], prompts)


def make_time_ids(
    original_sizes: Tensor,
    crop_top_left: Tensor,
    target_size: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """SDXL micro-conditioning: rows of ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]``."""
    original_sizes = torch.as_tensor(original_sizes).reshape(-1, 2)
    crop_top_left = torch.as_tensor(crop_top_left).reshape(-1, 2)
    if original_sizes.shape[0] != crop_top_left.shape[0]:
        raise ValueError(f"{original_sizes.shape[0]} original sizes but {crop_top_left.shape[0]} crop offsets")
    target = torch.as_tensor(list(target_size), dtype=dtype).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.to(dtype), crop_top_left.to(dtype), target], dim=1)


TIME_IDS_MODES = ("measured", "fixed")  # data.time_ids


def sdxl_time_ids(
    mode: str,
    original_sizes: Tensor,
    crop_top_left: Tensor,
    resolution: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The SDXL ``time_ids`` a training image is conditioned on (``data.time_ids``), one row per image.

    ``"measured"``: ``[orig_h, orig_w, crop_top, crop_left, R, R]``, the decoded image's size and the crop
    offset (diffusers' ``train_text_to_image_sdxl.py``, MaPO). ``"fixed"``: ``[R, R, 0, 0, R, R]`` for every
    image whatever its size, as the released SDXL trainers of Diffusion-DPO, DCPO and DDIM-InPO hard-code.
    At inference the diffusers SDXL pipeline passes original = target = (height, width) and crop (0, 0)
    by default, so a square R x R generation is conditioned on ``[R, R, 0, 0, R, R]`` under both.
    The image path (training step) and the cache build both compute time_ids here.
    """
    if mode not in TIME_IDS_MODES:
        raise ValueError(f"data.time_ids: {mode!r} is not allowed; allowed: {', '.join(TIME_IDS_MODES)}")
    original_sizes = torch.as_tensor(original_sizes).reshape(-1, 2)
    crop_top_left = torch.as_tensor(crop_top_left).reshape(-1, 2)
    if mode == "fixed":
        original_sizes = torch.full_like(original_sizes, int(resolution))
        crop_top_left = torch.zeros_like(crop_top_left)
    return make_time_ids(original_sizes, crop_top_left, (int(resolution), int(resolution)), dtype=dtype)


def unet_conditioning(is_sdxl: bool, embeds: PromptEmbeddings, time_ids: Optional[Tensor] = None) -> dict:
    """Keyword arguments for ``unet(zt, t, **kwargs)``."""
    kwargs = {"encoder_hidden_states": embeds.prompt_embeds}
    if not is_sdxl:
        return kwargs
    if embeds.pooled_prompt_embeds is None or time_ids is None:
        raise ValueError("SDXL conditioning needs pooled prompt embeddings and time_ids")
    if time_ids.shape[0] != len(embeds):
        raise ValueError(f"{time_ids.shape[0]} time_ids rows for {len(embeds)} prompt embeddings")
    kwargs["added_cond_kwargs"] = {
        "text_embeds": embeds.pooled_prompt_embeds,
        "time_ids": time_ids.to(embeds.prompt_embeds.device),
    }
    return kwargs


def prompt_keep_mask(count: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Classifier-free-guidance dropout decisions: True where a prompt is kept (dropped with ``probability``).

    Drawn on the generator's device (the trainer's generators live on the GPU), so a caller that keeps the
    mask on the device never waits for the GPU.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"prompt drop probability must be in [0, 1], got {probability}")
    return torch.rand(count, generator=generator, device=generator.device) >= probability


def drop_prompts(prompts: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each prompt by "" with ``probability``; one draw per prompt (callers draw once per pair so
    winner and loser stay conditioned alike)."""
    keep = prompt_keep_mask(len(prompts), probability, generator).tolist()
    return [prompt if kept else "" for prompt, kept in zip(prompts, keep)]
