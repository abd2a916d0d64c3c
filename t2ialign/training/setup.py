"""Build what a training run needs: models (policy, reference), data, and the accelerator."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from t2ialign.config import ConfigError, TrainConfig
from t2ialign.models.loading import load_components, set_attention_backend
from t2ialign.models.lora import add_lora
from t2ialign.models.reference import frozen_reference, shared_graph_reference
from t2ialign.objectives import ObjectiveSpec

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None if config.report_to == "none" else config.report_to
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")),
    )


def uses_cache(config: TrainConfig) -> bool:
    return bool(config.data.cache_dir)


def load_training_components(config: TrainConfig, device):
    """Components in their frozen-part precision; a cache run loads neither the VAE nor the text encoders."""
    cached = uses_cache(config)
    frozen_dtype = DTYPES[config.mixed_precision]
    components = load_components(
        config.model.pretrained,
        revision=config.model.revision,
        variant=config.model.variant,
        vae=config.model.vae,
        dtype=torch.float32,
        device=device,
        load_vae=not cached,
        load_text_encoders=not cached,
        local_files_only=config.model.local_files_only,
        frozen_dtype=frozen_dtype,
        # a LoRA's base is frozen in the mixed-precision dtype (build_policy_and_reference): read it so (flow models)
        frozen_denoiser_dtype=frozen_dtype if config.lora.enabled else None,
    )
    # the SDXL VAE overflows in fp16 (use an fp16-fix VAE via model.vae); text encoders are fine in half
    if components.vae is not None and frozen_dtype != torch.float16:
        components.vae.to(dtype=frozen_dtype)
    for encoder in components.text_encoders:
        encoder.to(dtype=frozen_dtype)
    return components


def check_loaded_scheduler(config: TrainConfig, spec: ObjectiveSpec, components) -> None:
    """The scheduler check of ``check_model_source`` again on the loaded config (covers hub models that were
    not cached yet, whose scheduler config could not be read before loading)."""
    from t2ialign.preflight import check_flow_support, check_scheduler_compat

    if components.is_flow:
        check_flow_support(config, components.family)

    scheduler_config = dict(components.noise_scheduler.config)
    scheduler_config.setdefault("_class_name", type(components.noise_scheduler).__name__)
    check_scheduler_compat(spec.name, scheduler_config, f"{config.model.pretrained}/scheduler")


def build_policy_and_reference(config: TrainConfig, spec: ObjectiveSpec, components):
    """Policy UNet (fp32 master weights, or LoRA on a frozen base) and, if needed, a frozen reference."""
    unet = components.denoiser  # the UNet, or the flow transformer (SD3 / FLUX)
    set_attention_backend(unet, config.model.attention)
    reference = None
    if config.lora.enabled:
        unet.requires_grad_(False)
        if config.mixed_precision != "no":  # frozen base in half precision, adapters stay fp32
            unet.to(dtype=DTYPES[config.mixed_precision])
        trainable = add_lora(
            unet,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            target_modules=tuple(config.lora.target_modules),
        )
        for param in trainable:
            param.data = param.data.float()
    else:
        if config.model.policy_dtype == "bf16":  # the fp32 masters are kept by the optimizer (optim.offload)
            # parameters only: fixed float buffers (SD3's sin-cos position table) keep their precision, in training
            # and in the export, which writes the masters back into the parameters but has no master for a buffer
            for param in unet.parameters():
                param.data = param.data.to(torch.bfloat16)
        if spec.needs_reference and not config.compile:  # copied from the policy as it computes (after its dtype is set)
            autocast_dtype = None if config.mixed_precision == "no" else DTYPES[config.mixed_precision]
            reference = frozen_reference(unet, DTYPES[config.model.reference_dtype], autocast_dtype)
        unet.requires_grad_(True)
        trainable = [p for p in unet.parameters() if p.requires_grad]
    if config.gradient_checkpointing:
        from t2ialign.training.activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(unet, config.gradient_checkpointing_mode)
    unet.train()
    # speed levers (config.channels_last / config.compile): after LoRA and checkpointing, before prepare
    from t2ialign.models.speed import apply_speed_settings

    apply_speed_settings(config, unet, reference)
    if config.compile and spec.needs_reference:  # one compiled graph computes policy and reference alike
        reference = shared_graph_reference(unet, lora=config.lora.enabled)
    logger.info(
        "policy: %.1fM trainable of %.1fM parameters; reference: %s",
        sum(p.numel() for p in trainable) / 1e6,
        sum(p.numel() for p in unet.parameters()) / 1e6,
        _describe_reference(config, spec, reference),
    )
    return unet, reference, trainable


def _describe_reference(config: TrainConfig, spec: ObjectiveSpec, reference) -> str:
    if not spec.needs_reference:
        return "none"
    how = "the policy's compiled graph with " if config.compile else ""
    return how + ("adapters disabled" if config.lora.enabled else "frozen copy")


def build_dataset(config: TrainConfig):
    """Map-style dataset of preference pairs and its collate function (images, or a pre-encoded cache)."""
    if uses_cache(config):
        from t2ialign.data.cache import CachedPairs
        from t2ialign.objectives import get_objective

        # DCPO conditions each image on its own caption; every other objective on the pair's prompt
        dataset = CachedPairs(config.data.cache_dir, per_image_captions=get_objective(config.objective.name).per_image_captions)
        built = dataset.manifest
        if built["resolution"] != config.data.resolution:
            raise ConfigError(
                f"data.resolution: {config.data.resolution}, but the cache in {config.data.cache_dir} was built at "
                f"{built['resolution']} px; set data.resolution={built['resolution']} or rebuild the cache"
            )
        if built["spec"]["model"]["pretrained"] != config.model.pretrained:
            logger.warning("data.cache_dir was encoded with %s's VAE/text encoders; training %s",
                           built["spec"]["model"]["pretrained"], config.model.pretrained)
        return dataset, dataset.collate_fn  # collate_cached_pairs with the cache's scaling factor and "" embedding
    from t2ialign.data import build_preference_pairs, collate_pairs

    if config.data.streaming:
        raise ConfigError(
            "data.streaming: training reads a map-style dataset so that resume is exact; stream the data once "
            "through `t2ialign cache` (or set data.max_rows to train on a subset) and train from data.cache_dir"
        )
    from t2ialign.objectives import get_objective

    # DCPO: a dataset without per-image captions is a DataError (before any model loads), an empty one a bad row
    require = get_objective(config.objective.name).per_image_captions
    return build_preference_pairs(config.data, seed=config.seed, require_image_captions=require), collate_pairs
