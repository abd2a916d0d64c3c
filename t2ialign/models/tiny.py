"""Tiny, randomly initialised SDXL / SD components of the real classes, built fully offline.

They are the test fixture and the toy world's starting point: same classes, same config keys and the
same conditioning paths (two text encoders, pooled embeddings, micro-conditioning) as the real models,
only a few thousand times smaller. The tokenizer is the real CLIP BPE vocabulary (shipped inside
open_clip), so prompts tokenize exactly like they do for the released checkpoints.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_MAX_LENGTH = 77

# Beta schedule shared by SD1.x, SD2.x and SDXL (their scheduler_config.json files).
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)


# ---------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    from open_clip.tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _clip_bpe_merges() -> list[str]:
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    # Same slice as open_clip's SimpleTokenizer: skip the header, keep 49152-256-2 merges.
    return lines[1 : 49152 - 256 - 2 + 1]


def _write_clip_vocab_files(directory: Path) -> None:
    merges = _clip_bpe_merges()
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _clip_vocab_dir() -> Path:
    """A per-user cache directory holding the HF-format vocab.json / merges.txt (written once)."""
    root = Path(os.environ.get("T2IALIGN_CACHE", Path(tempfile.gettempdir()) / f"t2ialign-{os.getuid()}"))
    directory = root / "clip_bpe_tokenizer"
    if not (directory / "merges.txt").exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Write into a private temp dir then rename, so concurrent builders never see half a file.
        staging = Path(tempfile.mkdtemp(dir=directory.parent))
        _write_clip_vocab_files(staging)
        for name in ("vocab.json", "merges.txt"):
            os.replace(staging / name, directory / name)
        staging.rmdir()
    return directory


def build_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP tokenizer, offline. SDXL's tokenizer_2 uses ``pad_token="!"`` (id 0)."""
    return CLIPTokenizer.from_pretrained(str(_clip_vocab_dir()), model_max_length=max_length, pad_token=pad_token)


# ---------------------------------------------------------------- text encoders

def _clip_text_config(hidden_size: int, *, num_layers: int, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        projection_dim=projection_dim or hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=1,
    )


def _down_up_block_types(num_blocks: int, cross_attention: Sequence[bool]) -> tuple[tuple, tuple]:
    down = tuple("CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in cross_attention)
    up = tuple("CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(cross_attention))
    assert len(down) == num_blocks
    return down, up


def _vae(block_out_channels: Sequence[int], latent_channels: int, sample_size: int, **extra) -> AutoencoderKL:
    """``extra``: further AutoencoderKL config (the SD3 / FLUX VAEs: no quant convs, a shift and a scale)."""
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, min(block_out_channels)),
        sample_size=sample_size * 2 ** (n - 1),
        **extra,
    )


def _head_counts(attention_head_dim, block_out_channels: Sequence[int]):
    # diffusers' "attention_head_dim" is really the number of heads; default: 16 channels per head.
    if attention_head_dim is not None:
        return attention_head_dim
    return tuple(max(1, channels // 16) for channels in block_out_channels)


def _cross_attention_flags(unet_block_out_channels: Sequence[int]) -> tuple[bool, ...]:
    # SDXL: no attention in the highest-resolution block; cross-attention in all the others.
    n = len(unet_block_out_channels)
    return (False,) + (True,) * (n - 1) if n > 1 else (True,)


# ---------------------------------------------------------------- builders

def tiny_sdxl_components(
    *,
    seed: int = 0,
    sample_size: int = 16,
    unet_block_out_channels: Sequence[int] = (32, 64),
    cross_attention_dim: int | None = None,
    text_hidden_sizes: Sequence[int] = (32, 32),
    text_num_layers: int = 2,
    vae_block_out_channels: Sequence[int] = (32, 64),
    latent_channels: int = 4,
    prediction_type: str = "epsilon",
    layers_per_block: int = 1,
    attention_head_dim: Sequence[int] | int | None = None,
    transformer_layers_per_block: Sequence[int] | int = 1,
    addition_time_embed_dim: int = 8,
) -> dict[str, object]:
    """Components of a StableDiffusionXLPipeline, tiny and random (deterministic given ``seed``).

    ``cross_attention_dim`` is the sum of the two encoders' hidden sizes (penultimate states are
    concatenated), and the pooled projection of encoder 2 feeds the text_time embedding, as in SDXL.
    """
    hidden_1, hidden_2 = text_hidden_sizes
    if cross_attention_dim is not None and cross_attention_dim != hidden_1 + hidden_2:
        raise ValueError(
            f"SDXL's cross_attention_dim is the sum of the text encoders' hidden sizes {tuple(text_hidden_sizes)}, "
            f"got {cross_attention_dim}"
        )
    down, up = _down_up_block_types(len(unet_block_out_channels), _cross_attention_flags(unet_block_out_channels))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(unet_block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=_head_counts(attention_head_dim, unet_block_out_channels),
        transformer_layers_per_block=transformer_layers_per_block,
        cross_attention_dim=hidden_1 + hidden_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + hidden_2,
        norm_num_groups=min(32, min(unet_block_out_channels)),
    )
    torch.manual_seed(seed + 1)
    vae = _vae(vae_block_out_channels, latent_channels, sample_size)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(hidden_1, num_layers=text_num_layers))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(hidden_2, num_layers=text_num_layers, projection_dim=hidden_2)
    )
    scheduler = EulerDiscreteScheduler(
        **SD_SCHEDULE,
        prediction_type=prediction_type,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        scheduler=scheduler,
    )


def tiny_sd_components(
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 16,
    unet_block_out_channels: Sequence[int] = (32, 64),
    text_hidden_size: int = 32,
    text_num_layers: int = 2,
    vae_block_out_channels: Sequence[int] = (32, 64),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    attention_head_dim: Sequence[int] | int | None = None,
) -> dict[str, object]:
    """Components of a StableDiffusionPipeline (SD1.x / 2.x layout: one encoder, no added embedding)."""
    n = len(unet_block_out_channels)
    down, up = _down_up_block_types(n, (True,) * (n - 1) + (False,))  # SD1.x: no attention at the bottom
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(unet_block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=_head_counts(attention_head_dim, unet_block_out_channels),
        cross_attention_dim=text_hidden_size,
        norm_num_groups=min(32, min(unet_block_out_channels)),
    )
    torch.manual_seed(seed + 1)
    vae = _vae(vae_block_out_channels, latent_channels, sample_size)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(text_hidden_size, num_layers=text_num_layers))
    scheduler = DDIMScheduler(
        **SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
    )


def pipeline_from_components(components: dict):
    """The diffusers pipeline matching ``components``.

    Flow families have a ``transformer``: SD3 with its third (T5) text encoder, FLUX otherwise; UNet
    families are SDXL when they have a second text encoder, SD1.x/2.x otherwise.
    """
    if "transformer" in components:
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        return (StableDiffusion3Pipeline if "text_encoder_3" in components else FluxPipeline)(**components)
    if "text_encoder_2" in components:
        return StableDiffusionXLPipeline(**components)
    sd = dict(components)
    sd.setdefault("safety_checker", None)
    sd.setdefault("feature_extractor", None)
    return StableDiffusionPipeline(**sd, requires_safety_checker=False)


def save_pipeline(components: dict, output_dir) -> Path:
    """Save as a standard diffusers pipeline directory (safetensors) loadable offline."""
    output_dir = Path(output_dir)
    pipeline_from_components(components).save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def build_tiny_sdxl_pipeline(output_dir, **kwargs) -> Path:
    return save_pipeline(tiny_sdxl_components(**kwargs), output_dir)


def build_tiny_sd_pipeline(output_dir, prediction_type: str = "epsilon", **kwargs) -> Path:
    return save_pipeline(tiny_sd_components(prediction_type=prediction_type, **kwargs), output_dir)
