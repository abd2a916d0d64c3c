"""Pretrain a tiny SDXL-structured pipeline on the toy world, save it as a diffusers directory, cache it.

Two stages, both plain reconstruction / denoising training (not preference training):
  1. the VAE learns to reconstruct world images (MSE + a small KL), so colours and shapes survive the
     latent round trip and preference signals measured on decoded samples are real;
  2. the UNet learns epsilon-prediction on the VAE's latents, conditioned exactly as SDXL is (both
     text encoders, pooled embedding, ``time_ids``), with 10% of captions dropped to "" so
     classifier-free guidance works at sampling time.
The text encoders stay at their (seeded) random weights, as SDXL's stay frozen: distinct captions still
get distinct embeddings, and the UNet learns to read them.

The result is a standard pipeline directory that ``StableDiffusionXLPipeline.from_pretrained`` loads,
cached under ``$T2IALIGN_CACHE/toy/<hash>`` (default ``~/.cache/t2ialign``); the hash covers the world,
the architecture and the training settings, so changing any of them retrains instead of reusing.
The UNet and VAE weights are saved rounded to fp16 precision, the form in which the default base ships
with the package (``toy.shipped``): the default config is materialised from those files, not retrained.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
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

logger = logging.getLogger(__name__)

PRETRAIN_VERSION = 2  # bump when the training procedure changes in a way the settings do not show (2: fp16-rounded weights)
INFO_FILE = "toy_info.json"
TOKEN_LENGTH = 16  # toy captions are at most 12 CLIP tokens; 16 instead of 77 makes cross-attention cheap


@dataclass
class ToyModelConfig:
    """Architecture of the toy pipeline (passed to ``t2ialign.models.tiny.tiny_sdxl_components``)."""

    latent_size: int = 8  # 32 px images / VAE factor 4
    unet_block_out_channels: tuple = (32, 64)
    attention_head_dim: tuple = (2, 4)
    layers_per_block: int = 1
    text_hidden_sizes: tuple = (32, 32)
    vae_block_out_channels: tuple = (16, 32, 32)
    latent_channels: int = 8  # 4 (as SDXL) reconstructs visibly worse in a short VAE run


@dataclass
class PretrainConfig:
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    num_images: int = 8192  # a fixed rendered training set (rendering on the fly costs more than it buys)
    vae_steps: int = 300
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    unet_steps: int = 1500  # colour is learned by ~1500 steps, not by 600
    unet_batch_size: int = 64
    unet_learning_rate: float = 2e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.99
    heldout_images: int = 256  # fresh world images for the reported reconstruction error
    seed: int = 0

    def with_steps(self, unet_steps: int) -> "PretrainConfig":
        """The same settings with ``unet_steps`` UNet steps and the VAE's steps scaled alike."""
        if unet_steps < 1:
            raise ValueError(f"unet_steps must be at least 1, got {unet_steps}")
        vae_steps = max(1, round(self.vae_steps * unet_steps / self.unet_steps))
        return replace(self, unet_steps=unet_steps, vae_steps=vae_steps)

    def cache_key(self) -> str:
        settings = {"world": world.WORLD_VERSION, "pretrain": PRETRAIN_VERSION, **asdict(self)}
        blob = json.dumps(settings, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


ProgressFn = Callable[[str, int, int, float], None]  # (stage, step, total, loss)


def _build_components(model: ToyModelConfig, seed: int) -> dict:
    from t2ialign.models.tiny import build_clip_tokenizer, tiny_sdxl_components

    components = tiny_sdxl_components(
        seed=seed,
        sample_size=model.latent_size,
        unet_block_out_channels=model.unet_block_out_channels,
        attention_head_dim=model.attention_head_dim,
        layers_per_block=model.layers_per_block,
        text_hidden_sizes=model.text_hidden_sizes,
        vae_block_out_channels=model.vae_block_out_channels,
        latent_channels=model.latent_channels,
    )
    components["tokenizer"] = build_clip_tokenizer(max_length=TOKEN_LENGTH)
    components["tokenizer_2"] = build_clip_tokenizer(max_length=TOKEN_LENGTH, pad_token="!")
    components["vae"].register_to_config(force_upcast=False)  # fp32 toy: no need to upcast
    return components


def _log_progress(stage: str, step: int, total: int, loss: float) -> None:
    if step == total or step % max(1, total // 10) == 0:
        logger.info("toy pretrain %s: step %d/%d loss %.5f", stage, step, total, loss)


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _start_with_small_posterior_std(vae, log_variance: float = -8.0) -> None:
    """Begin with a nearly deterministic encoder (posterior std ~0.02 instead of ~1).

    Random init gives posterior std ~1, and with the tiny KL weight the decoder would spend most of
    a short run learning to ignore that noise; SD's VAE ends with a tiny std anyway.
    """
    with torch.no_grad():
        logvar_bias = vae.quant_conv.bias[vae.config.latent_channels :]
        logvar_bias.fill_(log_variance)


def train_vae(vae, images: Tensor, cfg: PretrainConfig, generator: torch.Generator, progress: ProgressFn) -> float:
    """Reconstruction training on ``images`` in [0, 1]; returns the final-stretch mean MSE (in [0,1] units)."""
    _start_with_small_posterior_std(vae)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    recent = []
    for step in range(cfg.vae_steps):
        _set_lr(optimizer, _cosine_lr(step, cfg.vae_steps, cfg.vae_learning_rate))
        index = torch.randint(len(images), (cfg.vae_batch_size,), generator=generator)
        pixels = images[index] * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        mse = (reconstruction - pixels).pow(2).mean()
        loss = mse + cfg.kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [mse.item() / 4])[-20:]  # /4: error in [0, 1] pixel units
        progress("vae", step + 1, cfg.vae_steps, recent[-1])
    vae.eval().requires_grad_(False)
    return sum(recent) / max(1, len(recent))


@torch.no_grad()
def encode_images(vae, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image's latent (unscaled)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size] * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_error(vae, images: Tensor, batch_size: int = 256) -> float:
    """Mean squared error in [0, 1] pixel units of decode(encode(x)) through the posterior mean."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        decoded = vae.decode(vae.encode(batch * 2 - 1).latent_dist.mean).sample
        total += ((decoded.clamp(-1, 1) + 1) / 2 - batch).pow(2).mean().item() * len(batch)
    return total / len(images)


def caption_embedding_table(components: dict, captions: list[str]):
    """Embeddings of every distinct caption, computed once (the text encoders stay frozen)."""
    from t2ialign.models.text_encoding import encode_prompts

    encoders = [components["text_encoder"], components["text_encoder_2"]]
    tokenizers = [components["tokenizer"], components["tokenizer_2"]]
    return encode_prompts((encoders, tokenizers, True), captions)


def update_with_ema(loss: Tensor, params: list, optimizer, average: list[Tensor], step: int, ema_decay: float) -> None:
    """One clipped optimizer step on ``loss``, then the EMA of ``params`` (shared by the UNet and flow toys)."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # warm-up of the EMA so early weights do not dominate a short run
    _ema_update(average, [p.detach() for p in params], min(ema_decay, (1 + step) / (10 + step)))


def _ema_update(average: list[Tensor], params: list[Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(average, params, 1.0 - decay)


def train_unet(unet, latents: tuple[Tensor, Tensor], caption_index: Tensor, table, empty_index: int,
               scheduler_config, cfg: PretrainConfig, generator: torch.Generator, progress: ProgressFn) -> float:
    """Epsilon-prediction training on scaled latents ``(mean, std)``; leaves the EMA weights in ``unet``.

    Latents are re-sampled from the posterior each step, as the preference trainer will draw them.
    """
    from diffusers import DDPMScheduler

    from t2ialign.models.text_encoding import make_time_ids

    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    means, stds = latents
    batch = cfg.unet_batch_size
    side = world.RESOLUTION
    time_ids = make_time_ids(torch.tensor([[side, side]]), torch.tensor([[0, 0]]), (side, side)).expand(batch, -1)
    unet.train().requires_grad_(True)
    params = [p for p in unet.parameters()]
    average = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_learning_rate, weight_decay=0.0)
    recent = []
    for step in range(cfg.unet_steps):
        _set_lr(optimizer, _cosine_lr(step, cfg.unet_steps, cfg.unet_learning_rate))
        index = torch.randint(len(means), (batch,), generator=generator)
        z0 = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        dropped = torch.rand(batch, generator=generator) < cfg.caption_dropout
        rows = torch.where(dropped, torch.full_like(caption_index[index], empty_index), caption_index[index])
        noise = torch.randn(z0.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(z0, noise, timesteps)
        prediction = unet(
            noisy, timesteps, encoder_hidden_states=table.prompt_embeds[rows],
            added_cond_kwargs={"text_embeds": table.pooled_prompt_embeds[rows], "time_ids": time_ids},
        ).sample
        loss = (prediction - noise).pow(2).mean()
        update_with_ema(loss, params, optimizer, average, step, cfg.ema_decay)
        recent = (recent + [loss.item()])[-50:]
        progress("unet", step + 1, cfg.unet_steps, recent[-1])
    with torch.no_grad():
        for param, averaged in zip(params, average):
            param.copy_(averaged)
    unet.eval().requires_grad_(False)
    return sum(recent) / max(1, len(recent))


@torch.no_grad()
def round_to_half(module) -> None:
    """Round the weights to fp16 precision (kept in fp32), so the base is exactly what ``toy.shipped`` ships."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            rounded = tensor.to(torch.float16)
            if not torch.isfinite(rounded).all():
                raise ValueError(f"toy weight {name} does not fit in fp16")
            tensor.copy_(rounded.float())


def pretrain_info(cfg: PretrainConfig, scaling_factor: float) -> dict:
    """What ``toy_info.json`` records about any toy base, trained or materialised."""
    return {"world_version": world.WORLD_VERSION, "pretrain_version": PRETRAIN_VERSION, "cache_key": cfg.cache_key(),
            "config": asdict(cfg), "scaling_factor": scaling_factor}


def pretrain_toy_pipeline(
    output_dir: str | Path,
    config: Optional[PretrainConfig] = None,
    progress: Optional[ProgressFn] = None,
) -> Path:
    """Train the toy VAE then UNet and save a StableDiffusionXLPipeline directory at ``output_dir``.

    Writes ``toy_info.json`` beside the model (settings, timings, reconstruction error, scaling factor).
    """
    from t2ialign.models.tiny import save_pipeline

    cfg = config or PretrainConfig()
    progress = progress or _log_progress
    started = time.time()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    images, captions = world.sample_images(cfg.num_images, seed=cfg.seed)
    components = _build_components(cfg.model, cfg.seed)
    vae = components["vae"]
    vae_loss = train_vae(vae, images, cfg, generator, progress)
    vae_seconds = time.time() - started

    means, stds = encode_images(vae, images)
    scaling_factor = float(1.0 / means.std())  # as SD chose 0.18215: unit-variance latents for the UNet
    vae.register_to_config(scaling_factor=scaling_factor)
    distinct = sorted(set(captions))
    table = caption_embedding_table(components, distinct + [""])
    row_of = {text: i for i, text in enumerate(distinct)}
    caption_index = torch.tensor([row_of[text] for text in captions])
    unet_loss = train_unet(
        components["unet"], (means * scaling_factor, stds * scaling_factor), caption_index, table,
        len(distinct), components["scheduler"].config, cfg, generator, progress,
    )
    round_to_half(components["unet"])
    round_to_half(vae)
    held_out, _ = world.sample_images(cfg.heldout_images, seed=cfg.seed + 10_000)
    info = {
        **pretrain_info(cfg, scaling_factor), "vae_train_mse": vae_loss,
        "vae_heldout_mse": reconstruction_error(vae, held_out), "unet_train_loss": unet_loss,
        "vae_seconds": round(vae_seconds, 1), "total_seconds": round(time.time() - started, 1),
    }
    output_dir = Path(output_dir)
    # zeros for an empty prompt would not match the "" the UNet was trained with (and DPO drops to "")
    save_pipeline({**components, "force_zeros_for_empty_prompt": False}, output_dir)
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2, default=list))
    logger.info("toy pipeline saved to %s in %.0f s", output_dir, info["total_seconds"])
    return output_dir


def cache_root() -> Path:
    """``$T2IALIGN_CACHE`` or ``~/.cache/t2ialign``."""
    override = os.environ.get("T2IALIGN_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "t2ialign"


def toy_cache_dir(config: Optional[PretrainConfig] = None) -> Path:
    return cache_root() / "toy" / (config or PretrainConfig()).cache_key()


def is_complete(directory: Path) -> bool:
    # the info file is written last, so its presence means the save finished
    return (directory / "model_index.json").is_file() and (directory / INFO_FILE).is_file()


def shipped_base_changed(directory: Path, cfg: PretrainConfig) -> bool:
    """Whether ``directory`` was materialised from other shipped weights than this package's (an upgrade
    re-exported the base under the same config): the cache is then rebuilt rather than silently reused."""
    from t2ialign.toy import shipped

    info = json.loads((directory / INFO_FILE).read_text())
    if not shipped.ships(cfg) or "source" not in info:  # a real pretrain of cfg stays valid
        return False
    # materialised by a release that did not record which shipped bytes it used: rebuild to be sure
    return info.get("shipped_sha256") != shipped.read_manifest()["sha256"]


def get_toy_pipeline(
    cache: bool = True,
    config: Optional[PretrainConfig] = None,
    force: bool = False,
    progress: Optional[ProgressFn] = None,
    steps: Optional[int] = None,
) -> Path:
    """Directory of the pretrained toy pipeline, training it first when it is not cached yet.

    The default config is not trained but materialised in a second or two from the base shipped with
    the package (``toy.shipped``; the same bytes a pretrain writes); ``force`` trains it anyway.

    ``steps`` overrides the UNet steps (VAE steps scale alike; see ``PretrainConfig.with_steps``).
    With ``cache=False`` it trains into a fresh temporary directory. Training writes into a staging
    directory and renames it into place, so a crash or a concurrent run never leaves half a model.
    """
    cfg = config or PretrainConfig()
    if steps is not None:
        cfg = cfg.with_steps(steps)
    build = _builder(cfg, force, progress)
    if not cache:
        return build(Path(tempfile.mkdtemp(prefix="t2ialign-toy-")))
    target = toy_cache_dir(cfg)
    if _usable(target, cfg, force):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time (test workers, demo workers): the others wait, then find the result usable
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _usable(target, cfg, force):
            return target
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            build(staging)
            if target.exists():  # stale: moved aside in one rename, so no reader sees half a directory
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=".old-"))
                os.replace(target, old / target.name)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _usable(target: Path, cfg: PretrainConfig, force: bool) -> bool:
    return is_complete(target) and not force and not shipped_base_changed(target, cfg)


def _builder(cfg: PretrainConfig, force: bool, progress: Optional[ProgressFn]) -> Callable[[Path], Path]:
    """How to produce ``cfg``'s pipeline in a directory: materialise the shipped base, or pretrain."""
    from t2ialign.toy import shipped

    if not force and shipped.ships(cfg):
        return lambda directory: shipped.materialise(directory, cfg)

    def pretrain(directory: Path) -> Path:
        logger.info("pretraining the toy pipeline (cached afterwards under %s)", cache_root() / "toy")
        return pretrain_toy_pipeline(directory, cfg, progress)

    return pretrain
