"""Rows of scripts/bench_train.py: the train config, the models, the optimizer and a pre-encoded batch, built as
``t2ialign train`` builds them, with the step closures (forward, backward, one single-latent forward) every mode runs.
"""
from __future__ import annotations

import contextlib
import copy

import torch

TEXT_TOKENS = 77


def make_batch(unet_config, pairs: int, latent_size: int, device, seed: int) -> dict:
    """A pre-encoded micro-batch, winners first (the ``t2ialign cache`` layout read by ``preference_step``).

    The latents are NCHW-contiguous whatever ``--channels-last`` says, as the trainer's are (the cache reader's
    tensors are contiguous, ``preference_step`` makes VAE latents contiguous): the channels-last lever converts
    the weights only, and the first convolution converts the activations. Channels-last latents would send the
    policy (train mode) and the frozen reference (eval mode) down different memory formats while the weights are
    still NCHW (diffusers' ``ResnetBlock2D`` makes its shortcut input contiguous in train mode only), so the
    counted micro-step's first DPO loss would not be ln 2.
    """
    n = 2 * pairs
    text_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    resolution = 8 * latent_size
    gen = torch.Generator("cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    latents = rand(n, unet_config.in_channels, latent_size, latent_size)
    return {
        "latents": latents,
        "prompt_embeds": rand(n, TEXT_TOKENS, unet_config.cross_attention_dim),
        "pooled_prompt_embeds": rand(n, text_dim),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n, dtype=torch.float32, device=device),
        "captions": [""] * pairs,
    }


_TINY_UNET = []


def tiny_unet():
    """Built once per process (the components include text encoders and tokenizers); rows copy it."""
    if not _TINY_UNET:
        from t2ialign.models.tiny import tiny_sdxl_components

        _TINY_UNET.append(tiny_sdxl_components()["unet"])
    return _TINY_UNET[0]


def build_unet(tiny: bool, device):
    if tiny:
        from torch._guards import active_fake_mode

        if active_fake_mode() is not None:  # real weights cannot be deep-copied into fake tensors: same architecture, rebuilt
            with torch.device(device):
                return type(tiny_unet()).from_config(tiny_unet().config)
        return copy.deepcopy(tiny_unet()).to(device)
    from t2ialign.models.configs import sdxl_base_unet

    return sdxl_base_unet(device)


def make_train_config(args, objective: str, lora_rank: int):
    from t2ialign.config import TrainConfig

    config = TrainConfig()
    config.objective.name = objective
    config.mixed_precision = args.mixed_precision
    config.gradient_checkpointing = args.checkpointing
    config.gradient_checkpointing_mode = args.checkpointing_mode
    config.model.attention = args.attention
    config.model.reference_dtype = args.reference_dtype
    config.lora.enabled = lora_rank > 0
    config.lora.rank = max(lora_rank, 1)
    config.optim.optimizer = args.optimizer
    config.optim.offload = args.offload
    config.model.policy_dtype = args.policy_dtype if lora_rank == 0 else "fp32"  # LoRA adapters stay fp32
    config.train_batch_size = args.micro_batch
    config.gradient_accumulation_steps = args.grad_accum
    config.compile = args.compile
    config.channels_last = args.channels_last
    config.compile_cache_dir = args.compile_cache_dir
    return config


def build_row(args, objective: str, lora_rank: int, device) -> dict:
    """Models, optimizer, batch and the step closures of one row, as ``t2ialign train`` builds them."""
    import dataclasses

    from t2ialign.models.configs import sdxl_noise_scheduler
    from t2ialign.models.loading import DiffusionComponents
    from t2ialign.objectives import get_objective, objective_params
    from t2ialign.training.optim import build_optimizer
    from t2ialign.training.setup import build_policy_and_reference
    from t2ialign.training.step import StepModels, preference_step

    config = make_train_config(args, objective, lora_rank)
    spec = get_objective(objective)
    params = objective_params(spec, None, {})
    unet = build_unet(args.tiny, device)
    components = DiffusionComponents(unet=unet, vae=None, noise_scheduler=sdxl_noise_scheduler(), is_sdxl=True)
    # the levers are applied after the FLOP count (a compiled graph hides its ops from FlopCounterMode)
    plain = dataclasses.replace(config, compile=False, channels_last=False)
    policy, reference, trainable = build_policy_and_reference(plain, spec, components)
    if reference is not None:
        reference.to(device)
    optimizer = None if args.count_only else build_optimizer(trainable, config.optim, 1e-6)
    models = StepModels(policy, policy, reference, components, lora=config.lora.enabled)
    batch = make_batch(unet.config, args.micro_batch, args.latent_size, device, args.seed)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    def forward():
        # the same draw each micro-step (see bench_train.py's docstring); meta tensors (count-only) draw on the CPU
        generator = torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(args.seed)
        with autocast():
            return preference_step(models, spec, params, batch, resolution=8 * args.latent_size,
                                   prompt_dropout=0.0, generator=generator)

    def backward(output):
        with autocast():
            output.loss.backward()

    def one_forward():
        """A single-latent forward of the policy (the unit of ``forward_equivalents_per_pair``)."""
        with torch.no_grad(), autocast():
            dtype = next(policy.parameters()).dtype
            cond = {
                "encoder_hidden_states": batch["prompt_embeds"][:1].to(dtype),
                "added_cond_kwargs": {"text_embeds": batch["pooled_prompt_embeds"][:1].to(dtype),
                                      "time_ids": batch["time_ids"][:1].to(dtype)},
            }
            return policy(batch["latents"][:1].to(dtype), torch.tensor([500], device=device), **cond).sample

    reference_kind = "frozen copy" if reference is not None else (
        "adapters disabled" if lora_rank > 0 and spec.needs_reference else "none")
    return dict(config=config, spec=spec, policy=policy, reference=reference, models=models, trainable=trainable, optimizer=optimizer,
                batch=batch, autocast=autocast, forward=forward, backward=backward, one_forward=one_forward,
                reference_kind=reference_kind)


def describe(args, objective: str, lora_rank: int, built: dict) -> dict:
    return {
        "objective": objective,
        "mode": f"lora-r{lora_rank}" if lora_rank > 0 else "full",
        "lora_rank": lora_rank,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "checkpointing": args.checkpointing,
        "checkpointing_mode": args.checkpointing_mode if args.checkpointing else None,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "attention": args.attention,
        "optimizer": args.optimizer,
        "offload": args.offload,
        "policy_dtype": args.policy_dtype if lora_rank == 0 else "fp32",
        "mixed_precision": args.mixed_precision,
        "reference": built["reference_kind"],
        "params_total": sum(p.numel() for p in built["policy"].parameters()),
        "params_trainable": sum(p.numel() for p in built["trainable"]),
    }
