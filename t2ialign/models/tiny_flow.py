"""Tiny, randomly initialised SD3 / FLUX components of the real classes, built fully offline.

The rectified-flow counterparts of :mod:`t2ialign.models.tiny`: the same transformer, VAE, text
encoders, tokenizers and scheduler classes (and config conventions) as Stable Diffusion 3.5 and
FLUX.1-dev, only a few thousand times smaller, so the pipelines' own ``encode_prompt``, latent
packing and flow-matching schedule run unchanged in tests and in the toy world.

T5 has no vocabulary file we can ship, so :func:`build_t5_tokenizer` builds a real (tokenizers-backed
Unigram) ``T5Tokenizer`` from word pieces of the CLIP BPE vocabulary that open_clip ships, laid out
with T5's id conventions (pad 0, eos 1, unk 2, "▁" word starts, 100 sentinel ids at the end).
"""
from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from t2ialign.models.tiny import _vae, _clip_bpe_merges, _clip_text_config, build_clip_tokenizer, save_pipeline

# ---------------------------------------------------------------- released configs we mirror

# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json: the shift grows with the image size
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# vae/config.json of each: latents are (x - shift_factor) * scaling_factor
SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)

# ---------------------------------------------------------------- T5 tokenizer

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in every T5 vocabulary
T5_EXTRA_IDS = 100
T5_MAX_LENGTH = 77
# The first 8000 CLIP merges give ~7.8k word pieces: common English words ("circle", "left", "bottom")
# are single pieces, rarer ones split into sub-words, and the tokenizer builds in well under a second.
T5_NUM_MERGES = 8000
# Unigram scores: every piece costs about the same, so segmentation takes the fewest pieces (long
# words stay whole); the tiny rank term breaks ties towards frequent (early-merged) pieces.
_PIECE_SCORE, _RANK_SPREAD = -10.0, 0.1

_ASCII = [c for c in string.printable if not c.isspace()]
# Latin-1 letters/symbols as single pieces so accents tokenize (other scripts are <unk>, as in T5);
# 173 is the invisible soft hyphen.
_LATIN1 = [chr(i) for i in range(161, 256) if i != 173]


def _t5_pieces() -> list[str]:
    """Word pieces in CLIP's order: characters first, then merged tokens.

    CLIP marks word *ends* ("circle</w>"), SentencePiece word *starts* ("▁circle"): a word-final CLIP
    token becomes a "▁"-prefixed whole-word piece, any other token a bare continuation piece.
    """
    pieces = ["▁"]
    for char in _ASCII + _LATIN1:
        pieces += [char, "▁" + char]
    ascii_only = set(_ASCII)  # other CLIP merges are pieces of UTF-8 byte sequences, not characters
    for merge in _clip_bpe_merges()[:T5_NUM_MERGES]:
        token = "".join(merge.split())
        is_word = token.endswith("</w>")
        stem = token[: -len("</w>")] if is_word else token
        if set(stem) <= ascii_only:
            pieces.append("▁" + stem if is_word else stem)
    return list(dict.fromkeys(pieces))  # unique, first occurrence wins


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, score) pairs with T5's id layout: specials 0-2, pieces, then <extra_id_99>..<extra_id_0>."""
    pieces = _t5_pieces()
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)]
    vocab += [(piece, _PIECE_SCORE - _RANK_SPREAD * rank / len(pieces)) for rank, piece in enumerate(pieces)]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return vocab


def _t5_tokenizer_dir() -> Path:
    """A per-user cache directory holding the saved tokenizer (tokenizer.json, tokenizer_config.json)."""
    # Same cache root as tiny._clip_vocab_dir.
    root = Path(os.environ.get("T2IALIGN_CACHE", Path(tempfile.gettempdir()) / f"t2ialign-{os.getuid()}"))
    directory = root / f"t5_unigram_tokenizer_{T5_NUM_MERGES}"
    if not (directory / "tokenizer.json").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent))
        T5Tokenizer(vocab=t5_vocab(), extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH).save_pretrained(staging)
        try:  # whole-directory rename: concurrent builders never see a partial tokenizer
            os.rename(staging, directory)
        except OSError:  # another process got there first; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def build_t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """A real transformers T5 tokenizer (Unigram, T5 conventions) built offline; pads with id 0, ends with </s>."""
    return T5Tokenizer.from_pretrained(str(_t5_tokenizer_dir()), model_max_length=max_length)


# ---------------------------------------------------------------- shared pieces

def _t5_encoder(vocab_size: int, d_model: int, num_layers: int) -> T5EncoderModel:
    # t5-v1_1-xxl layout (SD3's text_encoder_3, FLUX's text_encoder_2): gated-GELU FFN, untied embeddings.
    num_heads = max(1, d_model // 16)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_model * 2,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _flow_vae(
    block_out_channels: Sequence[int], latent_channels: int, sample_size: int, factors: dict
) -> AutoencoderKL:
    # SD3/FLUX VAEs: no quant convs, and a shift as well as a scale on the latents.
    return _vae(block_out_channels, latent_channels, sample_size, use_quant_conv=False, use_post_quant_conv=False,
                **factors)


def _flux_rope_axes(attention_head_dim: int) -> tuple[int, int, int]:
    # FLUX.1 splits its 128 head channels as (16, 56, 56) over (text/index, row, column); each even.
    if attention_head_dim % 4:
        raise ValueError(f"FLUX attention_head_dim must be a multiple of 4, got {attention_head_dim}")
    first = 2 * max(1, attention_head_dim // 16)
    rest = attention_head_dim - first
    second = 2 * (rest // 4)
    return first, second, rest - second


# ---------------------------------------------------------------- builders

def tiny_sd3_components(
    *,
    seed: int = 0,
    sample_size: int = 8,
    patch_size: int = 2,
    num_layers: int = 2,
    attention_head_dim: int = 8,
    num_attention_heads: int = 4,
    pos_embed_max_size: int | None = None,
    dual_attention_layers: Sequence[int] = (0,),
    qk_norm: str | None = "rms_norm",
    latent_channels: int = 4,
    vae_block_out_channels: Sequence[int] = (16, 32, 32),
    text_hidden_sizes: Sequence[int] = (32, 32),
    text_projection_dims: Sequence[int] | None = None,
    text_num_layers: int = 2,
    t5_d_model: int | None = None,
    t5_num_layers: int = 2,
    tokenizer_max_length: int = 77,
    t5_max_length: int = T5_MAX_LENGTH,
) -> dict[str, object]:
    """Components of a StableDiffusion3Pipeline, tiny and random (deterministic given ``seed``).

    SD3.5-medium's layout: MMDiT with RMS qk-norm and dual attention in the first layers; the CLIP
    penultimate states (hidden sizes concatenated) are zero-padded to the T5 width, so
    ``joint_attention_dim = t5_d_model >= sum(text_hidden_sizes)``; the pooled embedding is the
    concatenation of both CLIP projections. ``sample_size`` is in latent pixels (the default image
    side is ``sample_size * 2 ** (len(vae_block_out_channels) - 1)``, 32 px by default).
    """
    hidden_1, hidden_2 = text_hidden_sizes
    proj_1, proj_2 = text_projection_dims or text_hidden_sizes
    t5_d_model = t5_d_model or hidden_1 + hidden_2
    if t5_d_model < hidden_1 + hidden_2:
        raise ValueError(
            f"SD3 pads the concatenated CLIP states ({hidden_1} + {hidden_2}) to the T5 width; "
            f"t5_d_model={t5_d_model} is smaller"
        )
    tokenizer_3 = build_t5_tokenizer(t5_max_length)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_d_model,
        caption_projection_dim=attention_head_dim * num_attention_heads,  # the context stream's width
        pooled_projection_dim=proj_1 + proj_2,
        # released SD3 checkpoints allow up to 3x (sd3-medium) the default token grid per side
        pos_embed_max_size=pos_embed_max_size or 3 * (sample_size // patch_size),
        dual_attention_layers=tuple(dual_attention_layers),
        qk_norm=qk_norm,
    )
    torch.manual_seed(seed + 1)
    vae = _flow_vae(vae_block_out_channels, latent_channels, sample_size, SD3_VAE_FACTORS)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(
        _clip_text_config(hidden_1, num_layers=text_num_layers, projection_dim=proj_1)
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(hidden_2, num_layers=text_num_layers, projection_dim=proj_2)
    )
    torch.manual_seed(seed + 4)
    text_encoder_3 = _t5_encoder(len(tokenizer_3), t5_d_model, t5_num_layers)
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        text_encoder_3=text_encoder_3.eval(),
        tokenizer=build_clip_tokenizer(tokenizer_max_length),
        tokenizer_2=build_clip_tokenizer(tokenizer_max_length, pad_token="!"),
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
    )


def tiny_flux_components(
    *,
    seed: int = 0,
    sample_size: int = 8,
    guidance_embeds: bool = True,
    num_layers: int = 1,
    num_single_layers: int = 2,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    axes_dims_rope: Sequence[int] | None = None,
    latent_channels: int = 4,
    vae_block_out_channels: Sequence[int] = (16, 32, 32),
    text_hidden_size: int = 32,
    text_num_layers: int = 2,
    t5_d_model: int = 32,
    t5_num_layers: int = 2,
    tokenizer_max_length: int = 77,
    t5_max_length: int = T5_MAX_LENGTH,
) -> dict[str, object]:
    """Components of a FluxPipeline, tiny and random (deterministic given ``seed``).

    FLUX.1-dev's layout: double- then single-stream blocks, 2x2 latent patches packed into channels
    (``in_channels = 4 * latent_channels``), RoPE over (index, row, column) axes that sum to the head
    dim, the CLIP pooled output as the pooled projection and T5 states as the context;
    ``guidance_embeds=True`` is the guidance-distilled dev model (False: schnell). ``sample_size`` (latent
    pixels) only sets the VAE's config: FluxPipeline's default image side is always 128 latent pixels,
    so pass height/width.
    """
    axes_dims_rope = tuple(axes_dims_rope or _flux_rope_axes(attention_head_dim))
    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(f"axes_dims_rope {axes_dims_rope} must sum to attention_head_dim={attention_head_dim}")
    tokenizer_2 = build_t5_tokenizer(t5_max_length)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_d_model,
        pooled_projection_dim=text_hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=axes_dims_rope,
    )
    torch.manual_seed(seed + 1)
    vae = _flow_vae(vae_block_out_channels, latent_channels, sample_size, FLUX_VAE_FACTORS)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(text_hidden_size, num_layers=text_num_layers))
    torch.manual_seed(seed + 3)
    text_encoder_2 = _t5_encoder(len(tokenizer_2), t5_d_model, t5_num_layers)
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_clip_tokenizer(tokenizer_max_length),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    )


def build_tiny_sd3_pipeline(output_dir, **kwargs) -> Path:
    """Save a tiny StableDiffusion3Pipeline as a standard diffusers directory (safetensors)."""
    return save_pipeline(tiny_sd3_components(**kwargs), output_dir)


def build_tiny_flux_pipeline(output_dir, **kwargs) -> Path:
    """Save a tiny FluxPipeline as a standard diffusers directory (safetensors)."""
    return save_pipeline(tiny_flux_components(**kwargs), output_dir)
