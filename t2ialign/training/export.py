"""Final export in the formats diffusers loads: a UNet directory, or LoRA weights for ``load_lora_weights``."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from t2ialign.config import TrainConfig
from t2ialign.models.lora import KOHYA_SUFFIX, LORA_WEIGHTS_NAME, export_kohya_lora, is_lora_model, save_lora_weights

logger = logging.getLogger(__name__)


def kohya_file_name(name: str) -> str:
    """``<name>_kohya.safetensors`` with ``name`` reduced to characters every tool and file system accepts."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-") or "lora") + KOHYA_SUFFIX


def write_kohya_copy(lora_dir: Path, name: str):
    """The kohya / A1111 / ComfyUI file beside the diffusers one; a failed conversion is logged, not fatal
    (the diffusers file is the export that counts, and ``t2ialign push`` converts again)."""
    try:
        return export_kohya_lora(Path(lora_dir) / LORA_WEIGHTS_NAME, Path(lora_dir) / kohya_file_name(name))
    except Exception as exc:  # noqa: BLE001 - keep the run's export whatever the converter does
        logger.warning("final export: could not write the kohya-format LoRA copy (%s); the diffusers file is complete", exc)
        return None


def _export_flow(transformer, family: str, tmp: Path) -> tuple[str, str]:
    """``transformer/`` (full fine-tune) or ``lora/`` in the format the family's pipeline loads."""
    from t2ialign.models.lora import save_transformer_lora_weights

    if is_lora_model(transformer):
        save_transformer_lora_weights(transformer, tmp / "lora", family)
        return "lora", "pipe.load_lora_weights('<export>/lora')"
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    cls = type(getattr(transformer, "module", transformer)).__name__
    return "transformer", f"{cls}.from_pretrained('<export>/transformer'), passed as transformer= to the base pipeline"


def export_model(unet, components, config: TrainConfig, export_dir: Path) -> Path:
    """Write ``export_dir/unet`` (full fine-tune) or ``export_dir/lora`` atomically, plus ``export.json``."""
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    family = getattr(components, "family", "sdxl" if components.is_sdxl else "sd")
    if getattr(components, "is_flow", False):
        kind, load_hint = _export_flow(unet, family, tmp)
    elif is_lora_model(unet):
        save_lora_weights(unet, tmp / "lora", is_sdxl=components.is_sdxl)
        write_kohya_copy(tmp / "lora", Path(config.output_dir).name)
        kind, load_hint = "lora", "pipe.load_lora_weights('<export>/lora')"
    else:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        kind, load_hint = "unet", "UNet2DConditionModel.from_pretrained('<export>/unet'), passed as unet= to the base pipeline"
    manifest = {
        "kind": kind,
        "base_model": config.model.pretrained,
        "objective": config.objective.name,
        "is_sdxl": components.is_sdxl,
        "family": family,
        "prediction_type": components.prediction_type,
        "how_to_load": load_hint,
        # processes of the run (accelerate / torchrun set WORLD_SIZE): the effective batch on the model card
        "num_processes": int(os.environ.get("WORLD_SIZE", "1") or 1),
    }
    (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
    if export_dir.exists():
        shutil.rmtree(export_dir)
    os.replace(tmp, export_dir)
    return export_dir
