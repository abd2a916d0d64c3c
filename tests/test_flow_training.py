"""Preference training of rectified-flow pipelines (SD3 / FLUX) on tiny real diffusers pipelines, offline.

The flow ELBO surrogate against an independently written formula, DPO's ln 2 at initialisation, every objective
through ``train`` (full and LoRA), exports that diffusers loads, the cache path, and exact resume after SIGKILL.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers.runs import assert_same_trajectory, checkpoints, cli, killed, metrics, ok

FLOW_OBJECTIVES = ("dpo", "mapo", "dcpo", "sft")


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    from t2ialign.models.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("flow")
    return {"sd3": build_tiny_sd3_pipeline(root / "sd3"), "flux": build_tiny_flux_pipeline(root / "flux")}


def flow_config(pipeline_dir, parquet, output_dir, **sections) -> dict:
    config = {
        "model": {"pretrained": str(pipeline_dir), "reference_dtype": "fp32"},
        "data": {"dataset": str(parquet), "resolution": 32},
        "objective": {"name": "dpo"},
        "optim": {"learning_rate": 1e-3},
        "flow": {"max_sequence_length": 16},  # T5 tokens: the toy captions are shorter
        "output_dir": str(output_dir), "max_steps": 2, "train_batch_size": 2, "log_every": 1, "checkpoint_every": 0,
        "report_to": "none", "progress_bar": False,
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    if config["objective"]["name"] in ("mapo", "sft"):  # reference-free: the key is refused
        del config["model"]["reference_dtype"]
    return config


def train_flow(config: dict):
    from t2ialign.config import load_train_config
    from t2ialign.training import train

    result = train(load_train_config(data=config))
    return result, metrics(Path(config["output_dir"]))


# ---------------------------------------------------------------- the ELBO surrogate


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_flow_noising_matches_the_rectified_flow_formula(shift):
    """Independent transcription: u = sigmoid(N(0, 1)), i = floor(1000 u), s = 1 - i / 1000, sigma = shift s / (1 +
    (shift - 1) s) (SD3's shifted table), z = (1 - sigma) x + sigma eps, v = eps - x; a pair shares eps and sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from t2ialign.flow_noising import FlowTimestepSampling, flow_noisy_latents_and_target

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noised = flow_noisy_latents_and_target(scheduler, latents, FlowTimestepSampling(), torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)
    eps = torch.randn(3, 4, 8, 8, generator=generator).repeat(2, 1, 1, 1)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(3,), generator=generator))
    index = torch.floor(u * 1000).long()
    s = 1.0 - index.double() / 1000.0
    sigma = (shift * s / (1 + (shift - 1) * s)).float().repeat(2)
    torch.testing.assert_close(noised.sigmas, sigma, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(noised.timesteps, sigma * 1000, rtol=1e-6, atol=1e-4)
    expected = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(noised.noisy, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(noised.target, eps - latents)
    assert torch.equal(noised.weights, torch.ones(6))


def test_loss_weightings_follow_the_sd3_paper():
    from t2ialign.flow_noising import FlowTimestepSampling, flow_loss_weights

    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow_loss_weights(FlowTimestepSampling(loss_weighting="sigma_sqrt"), sigmas), sigmas**-2)
    cosmap = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    torch.testing.assert_close(flow_loss_weights(FlowTimestepSampling(loss_weighting="cosmap"), sigmas), cosmap)


# ---------------------------------------------------------------- conditioning


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_prompt_embeddings_equal_the_pipelines_encode_prompt(flow_dirs, family):
    from diffusers import DiffusionPipeline

    from t2ialign.models.flow_text import encode_flow_prompts
    from t2ialign.models.loading import load_components

    components = load_components(str(flow_dirs[family]), load_unet=False, load_vae=False)
    assert components.family == family and components.transformer is None and components.vae is None
    prompts = ["a small red circle at the top left", ""]
    ours = encode_flow_prompts(components, prompts, 16)
    pipe = DiffusionPipeline.from_pretrained(str(flow_dirs[family]))
    with torch.no_grad():  # as the pipeline's __call__ runs it
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=16)
        else:
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=16)
    assert ours.prompt_embeds.shape == embeds.shape and ours.pooled_prompt_embeds.shape == pooled.shape
    assert torch.equal(ours.prompt_embeds, embeds) and torch.equal(ours.pooled_prompt_embeds, pooled)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_flow_objective_trains_and_dpo_starts_at_ln2(flow_dirs, pickapic_parquet, tmp_path, family, lora):
    from t2ialign.models.lora import is_lora_model

    for objective in FLOW_OBJECTIVES:
        config = flow_config(flow_dirs[family], pickapic_parquet, tmp_path / objective, objective={"name": objective},
                             lora={"enabled": lora})
        result, records = train_flow(config)
        assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records), records
        if objective in ("dpo", "dcpo"):  # policy == reference at the first step
            assert abs(records[0]["loss"] - math.log(2)) < 1e-6, (objective, records[0])
            assert records[0]["implicit_acc"] == 0.5
        manifest = json.loads((result.export_dir / "export.json").read_text())
        assert manifest["family"] == family and manifest["kind"] == ("lora" if lora else "transformer")
        assert is_lora_model(result.model) == lora
    assert records[0]["loss"] != records[1]["loss"]  # the weights moved


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_exports_load_with_diffusers(flow_dirs, pickapic_parquet, tmp_path, family):
    """Full: ``from_pretrained`` of the transformer gives the trained weights. LoRA: ``load_lora_weights`` on the
    family's pipeline gives the trained adapter's outputs."""
    from diffusers import DiffusionPipeline

    from t2ialign.models.flow_loading import load_transformer

    full, _ = train_flow(flow_config(flow_dirs[family], pickapic_parquet, tmp_path / "full"))
    reloaded = load_transformer(str(full.export_dir / "transformer"), family)
    trained = full.model.state_dict()
    assert reloaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(reloaded.state_dict()[k], trained[k]) for k in trained)
    base = DiffusionPipeline.from_pretrained(str(flow_dirs[family]))
    assert not all(torch.equal(base.transformer.state_dict()[k], trained[k]) for k in trained)

    lora, _ = train_flow(flow_config(flow_dirs[family], pickapic_parquet, tmp_path / "lora", lora={"enabled": True}))
    pipe = DiffusionPipeline.from_pretrained(str(flow_dirs[family]))
    pipe.load_lora_weights(str(lora.export_dir / "lora"))
    inputs = _transformer_inputs(pipe.transformer, family)
    with torch.no_grad():
        base_out = base.transformer(**inputs, return_dict=False)[0]
        loaded_out = pipe.transformer(**inputs, return_dict=False)[0]
        trained_out = lora.model.eval()(**inputs, return_dict=False)[0]
    assert (loaded_out - base_out).abs().max() > 1e-4, "the adapter changed nothing"
    torch.testing.assert_close(loaded_out, trained_out, rtol=1e-5, atol=1e-6)


def _transformer_inputs(transformer, family: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    if family == "sd3":
        return dict(hidden_states=torch.randn(2, config.in_channels, 8, 8, generator=generator),
                    timestep=torch.tensor([300.0, 800.0]),
                    encoder_hidden_states=torch.randn(2, 20, config.joint_attention_dim, generator=generator),
                    pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator))
    from diffusers import FluxPipeline

    return dict(hidden_states=torch.randn(2, 16, config.in_channels, generator=generator),
                timestep=torch.tensor([0.3, 0.8]), guidance=torch.tensor([3.5, 3.5]),
                encoder_hidden_states=torch.randn(2, 10, config.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
                txt_ids=torch.zeros(10, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_training_from_cache_equals_training_from_images(flow_dirs, pickapic_parquet, tmp_path, family):
    """An fp32 cache (latents + all text embeddings + pooled, the VAE shift stored) trains bit-identically."""
    from t2ialign.config import load_train_config
    from t2ialign.data.cache import build_cache, read_manifest

    cache_dir = tmp_path / "cache"
    settings = flow_config(flow_dirs[family], pickapic_parquet, tmp_path / "unused",
                           data={"cache_dir": str(cache_dir), "cache_dtype": "fp32", "cache_shard_size": 5})
    assert build_cache(load_train_config(data=settings), progress=False).complete
    manifest = read_manifest(cache_dir)
    assert manifest["family"] == family and manifest["shift_factor"] != 0.0
    runs = {}
    for name, cache in (("images", None), ("cache", str(cache_dir))):
        config = flow_config(flow_dirs[family], pickapic_parquet, tmp_path / name, max_steps=3,
                             data={"cache_dir": cache, "prompt_dropout": 0.3})
        runs[name] = train_flow(config)[1]
    assert_same_trajectory(runs["images"], runs["cache"])


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; a bf16 run in this process needs it reset before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_memory_levers(flow_dirs, pickapic_parquet, tmp_path, family, fresh_accelerator_state):
    """Gradient checkpointing changes nothing; bf16 weights with fp32 masters in host RAM (optim.offload) start
    DPO at ln 2 exactly (policy and reference are the same bf16 weights) and export the fp32 masters."""
    from safetensors.torch import load_file

    from accelerate.state import AcceleratorState

    plain = train_flow(flow_config(flow_dirs[family], pickapic_parquet, tmp_path / "plain"))[1]
    checkpointed = train_flow(flow_config(flow_dirs[family], pickapic_parquet, tmp_path / "ckpt", gradient_checkpointing=True))[1]
    assert_same_trajectory(plain, checkpointed)
    AcceleratorState._reset_state(True)
    bf16 = train_flow(flow_config(flow_dirs[family], pickapic_parquet, tmp_path / "bf16", mixed_precision="bf16",
                                  model={"policy_dtype": "bf16", "reference_dtype": "bf16"}, optim={"offload": True}))[1]
    assert bf16[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    exported = load_file(str(next((tmp_path / "bf16/final/transformer").glob("*.safetensors"))))
    assert {t.dtype for t in exported.values()} == {torch.float32}
    # LoRA under bf16: the frozen base (and the text encoders) are read in bf16, the adapters train in fp32
    result, lora = train_flow(flow_config(flow_dirs[family], pickapic_parquet, tmp_path / "lora16", mixed_precision="bf16",
                                          lora={"enabled": True}))
    assert lora[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    dtypes = {("lora_" in n, p.dtype) for n, p in result.model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


def test_inpo_is_refused_for_flow_models_in_one_line(flow_dirs, pickapic_parquet, tmp_path):
    from t2ialign.config import ConfigError, load_train_config
    from t2ialign.preflight import check_model_source

    config = load_train_config(data=flow_config(flow_dirs["sd3"], pickapic_parquet, tmp_path / "run", objective={"name": "inpo"}))
    with pytest.raises(ConfigError, match="'inpo' runs DDIM inversion.*rectified-flow.*objectives that train flow models"):
        check_model_source(config)


# ---------------------------------------------------------------- resume after SIGKILL (real CLI processes)


@pytest.mark.slow
@pytest.mark.parametrize("family,lora", [("sd3", False), ("flux", True)])
def test_flow_run_killed_mid_accumulation_resumes_exactly(flow_dirs, pickapic_parquet, tmp_path, family, lora):
    import yaml

    def config(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(flow_config(
            flow_dirs[family], pickapic_parquet, tmp_path / name, max_steps=3, gradient_accumulation_steps=2,
            checkpoint_every=1, lora={"enabled": lora}, data={"prompt_dropout": 0.2})))
        return path

    train_flow(yaml.safe_load(config("reference").read_text()))  # uninterrupted, in process
    resumed = config("resumed")
    killed(cli("train", str(resumed), kill="micro_step:5"))  # optimizer step 3 half accumulated
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [1, 2]
    ok(cli("train", str(resumed), "--set", "resume=latest"))
    assert_same_trajectory(metrics(tmp_path / "reference"), metrics(tmp_path / "resumed"))
    assert checkpoints(tmp_path / "resumed")[-1] == "checkpoint-00000003"
    kind = "lora" if lora else "transformer"
    a, b = (sorted((tmp_path / run / "final" / kind).glob("*.safetensors")) for run in ("reference", "resumed"))
    from safetensors.torch import load_file

    for left, right in zip(a, b):
        x, y = load_file(str(left)), load_file(str(right))
        assert max(float((x[k] - y[k]).abs().max()) for k in x) <= 1e-6


def test_flux_without_a_guidance_embedding_trains(pickapic_parquet, tmp_path):
    """FLUX.1-schnell's layout (guidance_embeds false): no guidance input, DPO still starts at ln 2."""
    from t2ialign.models.tiny_flow import build_tiny_flux_pipeline

    schnell = build_tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    records = train_flow(flow_config(schnell, pickapic_parquet, tmp_path / "run", lora={"enabled": True}))[1]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(records[1]["loss"])


def test_flow_dpo_defaults_to_the_flow_dpo_beta_and_an_explicit_beta_wins():
    from t2ialign.objectives import FLOW_DPO_BETA, get_objective, objective_params

    for name in ("dpo", "dcpo"):
        spec = get_objective(name)
        assert objective_params(spec, None, {}, flow=True)["beta"] == FLOW_DPO_BETA == 100.0
        assert objective_params(spec, None, {})["beta"] == 5000.0  # the UNet families keep Diffusion-DPO's
        assert objective_params(spec, 250.0, {}, flow=True)["beta"] == 250.0
    assert objective_params(get_objective("mapo"), None, {}, flow=True)["beta"] == 0.1  # MaPO's carries over


def test_other_transformer_pipelines_are_refused_in_one_line(tmp_path):
    from t2ialign.errors import UserFacingError
    from t2ialign.models.loading import load_components

    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    with pytest.raises(UserFacingError, match="is a PixArtAlphaPipeline; t2ialign trains UNet pipelines .*StableDiffusion3Pipeline") as error:
        load_components(str(tmp_path))
    assert "\n" not in str(error.value)
