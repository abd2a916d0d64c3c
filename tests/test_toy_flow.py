"""The rectified-flow toy: a short flow-matching pretrain of a tiny StableDiffusion3Pipeline, pairs drawn from it,
a DPO run on it through ``train()``, and ``t2ialign demo --family sd3`` end to end, all on tiny settings."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from t2ialign.toy import world

TINY = dict(num_images=64, steps=2, batch_size=8)


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    """The SDXL toy base whose VAE and CLIP encoders the flow toy reuses (materialised from the shipped weights)."""
    from t2ialign.toy import shipped
    from t2ialign.toy.pretrain import PretrainConfig

    return shipped.materialise(tmp_path_factory.mktemp("sdxl") / "pipeline", PretrainConfig())


@pytest.fixture(scope="module")
def flow_base(tmp_path_factory, sdxl_base):
    from t2ialign.toy.flow_pretrain import FlowPretrainConfig, pretrain_flow_pipeline

    return pretrain_flow_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline", FlowPretrainConfig(**TINY), base_dir=sdxl_base)


def test_flow_pretrain_writes_an_sd3_pipeline_on_the_sdxl_toys_vae_and_text_encoders(flow_base, sdxl_base):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    from t2ialign.toy.flow_pretrain import T5_LENGTH

    info = json.loads((flow_base / "toy_info.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(flow_base)
    sdxl = DiffusionPipeline.from_pretrained(sdxl_base)
    assert isinstance(pipe, StableDiffusion3Pipeline) and info["family"] == "sd3" and info["max_sequence_length"] == T5_LENGTH
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == pytest.approx((info["shift_factor"], info["scaling_factor"]))
    for name, tensor in sdxl.vae.state_dict().items():  # the trained VAE, only its latent normalisation is new
        assert torch.equal(pipe.vae.state_dict()[name], tensor)
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder_2.parameters(), sdxl.text_encoder_2.parameters()))
    clip_l = sdxl.text_encoder.state_dict()  # SDXL's first encoder, now with a projection for SD3's pooling
    assert all(torch.equal(tensor, clip_l[name]) for name, tensor in pipe.text_encoder.text_model.state_dict().items())
    assert pipe.tokenizer_3.model_max_length == T5_LENGTH and pipe.transformer.config.in_channels == sdxl.vae.config.latent_channels
    images = pipe(["a small red circle at the top left"], num_inference_steps=2, guidance_scale=4.0, output_type="pt",
                  max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, world.RESOLUTION, world.RESOLUTION) and torch.isfinite(images).all()


def test_sd3_latent_normalisation_gives_unit_latents(sdxl_base):
    """shift / scale as SD3 defines them: (z - shift) * scale has mean 0 and std 1 over the data it was fitted on."""
    from diffusers import AutoencoderKL

    from t2ialign.toy.flow_pretrain import normalise_vae
    from t2ialign.toy.pretrain import encode_images

    vae = AutoencoderKL.from_pretrained(sdxl_base / "vae")
    means, _ = encode_images(vae, world.sample_images(32, seed=5)[0])
    shift, scale = normalise_vae(vae, means)
    normalised = (means - vae.config.shift_factor) * vae.config.scaling_factor
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (shift, scale)
    assert abs(normalised.mean().item()) < 1e-5 and abs(normalised.std().item() - 1) < 1e-5


def test_flow_cache_key_and_reuse(monkeypatch, tmp_path, flow_base):
    from t2ialign.toy import flow_pretrain
    from t2ialign.toy.flow_pretrain import FlowPretrainConfig, flow_cache_dir
    from t2ialign.toy.pretrain import PretrainConfig

    monkeypatch.setenv("T2IALIGN_CACHE", str(tmp_path))
    default = FlowPretrainConfig()
    assert flow_cache_dir(default).parent == tmp_path / "toy" and flow_cache_dir(default) == flow_cache_dir(FlowPretrainConfig())
    assert flow_cache_dir(default.with_steps(7)) != flow_cache_dir(default)
    assert flow_cache_dir(FlowPretrainConfig(base=PretrainConfig(unet_steps=7))) != flow_cache_dir(default)
    shutil.copytree(flow_base, flow_cache_dir(default.with_steps(3)))
    monkeypatch.setattr(flow_pretrain, "pretrain_flow_pipeline", lambda *a, **k: pytest.fail("retrained a cached model"))
    assert flow_pretrain.get_flow_toy_pipeline(steps=3) == flow_cache_dir(default.with_steps(3))


def test_pairs_from_the_flow_toy_have_the_pickapic_schema(flow_base, tmp_path):
    import datasets

    from t2ialign.toy.pairs import FLOW_BASE_MODEL_NAME, build_preference_pairs

    path = build_preference_pairs(flow_base, out_dir=tmp_path / "pairs", num_pairs=4, num_inference_steps=2, seed=1)
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    for column in ("jpg_0", "jpg_1", "label_0", "label_1", "caption", "caption_0", "caption_1", "model_0", "model_1",
                   "best_image_uid", "image_0_uid", "image_1_uid", "ranking_id", "user_id", "reward_0", "reward_1"):
        assert column in rows.column_names
    assert len(rows) == 4 and set(rows["model_0"]) == {FLOW_BASE_MODEL_NAME}
    for row in rows:
        assert row["label_0"] + row["label_1"] == 1.0
        assert row["label_0"] == 0.5 or (row["label_0"] == 1.0) == (row["reward_0"] > row["reward_1"])


@pytest.fixture(scope="module")
def flow_pairs(flow_base, tmp_path_factory):
    from t2ialign.toy.pairs import build_preference_pairs

    return build_preference_pairs(flow_base, out_dir=tmp_path_factory.mktemp("flow_pairs"), num_pairs=8,
                                  num_inference_steps=2, seed=0)


def test_dpo_on_the_flow_toy_starts_at_ln2_and_exports_a_lora_the_pipeline_loads(flow_base, flow_pairs, tmp_path):
    from t2ialign.config import load_train_config
    from t2ialign.toy.demo import DemoSettings, train_config
    from t2ialign.toy.flow_pretrain import T5_LENGTH
    from t2ialign.training import train

    raw = train_config(DemoSettings(family="sd3", train_batch_size=2), flow_base, flow_pairs, "dpo", tmp_path / "run", 2)
    assert raw["flow"] == {"max_sequence_length": T5_LENGTH} and "add_q_proj" in raw["lora"]["target_modules"]
    result = train(load_train_config(data={**raw, "log_every": 1, "progress_bar": False, "resume": None}))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # the adapter starts at zero, so policy == reference and the DPO loss is -log sigmoid(0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    export = json.loads((result.export_dir / "export.json").read_text())
    assert (export["kind"], export["family"]) == ("lora", "sd3")
    from t2ialign.models.pipeline import load_pipeline

    pipe = load_pipeline(str(flow_base), aligned=str(result.export_dir))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_demo_family_sd3_end_to_end(monkeypatch, tmp_path, flow_base):
    from t2ialign.toy.demo import DemoSettings, run_demo
    from t2ialign.toy.flow_pretrain import FlowPretrainConfig, flow_cache_dir

    monkeypatch.setenv("T2IALIGN_CACHE", str(tmp_path / "cache"))
    shutil.copytree(flow_base, flow_cache_dir(FlowPretrainConfig().with_steps(2)))  # the demo's base: no pretraining here
    settings = DemoSettings(family="sd3", output_dir=str(tmp_path / "demo"), num_pairs=8, pair_sample_steps=2,
                            train_steps=2, curve_points=1, train_batch_size=2, num_eval_prompts=3, sample_steps=2,
                            pretrain_steps=2, workers=1)
    assert settings.objectives == ["dpo", "mapo", "dcpo", "sft"] and settings.rlg_scales == [0.0, 0.5, 1.0, 1.5, 2.0]
    settings.objectives = ["dpo", "dcpo"]  # trained from the images (random flips) / from the pairs' latent cache
    settings.rlg_scales = [0.0, 0.5, 1.0]  # RL guidance on the flow toy: w = 0 / 1 reuse the base / aligned samples
    report = run_demo(settings)
    assert report["rlg_sweep"] and (tmp_path / "demo" / "rlg").is_dir()
    assert [row["objective"] for row in report["results"]] == settings.objectives
    for row in report["results"]:
        assert 0.0 <= row["ci_low"] <= row["win_rate"] <= row["ci_high"] <= 1.0
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert json.loads((tmp_path / "demo" / "runs" / "dpo" / "final" / "export.json").read_text())["family"] == "sd3"


def test_demo_refuses_inpo_on_the_flow_toy_and_the_cli_takes_the_family(tmp_path):
    from t2ialign.cli import build_parser
    from t2ialign.errors import UserFacingError
    from t2ialign.toy.demo import DemoSettings, check_settings

    with pytest.raises(UserFacingError, match="inpo"):
        check_settings(DemoSettings(family="sd3", objectives=["dpo", "inpo"]))
    check_settings(DemoSettings(family="sd3", rlg_scales=[0.0, 1.0]))  # RL guidance works on the flow toy
    check_settings(DemoSettings(objectives=["inpo"]))  # the UNet toy trains it, with its sweep
    args = build_parser().parse_args(["demo", "--family", "sd3", "--objectives", "dpo"])
    assert args.family == "sd3"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--family", "flux"])
    args = build_parser().parse_args(["toy", "pretrain", "--family", "sd3", "--steps", "3"])
    assert (args.family, args.steps) == ("sd3", 3)
    with pytest.raises(UserFacingError, match="only the sdxl toy base ships"):
        args.func(build_parser().parse_args(["toy", "pretrain", "--family", "sd3", "--verify-shipped"]))
