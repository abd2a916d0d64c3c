"""Optimizers and learning-rate schedules selected by name from the config."""
from __future__ import annotations

import torch

from t2ialign.config import ConfigError, OptimConfig


def effective_learning_rate(cfg: OptimConfig, pairs_per_optimizer_step: int) -> float:
    """Diffusion-DPO scales its base lr by the pairs per optimizer step (1e-8 x 2048 = 2.048e-5)."""
    return cfg.learning_rate * pairs_per_optimizer_step if cfg.scale_lr else cfg.learning_rate


def build_optimizer(params, cfg: OptimConfig, learning_rate: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires gradients (check lora.enabled / lora.target_modules)")
    if cfg.offload:  # the same optimizer, on fp32 master copies in host RAM
        from t2ialign.training.offload import CPUOffloadOptimizer

        return CPUOffloadOptimizer(params, lambda masters: _build_on(masters, cfg, learning_rate))
    return _build_on(params, cfg, learning_rate)


def _build_on(params, cfg: OptimConfig, learning_rate: float) -> torch.optim.Optimizer:
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        # fused AdamW: one kernel per step on CUDA; on the CPU (offload, CPU runs) a vectorised loop, 6x foreach's speed
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
        return torch.optim.AdamW(
            params, lr=learning_rate, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=fused or None
        )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "optim.optimizer: 'adamw8bit' needs bitsandbytes; install it (pip install bitsandbytes) "
                "or use optim.optimizer=adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=learning_rate, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # the released SDXL Diffusion-DPO recipe: fixed lr, no relative step, no warmup init
        return Adafactor(
            params, lr=learning_rate, weight_decay=cfg.weight_decay, clip_threshold=1.0, scale_parameter=False, relative_step=False
        )
    raise ConfigError(f"optim.optimizer: unknown optimizer {cfg.optimizer!r}; allowed: adamw, adamw8bit, adafactor")


def build_lr_scheduler(optimizer, cfg: OptimConfig, max_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)
