"""Validation during training (t2ialign.training.validation) for rectified-flow models (SD3 / FLUX), on tiny real
pipelines, offline: the family's pipeline samples from the live policy transformer, the toy scorers score the
images, the implicit-reward accuracy on held-out pairs uses the flow ELBO surrogate, and the training run is the
same, bit for bit, as without validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.runs import metrics

PROMPTS = ["a red circle", "a blue square at the top left"]


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    from t2ialign.models.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("flow-validation")
    return {"sd3": build_tiny_sd3_pipeline(root / "sd3"), "flux": build_tiny_flux_pipeline(root / "flux")}


def _config(pipeline_dir, parquet, output_dir, validation=None, **extra) -> dict:
    config = {
        "model": {"pretrained": str(pipeline_dir)},
        "data": {"dataset": str(parquet), "resolution": 32, "random_flip": False},
        "objective": {"name": "dpo"}, "optim": {"learning_rate": 1e-2, "weight_decay": 0.0},
        "lora": {"enabled": True, "rank": 4},
        "flow": {"max_sequence_length": 16},  # T5 tokens: the prompts are shorter (pipeline default: 256 / 512)
        "output_dir": str(output_dir), "seed": 0, "max_steps": 2, "train_batch_size": 2, "log_every": 1,
        "checkpoint_every": 0, "report_to": "none", "progress_bar": False, **extra,
    }
    if validation is not None:  # 32 px: FLUX's pipeline would sample 1024 px (its default_sample_size) otherwise
        config["validation"] = {"every": 1, "prompts": PROMPTS, "resolution": 32, "num_inference_steps": 2,
                                "batch_size": 2, "scorers": ["toy.vividness"], **validation}
    return config


def _train(config: dict):
    from t2ialign.config import load_train_config
    from t2ialign.training import train

    return train(load_train_config(data=config))


def _validation(records: list) -> list:
    return [r for r in records if r.get("validation")]


def _training(records: list) -> list:
    return [r for r in records if not r.get("validation") and "alarm" not in r]


def _check_step_dirs(output_dir: Path, steps) -> None:
    for step in steps:
        out = output_dir / "validation" / f"step-{step:08d}"
        assert sorted(p.name for p in (out / "images").glob("*.png")) == ["00000_0.png", "00001_0.png"], step
        rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == PROMPTS and all(0 <= r["toy.vividness"] <= 1 for r in rows)


def test_sd3_validation_writes_images_and_scores_without_changing_the_training_run(flow_dirs, pickapic_parquet, tmp_path):
    """LoRA DPO on SD3: validation at steps 0, 1, 2 (images, scores, implicit accuracy, tensorboard) and the
    training records and the trained weights of the run without validation, bit for bit."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    validation = {"preference_split": "train", "max_pairs": 4}
    with_val = _train(_config(flow_dirs["sd3"], pickapic_parquet, tmp_path / "with", validation, report_to="tensorboard"))
    without = _train(_config(flow_dirs["sd3"], pickapic_parquet, tmp_path / "without"))

    records = metrics(with_val.output_dir)
    assert _training(records) == metrics(without.output_dir) and len(_training(records)) == 2
    trained, plain = with_val.model.state_dict(), without.model.state_dict()
    assert trained.keys() == plain.keys() and all(torch.equal(trained[k], plain[k]) for k in trained)
    assert with_val.model.training and not any(  # handed back in train mode, every module as before
        m.training != n.training for m, n in zip(with_val.model.modules(), without.model.modules()))

    val = _validation(records)
    assert [r["step"] for r in val] == [0, 1, 2]
    assert all({"val/toy.vividness", "val/implicit_acc", "val/seconds"} <= set(r) for r in val)
    assert val[0]["val/implicit_acc"] == 0.5  # LoRA at step 0: the policy is its reference, every margin a tie
    _check_step_dirs(with_val.output_dir, [0, 1, 2])
    images = {s: Image.open(with_val.output_dir / f"validation/step-{s:08d}/images/00000_0.png") for s in (0, 2)}
    assert images[0].size == (32, 32)
    assert images[0].tobytes() != images[2].tobytes()  # the live policy samples: the trained adapters show

    events = EventAccumulator(str(with_val.output_dir / "logs" / "t2ialign"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"val/toy.vividness", "val/implicit_acc", "loss"} <= set(events.Tags()["scalars"])
    logged = {e.step: e.value for e in events.Scalars("val/toy.vividness")}
    assert logged == pytest.approx({r["step"]: r["val/toy.vividness"] for r in val})
    assert {e.step for tag in events.Tags()["images"] if tag.startswith("val/images") for e in events.Images(tag)} == {0, 1, 2}


def test_flux_lora_run_with_validation(flow_dirs, pickapic_parquet, tmp_path):
    """FLUX (packed latents, distilled guidance, dynamic shift) through FluxPipeline at 32 px, and its base samples
    equal the pipeline's own, loaded from disk and called as ``t2ialign sample`` calls it."""
    from diffusers import FluxPipeline
    from PIL import Image

    from t2ialign.evaluation.sampling import initial_latents

    validation = {"preference_split": "train", "max_pairs": 4, "guidance_scale": 3.5}
    result = _train(_config(flow_dirs["flux"], pickapic_parquet, tmp_path / "flux", validation))
    val = _validation(metrics(result.output_dir))
    assert [r["step"] for r in val] == [0, 1, 2] and val[0]["val/implicit_acc"] == 0.5
    assert all(0 <= r["val/implicit_acc"] <= 1 for r in val)
    _check_step_dirs(result.output_dir, [0, 1, 2])

    pipe = FluxPipeline.from_pretrained(str(flow_dirs["flux"]))
    seed = 1  # image 0 of prompt 1: seed 0 + 1 * num_images + 0
    with torch.no_grad():
        image = pipe(prompt=[PROMPTS[1]], latents=initial_latents(pipe, [seed], 32, 32), height=32, width=32,
                     num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16,
                     generator=[torch.Generator().manual_seed(seed + 1)]).images[0]
    saved = Image.open(result.output_dir / "validation/step-00000000/images/00001_0.png")
    assert saved.tobytes() == image.tobytes()


def test_sd3_cache_run_validates_with_the_pipelines_own_vae_and_text_encoders(flow_dirs, pickapic_parquet, tmp_path):
    """A cached-latent run loads neither VAE nor text encoders: the validation pipeline loads them itself, samples
    the same base images as an image run, and skips the implicit accuracy (no VAE to encode held-out pairs)."""
    from t2ialign.config import load_train_config
    from t2ialign.data.cache import build_cache

    cache_dir = tmp_path / "cache"
    settings = _config(flow_dirs["sd3"], pickapic_parquet, tmp_path / "unused",
                       data={"dataset": str(pickapic_parquet), "resolution": 32, "cache_dir": str(cache_dir)})
    assert build_cache(load_train_config(data=settings), progress=False).complete
    validation = {"preference_split": "train", "max_pairs": 4}
    cached = _train(_config(flow_dirs["sd3"], pickapic_parquet, tmp_path / "cached", validation, max_steps=1,
                            data={"dataset": str(pickapic_parquet), "resolution": 32, "cache_dir": str(cache_dir)}))
    images = _train(_config(flow_dirs["sd3"], pickapic_parquet, tmp_path / "images", validation, max_steps=1))
    val = _validation(metrics(cached.output_dir))
    assert [r["step"] for r in val] == [0, 1] and "val/implicit_acc" not in val[0] and "val/toy.vividness" in val[0]
    base = [run.output_dir / "validation/step-00000000/images/00001_0.png" for run in (cached, images)]
    assert base[0].read_bytes() == base[1].read_bytes()


def test_flow_pair_errors_match_the_rectified_flow_formula(flow_dirs, pickapic_parquet):
    """The held-out errors behind ``val/implicit_acc`` against an independent transcription on the SD3 pipeline's
    own modules: x = (posterior mean - shift) * scale, one eps and one sigma per pair (u = sigmoid(N(0, 1)),
    i = floor(1000 u), s = 1 - i / 1000, sigma = 3 s / (1 + 2 s)), z = (1 - sigma) x + sigma eps, error = mean (v_hat -
    (eps - x))^2, with the pair's prompt for winner and loser; the reference (a perturbed copy) on the same draws."""
    import copy

    from diffusers import StableDiffusion3Pipeline

    from t2ialign.evaluation.preference_accuracy import _pair_batches
    from t2ialign.models.loading import load_components
    from t2ialign.training.flow_step import FlowSettings
    from t2ialign.training.step import StepModels
    from t2ialign.training.validation import flow_pair_errors

    components = load_components(str(flow_dirs["sd3"]))
    policy = components.transformer.eval()
    reference = copy.deepcopy(policy)
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=noise))
    models = StepModels(policy=policy, policy_unwrapped=policy, reference=reference, components=components)
    batch = next(_pair_batches(str(pickapic_parquet), "train", 32, 3, 3))
    with torch.no_grad():
        ours = flow_pair_errors(models, FlowSettings(max_sequence_length=16), batch, torch.Generator().manual_seed(3))

    pipe = StableDiffusion3Pipeline.from_pretrained(str(flow_dirs["sd3"]))
    with torch.no_grad():
        mean = pipe.vae.encode(batch["pixel_values"]).latent_dist.mean
        x = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        generator = torch.Generator().manual_seed(3)
        eps = torch.randn(x[:3].shape, generator=generator).repeat(2, 1, 1, 1)
        s = 1 - torch.floor(1000 * torch.sigmoid(torch.normal(0.0, 1.0, size=(3,), generator=generator))) / 1000
        sigma = (3 * s / (1 + 2 * s)).repeat(2).view(-1, 1, 1, 1)
        z = (1 - sigma) * x + sigma * eps
        embeds, _, pooled, _ = pipe.encode_prompt(list(batch["captions"]) * 2, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=16)
        for model, errors in zip((pipe.transformer, reference), ours):
            v_hat = model(hidden_states=z, timestep=1000 * sigma.flatten(), encoder_hidden_states=embeds,
                          pooled_projections=pooled).sample
            torch.testing.assert_close(errors, ((v_hat - (eps - x)) ** 2).mean((1, 2, 3)), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours[0], ours[1])  # the perturbed reference really differs
