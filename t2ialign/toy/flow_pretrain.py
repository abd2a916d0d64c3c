"""Pretrain a tiny StableDiffusion3Pipeline on the toy world with rectified flow, save it, cache it.

The flow counterpart of ``toy.pretrain``: the same world, VAE and CLIP text stack, a different denoiser.
  * the VAE is the SDXL toy base's trained one (``pretrain.get_toy_pipeline``), given SD3's latent
    normalisation: ``shift_factor`` = the latents' mean and ``scaling_factor`` = 1 / their std, as SD3
    chose its 0.0609 / 1.5305, so the transformer sees zero-mean unit-variance latents;
  * the two CLIP encoders and tokenizers are the SDXL toy's (encoder 1 as CLIPTextModelWithProjection,
    the class SD3 pools from, its projection seeded), and a tiny T5 (``models.tiny_flow``) joins them;
    all stay frozen at their weights, as SD3's do;
  * only the SD3Transformer2DModel trains: z = (1 - s) x0 + s eps, target eps - x0, s from the
    FlowMatchEulerDiscreteScheduler's sigma table at logit-normal indices (``t2ialign.flow_noising``,
    the preference trainer's own draw), 10% of captions dropped to "" for classifier-free guidance, EMA.

T5 reads ``T5_LENGTH`` tokens (the toy captions' CLIP length) instead of SD3's 256: its padding would
otherwise be 94% of the joint-attention sequence and make every step ~8x dearer. Sampling and preference
training must pass ``max_sequence_length=T5_LENGTH`` too (``toy_info.json`` records it).

The result is cached under ``$T2IALIGN_CACHE/toy/sd3-<hash>``; the hash covers the world, the SDXL toy
base it reuses and the settings here.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from t2ialign.toy import world
from t2ialign.toy.pretrain import (
    INFO_FILE,
    TOKEN_LENGTH,
    PretrainConfig,
    ProgressFn,
    _cosine_lr,
    update_with_ema,
    _log_progress,
    _set_lr,
    cache_root,
    encode_images,
    get_toy_pipeline,
    is_complete,
)

logger = logging.getLogger(__name__)

FLOW_PRETRAIN_VERSION = 1  # bump when the procedure changes in a way the settings do not show
FAMILY = "sd3"
T5_LENGTH = TOKEN_LENGTH  # T5 tokens: toy captions are short; SD3's default 256 would be mostly padding


@dataclass
class FlowModelConfig:
    """The toy transformer (``models.tiny_flow.tiny_sd3_components``) and its scheduler."""

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    dual_attention_layers: tuple = (0,)  # SD3.5's MMDiT-X layout in the first block
    t5_num_layers: int = 2
    shift: float = 3.0  # the FlowMatchEulerDiscreteScheduler shift, as SD3.5's scheduler_config


@dataclass
class FlowPretrainConfig:
    model: FlowModelConfig = field(default_factory=FlowModelConfig)
    base: PretrainConfig = field(default_factory=PretrainConfig)  # the SDXL toy whose VAE and text stack are reused
    num_images: int = 8192
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    logit_mean: float = 0.0  # timestep density: diffusers' SD3 training-script defaults
    logit_std: float = 1.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.99
    seed: int = 0

    def with_steps(self, steps: int) -> "FlowPretrainConfig":
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return replace(self, steps=steps)

    def cache_key(self) -> str:
        settings = {"world": world.WORLD_VERSION, "flow_pretrain": FLOW_PRETRAIN_VERSION, **asdict(self),
                    "base": self.base.cache_key()}
        blob = json.dumps(settings, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def build_components(cfg: FlowPretrainConfig, base_dir: Path) -> dict:
    """StableDiffusion3Pipeline components: tiny_flow's transformer / T5, the SDXL toy's VAE and CLIP stack."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from t2ialign.models.tiny_flow import tiny_sd3_components

    model = cfg.model
    vae_config = _base_config(base_dir, "vae")
    clip = [_base_config(base_dir, name) for name in ("text_encoder", "text_encoder_2")]
    components = tiny_sd3_components(  # the transformer's text widths follow the reused CLIP encoders
        seed=cfg.seed, sample_size=world.RESOLUTION // 2 ** (len(vae_config["block_out_channels"]) - 1),
        latent_channels=vae_config["latent_channels"], num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, attention_head_dim=model.attention_head_dim,
        dual_attention_layers=model.dual_attention_layers, t5_num_layers=model.t5_num_layers,
        text_hidden_sizes=[c["hidden_size"] for c in clip], text_projection_dims=[c["projection_dim"] for c in clip],
        tokenizer_max_length=TOKEN_LENGTH, t5_max_length=T5_LENGTH,
    )
    components.update(
        vae=AutoencoderKL.from_pretrained(base_dir / "vae").eval(),
        text_encoder=_with_projection(CLIPTextModel.from_pretrained(base_dir / "text_encoder"), cfg.seed + 5),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base_dir / "text_encoder_2").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(base_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(base_dir / "tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config, shift=model.shift),
    )
    return components


def _with_projection(encoder, seed: int):
    """The SDXL toy's CLIPTextModel as the CLIPTextModelWithProjection SD3 pools from: the same text transformer,
    plus a seeded projection (SDXL's first encoder has none)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    projected = CLIPTextModelWithProjection(encoder.config)
    projected.text_model.load_state_dict(encoder.state_dict())
    return projected.eval()


def _base_config(base_dir: Path, component: str) -> dict:
    return json.loads((base_dir / component / "config.json").read_text())


def normalise_vae(vae, means: Tensor) -> tuple[float, float]:
    """SD3's latent normalisation from the data: ``(z - shift) * scale`` has mean 0 and std 1."""
    shift, scale = float(means.mean()), float(1.0 / means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


@torch.no_grad()
def caption_embedding_table(components: dict, captions: list[str]):
    """Every distinct caption's SD3 conditioning, by the pipeline's own ``encode_prompt`` (encoders frozen)."""
    from t2ialign.models.text_encoding import PromptEmbeddings
    from t2ialign.models.tiny import pipeline_from_components

    pipe = pipeline_from_components(components)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device="cpu",
                                              do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
    return PromptEmbeddings(embeds, pooled)


def train_transformer(transformer, scheduler, latents: tuple[Tensor, Tensor], caption_index: Tensor, table,
                      empty_index: int, cfg: FlowPretrainConfig, generator: torch.Generator, progress: ProgressFn) -> float:
    """Flow matching on scaled latents ``(mean, std)`` (re-drawn from the posterior each step, as the preference
    trainer draws them); leaves the EMA weights in ``transformer``; returns the final-stretch mean loss."""
    from t2ialign.flow_noising import FlowTimestepSampling, flow_loss_weights, sample_pair_sigma_indices, training_table
    from t2ialign.models.text_encoding import PromptEmbeddings
    from t2ialign.training.flow_step import flow_velocity

    sampling = FlowTimestepSampling(logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
    timesteps_table, sigmas_table = training_table(scheduler)
    means, stds = latents
    batch = cfg.batch_size
    transformer.train().requires_grad_(True)
    params = list(transformer.parameters())
    average = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    recent = []
    for step in range(cfg.steps):
        _set_lr(optimizer, _cosine_lr(step, cfg.steps, cfg.learning_rate))
        index = torch.randint(len(means), (batch,), generator=generator)
        x0 = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        dropped = torch.rand(batch, generator=generator) < cfg.caption_dropout
        rows = torch.where(dropped, torch.full_like(caption_index[index], empty_index), caption_index[index])
        noise = torch.randn(x0.shape, generator=generator)
        # the pair sampler draws one index per pair and repeats it for the losers: the first half is i.i.d.
        drawn = sample_pair_sigma_indices(batch, scheduler, sampling, "cpu", generator)[:batch]
        sigma = sigmas_table[drawn].view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        embeds = PromptEmbeddings(table.prompt_embeds[rows], table.pooled_prompt_embeds[rows])
        prediction = flow_velocity(FAMILY, transformer, noisy, timesteps_table[drawn], embeds)
        weights = flow_loss_weights(sampling, sigmas_table[drawn]).view(-1, 1, 1, 1)
        loss = (weights * (prediction - (noise - x0)).pow(2)).mean()
        update_with_ema(loss, params, optimizer, average, step, cfg.ema_decay)
        recent = (recent + [loss.item()])[-50:]
        progress("transformer", step + 1, cfg.steps, recent[-1])
    with torch.no_grad():
        for param, averaged in zip(params, average):
            param.copy_(averaged)
    transformer.eval().requires_grad_(False)
    return sum(recent) / max(1, len(recent))


def pretrain_flow_pipeline(output_dir: str | Path, config: Optional[FlowPretrainConfig] = None,
                           progress: Optional[ProgressFn] = None, base_dir: Optional[Path] = None) -> Path:
    """Train the toy SD3 transformer and save a StableDiffusion3Pipeline directory at ``output_dir``.

    ``base_dir``: the SDXL toy pipeline lending its VAE and text stack (default: ``get_toy_pipeline(config=cfg.base)``).
    Writes ``toy_info.json`` beside the model (settings, latent normalisation, T5 length, loss, timing)."""
    from t2ialign.models.tiny import save_pipeline

    cfg = config or FlowPretrainConfig()
    progress = progress or _log_progress
    started = time.time()
    base_dir = Path(base_dir) if base_dir is not None else get_toy_pipeline(config=cfg.base)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    images, captions = world.sample_images(cfg.num_images, seed=cfg.seed)
    components = build_components(cfg, base_dir)
    means, stds = encode_images(components["vae"], images)
    shift, scale = normalise_vae(components["vae"], means)
    distinct = sorted(set(captions))
    table = caption_embedding_table(components, distinct + [""])
    row_of = {text: i for i, text in enumerate(distinct)}
    caption_index = torch.tensor([row_of[text] for text in captions])
    loss = train_transformer(components["transformer"], components["scheduler"], ((means - shift) * scale, stds * scale),
                             caption_index, table, len(distinct), cfg, generator, progress)
    info = {
        "family": FAMILY, "world_version": world.WORLD_VERSION, "flow_pretrain_version": FLOW_PRETRAIN_VERSION,
        "cache_key": cfg.cache_key(), "config": asdict(cfg), "base": str(base_dir), "base_cache_key": cfg.base.cache_key(),
        "shift_factor": shift, "scaling_factor": scale, "max_sequence_length": T5_LENGTH,
        "transformer_train_loss": loss, "total_seconds": round(time.time() - started, 1),
    }
    output_dir = Path(output_dir)
    save_pipeline(components, output_dir)
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2, default=list))  # last: marks the save complete
    logger.info("toy SD3 pipeline saved to %s in %.0f s", output_dir, info["total_seconds"])
    return output_dir


def flow_cache_dir(config: Optional[FlowPretrainConfig] = None) -> Path:
    return cache_root() / "toy" / f"{FAMILY}-{(config or FlowPretrainConfig()).cache_key()}"


def get_flow_toy_pipeline(cache: bool = True, config: Optional[FlowPretrainConfig] = None, force: bool = False,
                          progress: Optional[ProgressFn] = None, steps: Optional[int] = None) -> Path:
    """Directory of the pretrained toy SD3 pipeline, training it first when it is not cached yet.

    ``steps`` overrides the transformer's training steps. As ``pretrain.get_toy_pipeline``: ``cache=False`` trains
    into a fresh temporary directory; cached builds are locked (one builder, the others wait) and renamed into place."""
    cfg = config or FlowPretrainConfig()
    if steps is not None:
        cfg = cfg.with_steps(steps)

    def build(directory: Path) -> Path:
        logger.info("pretraining the toy SD3 pipeline (cached afterwards under %s)", cache_root() / "toy")
        return pretrain_flow_pipeline(directory, cfg, progress)

    if not cache:
        return build(Path(tempfile.mkdtemp(prefix="t2ialign-toy-sd3-")))
    return build_cached(flow_cache_dir(cfg), build, force=force)


def build_cached(target: Path, build: Callable[[Path], Path], force: bool = False) -> Path:
    """``target``, built by ``build`` into a staging directory and renamed into place unless already complete.

    The same protocol as ``pretrain.get_toy_pipeline``: a file lock lets one process build while the others wait and
    then find the result, and the rename means no crash or concurrent reader ever sees half a model."""
    if is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target) and not force:
            return target
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            build(staging)
            if target.exists():  # stale: moved aside in one rename, then deleted
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=".old-"))
                os.replace(target, old / target.name)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
