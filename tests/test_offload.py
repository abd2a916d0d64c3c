"""Issue 9 — optimizer offload (``optim.offload``): fp32 masters and optimizer states in host RAM.

On this CPU-only machine the "device" parameters are CPU tensors too, but every step still goes through
the offload path (gradients copied into the host buffers, the inner optimizer updating the masters, the
weights copied back), so these tests check its arithmetic, its state layout and its resume behaviour.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers.runs import assert_same_trajectory, cli, killed, metrics, ok, write_config

from t2ialign.config import ConfigError, OptimConfig, TrainConfig, validate_train_config
from t2ialign.training.offload import CPUOffloadOptimizer
from t2ialign.training.optim import _build_on, build_lr_scheduler, build_optimizer


def small_model(seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 12), torch.nn.Linear(12, 1))


def plain_fused_adamw(params, lr=3e-2):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.1, fused=True)


def train_steps(model, optimizer, steps, seed=1, scheduler=None, frozen=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        if frozen is not None:  # a parameter whose gradient is absent this step
            frozen.grad = None
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def assert_identical(model_a, model_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), f"{name} differs by {float((a - b).abs().max())}"


def test_offloaded_adamw_is_bitwise_the_same_update_as_adamw_on_the_device():
    device_model, offload_model = small_model(), small_model()
    device_opt = plain_fused_adamw(device_model.parameters())
    offload_opt = CPUOffloadOptimizer(offload_model.parameters(), plain_fused_adamw)
    train_steps(device_model, device_opt, 7, frozen=device_model[2].bias)
    train_steps(offload_model, offload_opt, 7, frozen=offload_model[2].bias)
    assert_identical(device_model, offload_model)
    # the bias without gradients was left alone (no state, no weight decay), as AdamW does on the device
    assert torch.equal(offload_model[2].bias, small_model()[2].bias)
    assert offload_opt.inner.state.keys().isdisjoint({offload_opt._masters[3]})


@pytest.mark.parametrize("make_inner", [plain_fused_adamw, lambda ps: _build_on(ps, OptimConfig(optimizer="adafactor"), 1e-2)],
                         ids=["adamw", "adafactor"])
def test_stepping_bucket_by_bucket_is_one_ordinary_step(make_inner):
    """The overlapped step updates one bucket at a time; with every parameter in its own bucket (tiny buckets)
    the result must be bitwise that of one bucket holding them all."""
    one, many = small_model(), small_model()
    one_opt = CPUOffloadOptimizer(one.parameters(), make_inner)
    many_opt = CPUOffloadOptimizer(many.parameters(), make_inner, bucket_bytes=1)
    assert len(one_opt._buckets) == 1 and len(many_opt._buckets) == len(list(many.parameters()))
    train_steps(one, one_opt, 5, frozen=one[2].bias)
    train_steps(many, many_opt, 5, frozen=many[2].bias)
    assert_identical(one, many)
    steps = [state["step"] for state in many_opt.inner.state.values() if "step" in state]
    assert all(float(step) == 5 for step in steps)  # one step counted per optimizer step, not per bucket


def test_the_lr_schedule_reaches_the_inner_optimizer_and_the_config_builds_it():
    config = OptimConfig(learning_rate=2e-2, warmup_steps=3, lr_scheduler="constant_with_warmup", offload=True)
    device_model, offload_model = small_model(), small_model()
    device_opt = plain_fused_adamw(device_model.parameters(), lr=2e-2)
    device_opt.param_groups[0].update(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    offload_opt = build_optimizer(offload_model.parameters(), config, 2e-2)
    assert isinstance(offload_opt, CPUOffloadOptimizer) and offload_opt.inner.defaults["fused"]
    train_steps(device_model, device_opt, 5, scheduler=build_lr_scheduler(device_opt, config, 10))
    scheduler = build_lr_scheduler(offload_opt, config, 10)
    train_steps(offload_model, offload_opt, 5, scheduler=scheduler)
    assert_identical(device_model, offload_model)
    assert offload_opt.inner.param_groups[0]["lr"] == pytest.approx(2e-2 * 3 / 3)  # set before the last step
    assert offload_opt.state_dict()["param_groups"][0]["lr"] == scheduler.get_last_lr()[0]


def test_state_dict_has_the_device_optimizers_layout_and_resume_is_exact():
    uninterrupted = small_model()
    opt = CPUOffloadOptimizer(uninterrupted.parameters(), plain_fused_adamw)
    train_steps(uninterrupted, opt, 3, seed=1)
    saved_weights = copy.deepcopy(uninterrupted.state_dict())
    saved_state = copy.deepcopy(opt.state_dict())
    train_steps(uninterrupted, opt, 3, seed=2)

    # the same keys and shapes as AdamW's own state dict: checkpoints move between offload and no offload
    device_model = small_model()
    device_opt = plain_fused_adamw(device_model.parameters())
    train_steps(device_model, device_opt, 1)
    plain = device_opt.state_dict()
    assert saved_state["state"].keys() == plain["state"].keys()
    for index, entry in plain["state"].items():
        assert {k: v.shape for k, v in saved_state["state"][index].items()} == {k: v.shape for k, v in entry.items()}

    # resume: a fresh model and optimizer (masters made from the fresh weights), then the checkpoint loaded
    resumed = small_model(seed=5)
    resumed_opt = CPUOffloadOptimizer(resumed.parameters(), plain_fused_adamw)
    resumed.load_state_dict(saved_weights)
    resumed_opt.load_state_dict(saved_state)
    train_steps(resumed, resumed_opt, 3, seed=2)
    assert_identical(uninterrupted, resumed)


def test_masters_keep_fp32_precision_for_bf16_device_weights():
    # updates of 1e-4 on a weight of 1.0 are below bf16's resolution there (2**-7): bf16 AdamW never moves it
    weight_bf16 = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    bf16_only = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    make = lambda ps: torch.optim.SGD(ps, lr=1e-4)  # noqa: E731  (SGD: the update is exactly lr * grad)
    offload_opt = CPUOffloadOptimizer([weight_bf16], make)
    plain_opt = make([bf16_only])
    for _ in range(200):
        for p, opt in ((weight_bf16, offload_opt), (bf16_only, plain_opt)):
            p.grad = -torch.ones_like(p)
            opt.step()
    assert torch.equal(bf16_only, torch.ones(4, dtype=torch.bfloat16))
    master = offload_opt._masters[0]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, torch.full((4,), 1.02), rtol=0, atol=1e-5)
    assert torch.equal(weight_bf16, master.to(torch.bfloat16))  # 1.02 rounded: 1.0234375


def test_offload_works_with_adafactor_and_rejects_8bit_adamw():
    config = OptimConfig(optimizer="adafactor", learning_rate=1e-2, offload=True)
    device_model, offload_model = small_model(), small_model()
    device_opt = build_optimizer(device_model.parameters(), OptimConfig(optimizer="adafactor", learning_rate=1e-2), 1e-2)
    offload_opt = build_optimizer(offload_model.parameters(), config, 1e-2)
    train_steps(device_model, device_opt, 4)
    train_steps(offload_model, offload_opt, 4)
    assert_identical(device_model, offload_model)

    bad = TrainConfig()
    bad.optim.offload, bad.optim.optimizer = True, "adamw8bit"
    with pytest.raises(ConfigError, match="optim.offload.*adamw8bit"):
        validate_train_config(bad)


@pytest.mark.slow
def test_offloaded_training_matches_the_device_optimizer_and_resumes_exactly(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    # the real trainer (full fine-tune DPO, grad clipping, warmup): offload on vs off, then SIGKILL + resume
    device = write_config(tmp_path / "device.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "device")
    offload = write_config(tmp_path / "offload.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "offload", optim__offload=True)
    ok(cli("train", str(device)))
    ok(cli("train", str(offload)))
    assert final_unet_bytes(tmp_path / "device") == final_unet_bytes(tmp_path / "offload")

    killed(cli("train", str(offload), "--set", f"output_dir={tmp_path / 'killed'}", kill="micro_step:5"))
    ok(cli("train", str(offload), "--set", f"output_dir={tmp_path / 'killed'}", "--set", "resume=latest"))
    assert_same_trajectory(metrics(tmp_path / "offload"), metrics(tmp_path / "killed"))
    assert final_unet_bytes(tmp_path / "offload") == final_unet_bytes(tmp_path / "killed")


def final_unet_bytes(run_dir) -> bytes:
    return (run_dir / "final/unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_optimizer_benchmark_reports_each_memory_mode(tmp_path):
    import json
    import subprocess
    import sys

    from helpers.runs import ENV, REPO

    out = tmp_path / "opt.json"
    proc = subprocess.run([sys.executable, "scripts/bench_optimizer.py", "--params", "3e6", "--steps", "1", "--threads", "1",
                           "--json", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"adamw", "adafactor", "adamw+offload"}  # no CUDA here: 8-bit AdamW is skipped, and says so
    assert "skipping adamw8bit" in proc.stderr
    assert rows["adamw"]["device_state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)  # exp_avg + exp_avg_sq, fp32
    assert rows["adamw+offload"]["device_state_bytes_per_param"] == 0
    assert rows["adamw+offload"]["host_bytes_per_param"] == pytest.approx(16.0, rel=1e-3)  # + masters + grad buffers
    assert 0 < rows["adafactor"]["device_state_bytes_per_param"] < 4.0  # factored second moments
    for row in rows.values():
        assert row["sdxl_step_s"] == pytest.approx(row["step_ms"] / 1e3 * 2_567_463_684 / row["params"], rel=1e-6)


# ---------------------------------------------------------------- bf16 weights on the device, fp32 masters on the host

def test_masters_are_checkpointed_only_when_the_device_weights_cannot_hold_them():
    fp32 = CPUOffloadOptimizer(small_model().parameters(), plain_fused_adamw)
    assert "master_weights" not in fp32.state_dict()
    model = small_model().to(torch.bfloat16)
    opt = CPUOffloadOptimizer(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=1e-4))
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert [m.dtype for m in saved["master_weights"]] == [torch.float32] * 6
    fresh = small_model().to(torch.bfloat16)
    fresh.load_state_dict(model.state_dict())
    fresh_opt = CPUOffloadOptimizer(fresh.parameters(), lambda ps: torch.optim.SGD(ps, lr=1e-4))
    fresh_opt.load_state_dict(saved)
    for a, b in zip(opt._masters, fresh_opt._masters):
        assert torch.equal(a, b)  # not re-made from the bf16 weights, which lost the 3e-4 steps
    fresh_opt.load_masters_into_params()
    assert all(p.dtype == torch.float32 for p in fresh.parameters())
    assert torch.equal(fresh[0].weight, opt._masters[0])


def test_bf16_policy_needs_offload_a_full_fine_tune_and_bf16_autocast():
    config = TrainConfig()
    config.model.policy_dtype, config.mixed_precision = "bf16", "bf16"
    with pytest.raises(ConfigError, match="optim.offload=true"):
        validate_train_config(config)
    config.optim.offload = True
    validate_train_config(config)
    config.lora.enabled = True
    with pytest.raises(ConfigError, match="full fine-tune"):
        validate_train_config(config)
    config.lora.enabled, config.mixed_precision = False, "no"
    with pytest.raises(ConfigError, match="mixed_precision=bf16"):
        validate_train_config(config)


@pytest.mark.slow
def test_bf16_weights_train_resume_exactly_and_export_the_fp32_masters(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    from safetensors.torch import load_file

    settings = dict(optim__offload=True, model__policy_dtype="bf16", model__reference_dtype="bf16", mixed_precision="bf16")
    config = write_config(tmp_path / "bf16.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "bf16", **settings)
    ok(cli("train", str(config)))
    # policy and reference are the same bf16 weights at the start: DPO's first loss is ln 2 exactly
    assert metrics(tmp_path / "bf16")[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    exported = load_file(str(tmp_path / "bf16/final/unet/diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.float32}
    masters = load_file(str(tmp_path / "bf16/checkpoint-00000004/optimizer.safetensors"))
    assert sum(".master_weights." in k for k in masters) == len(exported)  # the checkpoint holds every master
    # the export holds what bf16 cannot: some master values are not representable in bf16
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in exported.values())

    killed(cli("train", str(config), "--set", f"output_dir={tmp_path / 'killed'}", kill="micro_step:5"))
    ok(cli("train", str(config), "--set", f"output_dir={tmp_path / 'killed'}", "--set", "resume=latest"))
    assert_same_trajectory(metrics(tmp_path / "bf16"), metrics(tmp_path / "killed"))
    assert final_unet_bytes(tmp_path / "bf16") == final_unet_bytes(tmp_path / "killed")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: pinned buffers and asynchronous copies")
def test_offload_on_cuda_matches_adamw_on_the_device():
    device_model, offload_model = small_model().cuda(), small_model().cuda()
    device_opt = plain_fused_adamw(device_model.parameters())
    offload_opt = CPUOffloadOptimizer(offload_model.parameters(), plain_fused_adamw, bucket_bytes=256)  # several buckets
    assert all(b.is_pinned() for b in offload_opt._grad_buffers + offload_opt._masters)
    assert len(offload_opt._buckets) > 2
    for model, opt in ((device_model, device_opt), (offload_model, offload_opt)):
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            model(torch.randn(16, 6, generator=gen).cuda()).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    for a, b in zip(device_model.parameters(), offload_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # CUDA vs CPU fused kernels: rounding only
