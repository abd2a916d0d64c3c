"""The YAML recipes shipped in configs/: every one loads and validates, and the memory-mode recipes train."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.runs import cli, metrics, ok

from t2ialign.config import load_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.stem for p in CONFIGS}
    assert {"sdxl_dpo", "sdxl_dpo_lora", "sdxl_mapo", "sdxl_dcpo", "sdxl_inpo", "sdxl_sft", "sdxl_dpo_24gb", "sdxl_dpo_80gb"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(path):
    config = load_train_config(str(path))
    assert config.data.resolution == 1024 and config.mixed_precision == "bf16"
    pairs_per_step_on_8_gpus = config.train_batch_size * config.gradient_accumulation_steps * 8
    if config.objective.name == "dpo" and not config.lora.enabled:
        assert pairs_per_step_on_8_gpus == 2048, "the published effective batch"


def test_accelerate_launch_configs_parse():
    for path in (CONFIGS[0].parent / "accelerate").glob("*.yaml"):
        launch = yaml.safe_load(path.read_text())
        assert launch["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED"), path


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sdxl_dpo_24gb", "sdxl_dpo_80gb"])
def test_memory_mode_recipes_train_on_the_tiny_model(recipe, tmp_path, tiny_sdxl_dir, pickapic_parquet):
    """The recipe's levers together (bf16 weights + offload + checkpointing mode + channels-last) through the CLI;
    only the model, data, sizes and the CPU-hostile compile are overridden."""
    overrides = [f"model.pretrained={tiny_sdxl_dir}", "model.vae=null", f"data.dataset={pickapic_parquet}",
                 "data.cache_dir=null", "data.resolution=32", "data.num_workers=0", "compile=false", "max_steps=2",
                 "train_batch_size=2", "gradient_accumulation_steps=2", "checkpoint_every=0", "report_to=none",
                 f"output_dir={tmp_path / 'run'}", "progress_bar=false", "optim.warmup_steps=0", "log_every=1"]
    proc = ok(cli("train", str(CONFIGS[0].parent / f"{recipe}.yaml"), *[a for o in overrides for a in ("--set", o)]))
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.6931471805599453, abs=1e-6), proc.stderr[-2000:]
    assert (tmp_path / "run/final/unet/diffusion_pytorch_model.safetensors").is_file()


def test_report_to_wandb_without_wandb_installed_names_the_extra():
    import importlib.util

    from t2ialign.config import ConfigError, load_train_config

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"t2ialign\[wandb\]"):
        load_train_config(data={"report_to": "wandb"})
