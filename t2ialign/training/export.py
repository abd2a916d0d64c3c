"""Final export in the formats diffusers loads: a UNet directory, or LoRA weights for ``load_lora_weights``."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from t2ialign.config import TrainConfig
from t2ialign.models.lora import is_lora_model, save_lora_weights


def export_model(unet, components, config: TrainConfig, export_dir: Path) -> Path:
    """Write ``export_dir/unet`` (full fine-tune) or ``export_dir/lora`` atomically, plus ``export.json``."""
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if is_lora_model(unet):
        save_lora_weights(unet, tmp / "lora", is_sdxl=components.is_sdxl)
        kind, load_hint = "lora", "pipe.load_lora_weights('<export>/lora')"
    else:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        kind, load_hint = "unet", "UNet2DConditionModel.from_pretrained('<export>/unet'), passed as unet= to the base pipeline"
    manifest = {
        "kind": kind,
        "base_model": config.model.pretrained,
        "objective": config.objective.name,
        "is_sdxl": components.is_sdxl,
        "prediction_type": components.prediction_type,
        "how_to_load": load_hint,
    }
    (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
    if export_dir.exists():
        shutil.rmtree(export_dir)
    os.replace(tmp, export_dir)
    return export_dir
