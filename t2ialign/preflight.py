"""Checks that run before any weights load: the model source exists (or is cached, when offline) and
its scheduler suits the objective. A wrong path or an offline hub id fails in a second with one line."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from t2ialign.config import ConfigError, TrainConfig
from t2ialign.config.train import _objectives
from t2ialign.errors import ModelNotFoundError
from t2ialign.hub import fix_hint, local_only, offline_reason


SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_scheduler_compat(objective_name: str, scheduler_config, where: str) -> None:
    """The model's noise scheduler must suit the objective (read from scheduler_config.json, no weights)."""
    from t2ialign.objectives import get_objective

    spec = get_objective(objective_name)
    class_name = str(scheduler_config.get("_class_name", ""))
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if "FlowMatch" in class_name:
        if spec.uses_inversion:
            others = sorted(n for n, s in _objectives().items() if not s.uses_inversion)
            raise ConfigError(
                f"objective.name: '{spec.name}' runs DDIM inversion of an epsilon-prediction UNet, but {where} is a "
                f"rectified-flow model ({class_name}); objectives that train flow models: {', '.join(others)} "
                "(docs/FLOW.md explains why InPO has no flow version here)"
            )
        return
    if prediction not in SUPPORTED_PREDICTION_TYPES:
        raise ConfigError(
            f"model.pretrained: {where} has scheduler prediction_type '{prediction}'; "
            f"allowed: {', '.join(SUPPORTED_PREDICTION_TYPES)}"
        )
    if spec.uses_inversion and prediction != "epsilon":
        others = sorted(n for n, s in _objectives().items() if not s.uses_inversion)
        raise ConfigError(
            f"objective.name: '{spec.name}' runs DDIM inversion, which needs an epsilon-prediction model, but {where} "
            f"has prediction_type '{prediction}' ({class_name or 'scheduler'}); allowed prediction_type for '{spec.name}': "
            f"epsilon; objectives that train this model: {', '.join(others)}"
        )


def check_flow_support(config: TrainConfig, family: str) -> None:
    """Levers not (yet) wired for the flow transformers fail here with one line, before any training."""
    unsupported = {
        "compile": config.compile,  # the shared-graph reference calls the UNet signature
    }
    for key, on in unsupported.items():
        if on:
            raise ConfigError(f"{key}: not supported for {family} (flow transformer) models yet; turn it off "
                              "(gradient checkpointing, LoRA, cache, bf16 weights, offload and validation all apply)")


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1


def check_model_source(config: TrainConfig) -> None:
    """Before any weights load: the model is where the config says (local directory, or the hub / its cache)
    and its scheduler suits the objective. Raises ModelNotFoundError / ConfigError with one line naming the key."""

    pretrained = str(config.model.pretrained)
    local = Path(pretrained).expanduser()
    scheduler_file = None
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"model.pretrained: {pretrained} is not a diffusers pipeline directory (no model_index.json). "
                "Fix: give the directory that holds model_index.json, unet/, vae/, text_encoder/, scheduler/"
            )
        scheduler_file = local / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise ModelNotFoundError(
                f"model.pretrained: {pretrained} has no scheduler/scheduler_config.json. "
                "Fix: give a complete diffusers pipeline directory (as written by save_pretrained)"
            )
    elif _looks_like_path(pretrained):
        raise ModelNotFoundError(
            f"model.pretrained: directory {pretrained} does not exist. Fix: give a local diffusers pipeline directory "
            "(model_index.json, unet/, vae/, ...) or a hub id such as stabilityai/stable-diffusion-xl-base-1.0"
        )
    else:
        scheduler_file = _cached_hub_file(config, pretrained)
    vae = config.model.vae
    if vae and _looks_like_path(str(vae)) and not Path(str(vae)).expanduser().is_dir():
        raise ModelNotFoundError(f"model.vae: directory {vae} does not exist. Fix: check the path, or remove model.vae")
    if scheduler_file is not None:
        try:
            scheduler_config = json.loads(Path(scheduler_file).read_text())
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"model.pretrained: cannot read {scheduler_file}: {exc}") from None
        check_scheduler_compat(config.objective.name, scheduler_config, f"{pretrained}/scheduler/scheduler_config.json")


def _cached_hub_file(config: TrainConfig, repo_id: str) -> Optional[str]:
    """The cached scheduler config of a hub model (None if not cached); fail now if the model cannot be fetched."""
    from huggingface_hub import constants, try_to_load_from_cache


    try:
        index = try_to_load_from_cache(repo_id, "model_index.json", revision=config.model.revision)
        scheduler = try_to_load_from_cache(repo_id, "scheduler/scheduler_config.json", revision=config.model.revision)
    except ValueError as exc:  # HFValidationError: not a valid repo id
        raise ModelNotFoundError(
            f"model.pretrained: '{repo_id}' is neither an existing directory nor a valid hub id ({str(exc).splitlines()[0]}). "
            "Fix: give a local diffusers pipeline directory or a hub id like stabilityai/stable-diffusion-xl-base-1.0"
        ) from None
    if not isinstance(index, str) and local_only(config.model.local_files_only):
        why = "model.local_files_only=true forbids downloading it" if config.model.local_files_only else offline_reason()
        raise ModelNotFoundError(
            f"model.pretrained: '{repo_id}' is not a local directory and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {why}. {fix_hint(repo_id, 'set model.pretrained=DIR')}"
        )
    return scheduler if isinstance(scheduler, str) else None
