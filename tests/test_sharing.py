"""Sharing a run (t2ialign.sharing, ``t2ialign push``): the kohya LoRA copy, the upload folder and its model card,
and the offline refusal of the upload. Runs are built with the real export (training/export.py) of a tiny
SDXL UNet, no training: a LoRA with non-zero B matrices and alpha != rank, so the scale conversion counts."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

REPO_ID = "me/tiny-dpo"
EVAL_REPORT = {
    "title": "t2ialign evaluation", "models": ["base", "dpo"], "scorers": ["pickscore"], "n_prompts": 8,
    "settings": {"n_boot": 100, "ci": 0.95, "seed": 0, "baseline": "base"},
    "win_rates": [
        {"model_a": "dpo", "model_b": "base", "scorer": "pickscore", "win_rate": 0.625, "low": 0.375, "high": 0.875,
         "wins": 5, "ties": 0, "losses": 3, "n": 8, "category": None},
        {"model_a": "dpo", "model_b": "base", "scorer": "pickscore", "win_rate": 0.5, "low": 0.0, "high": 1.0,
         "wins": 1, "ties": 0, "losses": 1, "n": 2, "category": "animals"},
    ],
}


def make_run(root: Path, pipeline_dir, lora: bool, **config_changes) -> Path:
    """A run folder as ``t2ialign train`` leaves it: final/ (the real export), config.yaml, metrics.jsonl, runs.jsonl."""
    from diffusers import UNet2DConditionModel

    from t2ialign.config import TrainConfig, to_dict
    from t2ialign.models.lora import add_lora
    from t2ialign.training.export import export_model

    run = root / ("lora-run" if lora else "full-run")
    run.mkdir(parents=True)
    config = TrainConfig()
    config.model.pretrained = str(pipeline_dir)
    config.output_dir = str(run)
    config.data.dataset = str(root / "pairs.parquet")  # a local file: no datasets entry on the card
    config.max_steps, config.train_batch_size, config.gradient_accumulation_steps = 3, 2, 2
    config.optim.learning_rate = 1e-4
    config.lora.enabled, config.lora.rank, config.lora.alpha = lora, 4, 2.0
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    if lora:
        add_lora(unet, rank=4, alpha=2.0)
        torch.manual_seed(0)
        with torch.no_grad():  # B = 0 at init: make the adapter do something
            for name, parameter in unet.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.5)
    export_model(unet, SimpleNamespace(is_sdxl=True, prediction_type="epsilon"), config, run / "final")
    as_dict = to_dict(config)
    for dotted, value in config_changes.items():
        section, _, key = dotted.partition("__")
        as_dict[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(as_dict, sort_keys=False))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.69}) + "\n" for s in (1, 2, 3)))
    (run / "runs.jsonl").write_text(json.dumps({"event": "new", "step": 0, "config": as_dict}) + "\n")
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sdxl_dir):
    return make_run(tmp_path_factory.mktemp("share"), tiny_sdxl_dir, lora=True)


def sample(pipe) -> torch.Tensor:
    return pipe(prompt="a red circle", num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_kohya_lora_loads_to_the_same_images_as_the_diffusers_file(lora_run, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    lora_dir = lora_run / "final" / "lora"
    kohya_file = lora_dir / "lora-run_kohya.safetensors"
    assert kohya_file.is_file(), sorted(p.name for p in lora_dir.iterdir())  # written by the training export
    with safe_open(str(kohya_file), framework="pt") as handle:
        keys = list(handle.keys())
        assert all(k.startswith("lora_unet_") for k in keys)
        alphas = {float(handle.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert alphas == {2.0}, alphas  # lora.alpha, not diffusers' converter's default (= rank 4)
    assert any(k.endswith("_attn1_to_out_0.lora_up.weight") for k in keys)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = sample(pipe)
    pipe.load_lora_weights(str(lora_dir))  # the directory: diffusers picks pytorch_lora_weights.safetensors
    with_diffusers = sample(pipe)
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    fresh.load_lora_weights(str(kohya_file))
    with_kohya = sample(fresh)
    assert (with_diffusers - base).abs().max() > 1e-2, "the LoRA does not change the images"
    torch.testing.assert_close(with_kohya, with_diffusers, rtol=0, atol=1e-5)


def test_lora_share_folder_has_both_formats_config_and_a_card_that_parses(lora_run, tmp_path):
    from huggingface_hub import ModelCard, ModelCardData

    from t2ialign.sharing import prepare_share_folder

    out = prepare_share_folder(lora_run, tmp_path / "share", eval_report=EVAL_REPORT, repo_id=REPO_ID)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.yaml", "eval_report.json", "export.json", "lora_config.json",
                     "pytorch_lora_weights.safetensors", "tiny-dpo_kohya.safetensors"]
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert ModelCardData(**data).to_dict() == data  # validate() needs the hub; the local round-trip is the check
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"text-to-image", "diffusers", "dpo", "lora", "stable-diffusion-xl"} <= set(data["tags"])
    assert "base_model" not in data and "datasets" not in data  # local paths are not hub ids
    text = card.text
    assert "| pickscore | dpo | base | 0.625 | [0.375, 0.875] | 5 / 0 / 3 | 8 |" in text
    assert "animals" not in text  # the per-category rows stay in eval_report.json
    assert "95% CI" in text and "beta = 5000" in text
    assert "4 pairs per optimizer step (2 per micro-batch x 2 accumulation x 1 process(es))" in text
    assert "| Optimizer steps | 3 (of max_steps = 3) |" in text and "rank 4, alpha 2.0" in text
    assert f'pipe.load_lora_weights("{REPO_ID}", weight_name="pytorch_lora_weights.safetensors")' in text
    assert "`tiny-dpo_kohya.safetensors`" in text


def test_full_finetune_share_folder_card_metadata_from_hub_ids(tmp_path, tiny_sdxl_dir):
    from huggingface_hub import ModelCard

    from t2ialign.sharing import prepare_share_folder

    run = make_run(tmp_path, tiny_sdxl_dir, lora=False, model__pretrained="stabilityai/stable-diffusion-xl-base-1.0",
                   data__dataset="yuvalkirstain/pickapic_v2", objective__name="mapo")
    out = prepare_share_folder(run, tmp_path / "share", repo_id=REPO_ID)
    assert (out / "unet" / "config.json").is_file() and (out / "config.yaml").is_file()
    assert not list(out.glob("*.safetensors"))
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert data["datasets"] == ["yuvalkirstain/pickapic_v2"] and data["license"] == "openrail++"
    assert "mapo" in data["tags"] and "lora" not in data["tags"]
    text = (out / "README.md").read_text()
    assert f'UNet2DConditionModel.from_pretrained("{REPO_ID}", subfolder="unet"' in text
    assert "No evaluation report was attached" in text


def test_push_offline_writes_the_folder_and_fails_in_one_line(lora_run, tmp_path, capsys):
    from t2ialign.cli import main

    out = tmp_path / "upload"
    assert main(["push", str(lora_run), "--repo-id", REPO_ID, "--folder-only", str(out)]) == 0
    assert (out / "README.md").is_file()
    capsys.readouterr()
    assert main(["push", str(lora_run), "--repo-id", REPO_ID, "--private"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    share = lora_run / "share"
    assert (share / "pytorch_lora_weights.safetensors").is_file()
    assert "HF_HUB_OFFLINE=1 is set" in lines[0] and f"written locally at {share}" in lines[0]
    assert f"`hf upload {REPO_ID} {share} . --repo-type model --private`" in lines[0]


def test_push_refuses_a_run_without_export_and_a_bad_repo_id(tmp_path, capsys):
    from t2ialign.cli import main

    (tmp_path / "run").mkdir()
    assert main(["push", str(tmp_path / "run"), "--repo-id", REPO_ID, "--folder-only", str(tmp_path / "o")]) == 2
    assert "no final/ export" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "run"), "--repo-id", "no-slash"]) == 2
    assert "expected USER/NAME" in capsys.readouterr().err


def test_push_to_hub_after_training_offline_keeps_the_run_and_names_the_retry(tmp_path, tiny_sdxl_dir, pickapic_parquet,
                                                                             caplog, monkeypatch):
    """`push_to_hub: USER/NAME` in a train config: the share folder (with its card) is written after the export;
    offline the upload is a warning naming `hf upload`, and the run itself completes."""
    import logging

    from huggingface_hub import ModelCard

    from helpers.runs import write_config
    from t2ialign.config import ConfigError, load_train_config
    from t2ialign.training import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "run",
                                      max_steps=2, checkpoint_every=0, lora={"enabled": True, "rank": 4}).read_text())
    with pytest.raises(ConfigError, match="push_to_hub"):
        load_train_config(data={**raw, "push_to_hub": "not a repo id"})
    with caplog.at_level(logging.WARNING, logger="t2ialign.training.loop"):
        result = train(load_train_config(data={**raw, "push_to_hub": "me/toy-dpo"}))
    assert result.final_step == 2 and (tmp_path / "run" / "final" / "export.json").is_file()
    (warning,) = [r.getMessage() for r in caplog.records if "hf upload" in r.getMessage()]
    assert "hf upload me/toy-dpo" in warning and str(tmp_path / "run" / "share") in warning
    card = ModelCard.load(tmp_path / "run" / "share" / "README.md")
    assert "me/toy-dpo" in card.text and (tmp_path / "run" / "share" / "pytorch_lora_weights.safetensors").is_file()
