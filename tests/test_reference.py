"""The frozen reference computes exactly what the policy computes at initialisation (t2ialign.models.reference).

The tiny fixture's UNet is random with norm scales 1 and biases 0, which every dtype holds exactly, so a
plain half-precision copy would look exact on it. ``trained_like_dir`` perturbs every weight (as training
does), which makes the rounding of a plain copy visible: the control test shows the check can fail.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers.runs import cli, metrics, ok, write_config

from t2ialign.config import load_train_config
from t2ialign.models.reference import frozen_reference, reference_compute_dtype
from t2ialign.objectives import get_objective, objective_params
from t2ialign.training.setup import build_policy_and_reference, load_training_components
from t2ialign.training.step import StepModels, preference_step

LN2 = math.log(2.0)
# one optimizer step (AdamW, lr 1e-6) later, compiled and eager runs round differently in the update itself
COMPILED_VS_EAGER_TOLERANCE = 2e-3


def _move_weights_off_the_bf16_grid(pipeline_dir):
    """Perturb every saved UNet weight, as training does (norm scales no longer exactly 1)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    unet.save_pretrained(pipeline_dir / "unet")
    return pipeline_dir


@pytest.fixture(scope="module")
def trained_like_dir(tiny_sdxl_dir, tmp_path_factory):
    """The tiny SDXL pipeline with every UNet weight moved off the bf16 grid (norm scales no longer 1)."""
    import shutil

    target = tmp_path_factory.mktemp("trained_like") / "pipeline"
    shutil.copytree(tiny_sdxl_dir, target)
    return _move_weights_off_the_bf16_grid(target)


def _batch(num_pairs=4, seed=0, original_size=(31, 45)):
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2 * num_pairs, 4, 16, 16, generator=generator),
        "captions": [f"a red circle number {i}" for i in range(num_pairs)],
        # sizes bf16 cannot hold exactly (45 is, 1023 is not): the reference must take the policy's inputs
        "original_sizes": torch.tensor([[1023, original_size[1]]] * (2 * num_pairs)),
        "crop_top_left": torch.tensor([[3, 0]] * (2 * num_pairs)),
    }


def _first_dpo_output(pipeline_dir, *, mixed_precision="bf16", reference_dtype="bf16", policy_dtype="fp32",
                      lora=False, plain_copy=False):
    data = {"model": {"pretrained": str(pipeline_dir), "reference_dtype": reference_dtype, "policy_dtype": policy_dtype},
            "data": {"dataset": "unused", "resolution": 32}, "objective": {"name": "dpo", "beta": 5000},
            "mixed_precision": mixed_precision, "lora": {"enabled": lora}, "report_to": "none",
            "optim": {"offload": policy_dtype == "bf16"}}
    config = load_train_config(data=data)
    spec = get_objective("dpo")
    components = load_training_components(config, "cpu")
    policy, reference, _ = build_policy_and_reference(config, spec, components)
    if plain_copy:  # what the authors' trainer does: ref_unet.to(weight_dtype)
        import copy

        reference = copy.deepcopy(policy).requires_grad_(False).to(torch.bfloat16)
    models = StepModels(policy, policy, reference, components, lora=lora)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    with autocast:
        return preference_step(models, spec, objective_params(spec, 5000, {}), _batch(), resolution=32,
                               prompt_dropout=0.0, generator=torch.Generator().manual_seed(1)), reference


@pytest.mark.parametrize("mixed_precision, reference_dtype, policy_dtype, lora", [
    ("bf16", "bf16", "fp32", False),  # the shipped default: bf16 storage, exact through layerwise casting
    ("bf16", "fp32", "fp32", False),
    ("bf16", "bf16", "bf16", False),  # bf16 weights with fp32 masters (the 24 GB recipe)
    ("no", "fp32", "fp32", False),
    ("bf16", "bf16", "fp32", True),  # LoRA: the same UNet with the adapters off
])
def test_reference_errors_equal_the_policys_bit_for_bit_at_initialisation(
        trained_like_dir, mixed_precision, reference_dtype, policy_dtype, lora):
    out, _ = _first_dpo_output(trained_like_dir, mixed_precision=mixed_precision, reference_dtype=reference_dtype,
                               policy_dtype=policy_dtype, lora=lora)
    m = out.metrics
    assert m["model_err_w"] == m["ref_err_w"] and m["model_err_l"] == m["ref_err_l"]
    assert out.loss.item() == pytest.approx(LN2, abs=1e-6)


def test_a_plain_bf16_copy_is_not_exact_on_the_same_model(trained_like_dir):
    """Control: the rounding the exact reference removes is large at beta 5000 on this model."""
    out, _ = _first_dpo_output(trained_like_dir, plain_copy=True)
    assert out.metrics["model_err_w"] != out.metrics["ref_err_w"]
    assert abs(out.loss.item() - LN2) > 1e-3


def test_exact_reference_stores_linear_and_conv_weights_in_bf16(trained_like_dir):
    _, reference = _first_dpo_output(trained_like_dir)
    stored = {name: p.dtype for name, p in reference.named_parameters()}
    assert stored["conv_in.weight"] == torch.bfloat16
    assert any(dtype == torch.float32 and "norm" in name for name, dtype in stored.items())
    policy_bytes = sum(p.numel() * 4 for p in reference.parameters())
    reference_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert reference_bytes < 0.6 * policy_bytes
    assert reference_compute_dtype(reference) == torch.float32  # inputs arrive as the policy's


def test_mismatched_reduced_precision_falls_back_to_a_plain_cast_and_says_so(trained_like_dir, caplog):
    policy = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with caplog.at_level("WARNING"):
        reference = frozen_reference(policy, torch.bfloat16, torch.float16)
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert "not exactly ln 2" in caplog.text and "model.reference_dtype" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_first_logged_dpo_loss_is_ln2_through_the_cli(trained_like_dir, pickapic_parquet, tmp_path, lora):
    """`t2ialign train` with the default reference dtype, bf16 autocast and beta 5000: the first loss is ln 2."""
    extra = {"model__reference_dtype": "bf16", "mixed_precision": "bf16", "objective__beta": 5000,
             "data__prompt_dropout": 0.0, "max_steps": 1, "checkpoint_every": 0, "lora__enabled": lora}
    config = write_config(tmp_path / "c.yaml", trained_like_dir, pickapic_parquet, tmp_path / "run", **extra)
    ok(cli("train", str(config)))
    first = metrics(tmp_path / "run")[0]
    assert abs(first["loss"] - LN2) < 1e-3, first


@pytest.fixture(scope="module")
def micro_trained_like_dir(tmp_path_factory):
    """One down / one up block: the smallest SDXL-structured UNet, so that Inductor compiles it in CI time."""
    from t2ialign.models.tiny import build_tiny_sdxl_pipeline

    target = build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("micro") / "pipeline", unet_block_out_channels=(32,))
    return _move_weights_off_the_bf16_grid(target)


def _cli_losses(pipeline_dir, parquet, run_dir, *, compile_, lora):
    extra = {"model__reference_dtype": "bf16", "mixed_precision": "bf16", "objective__beta": 5000, "optim__learning_rate": 1e-6,
             "data__prompt_dropout": 0.0, "max_steps": 2, "checkpoint_every": 0, "lora__enabled": lora, "compile": compile_,
             "compile_cache_dir": str(run_dir.parent / "inductor"), "gradient_accumulation_steps": 1}
    config = write_config(run_dir.parent / f"{run_dir.name}.yaml", pipeline_dir, parquet, run_dir, **extra)
    ok(cli("train", str(config), timeout=1800))
    return [row["loss"] for row in metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compiled_first_dpo_loss_is_ln2_and_tracks_eager(micro_trained_like_dir, pickapic_parquet, tmp_path, lora):
    """`compile: true` (Inductor on the CPU): the reference runs the policy's compiled graph, so the first loss is
    ln 2 as in eager mode, and the next step's loss agrees with eager's."""
    eager = _cli_losses(micro_trained_like_dir, pickapic_parquet, tmp_path / "eager", compile_=False, lora=lora)
    compiled = _cli_losses(micro_trained_like_dir, pickapic_parquet, tmp_path / "compiled", compile_=True, lora=lora)
    assert abs(eager[0] - LN2) < 1e-6 and abs(compiled[0] - LN2) < 1e-6, (eager, compiled)
    assert compiled[1] == pytest.approx(eager[1], abs=COMPILED_VS_EAGER_TOLERANCE), (eager, compiled)
