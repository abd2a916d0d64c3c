"""Smoke tests of the training benchmark (scripts/bench_train.py --tiny) and of the speed levers.

They check what the benchmark reports and that its FLOP counting is right (Diffusion-DPO does 8
forward-equivalents per pair, MaPO 6, SFT 3), never how fast anything ran. The memory estimate
(--estimate-memory) is checked byte for byte: fake tensors against real ones, and against the arithmetic
of weights, gradients and optimizer states.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench_train.py"
POSITIVE_FIELDS = (
    "pairs_per_s", "pairs_per_s_micro", "micro_step_s", "optimizer_step_s", "flops_per_micro_step", "flops_forward_phase",
    "flops_backward_phase", "flops_per_pair", "flops_one_forward", "forward_equivalents_per_pair", "achieved_tflops",
    "mfu", "mfu_micro", "mfu_vs_measured_matmul", "peak_memory_gib", "params_total", "params_trainable",
)


def run_script(*args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(*extra) -> dict:
    return run_script("--tiny", "--json", "--grad-accum", "1", "--steps", "1", "--warmup", "0", *extra)


def check_row(row: dict) -> None:
    for name in POSITIVE_FIELDS:
        value = row[name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)
    assert row["timed_micro_steps"] == row["timed_optimizer_steps"] * row["grad_accum"]
    assert row["flops_per_micro_step"] == row["flops_forward_phase"] + row["flops_backward_phase"]
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])


@pytest.fixture(scope="module")
def full_report():
    # one subprocess for all rows (start-up dominates on a loaded CPU): full fine-tune and LoRA r=4
    return run_bench("--objective", "dpo,mapo,sft", "--lora-rank", "0,4", "--micro-batch", "2")


def _rows(report, mode):
    return {r["objective"]: r for r in report["rows"] if r["mode"] == mode}


def test_report_fields(full_report):
    for key in ("device", "torch", "diffusers", "date", "peak_flops", "peak_memory_kind", "rows"):
        assert key in full_report
    assert full_report["peak_flops"] == 989e12 and full_report["smoke_test"] is True
    assert [(r["objective"], r["mode"]) for r in full_report["rows"]] == [
        (o, m) for m in ("full", "lora-r4") for o in ("dpo", "mapo", "sft")]
    for row in full_report["rows"]:
        check_row(row)
        if row["mode"] == "full":
            assert row["params_trainable"] == row["params_total"]
        else:
            assert row["params_trainable"] < row["params_total"] / 10


def test_flop_count_matches_forward_equivalents(full_report):
    rows = _rows(full_report, "full")
    dpo, mapo, sft = rows["dpo"], rows["mapo"], rows["sft"]
    # DPO: policy fwd+bwd on 2 latents (3 forward-equivalents each) + reference fwd on 2 = 8; MaPO: 6; SFT (winner only): 3
    assert dpo["flops_per_pair"] / mapo["flops_per_pair"] == pytest.approx(8 / 6, rel=0.03)
    assert dpo["forward_equivalents_per_pair"] == pytest.approx(8, rel=0.03)
    assert mapo["forward_equivalents_per_pair"] == pytest.approx(6, rel=0.03)
    assert sft["forward_equivalents_per_pair"] == pytest.approx(3, rel=0.03)
    # per pair: the micro-batch size divides out
    assert dpo["flops_per_micro_step"] == pytest.approx(2 * dpo["flops_per_pair"])
    # the backward of the policy costs about twice its forward; the reference adds forwards only
    assert dpo["flops_backward_phase"] == pytest.approx(mapo["flops_backward_phase"], rel=1e-6)
    assert dpo["flops_forward_phase"] == pytest.approx(2 * mapo["flops_forward_phase"], rel=0.01)


def test_real_code_path_self_check(full_report):
    full, lora = _rows(full_report, "full"), _rows(full_report, "lora-r4")
    # the first micro-step runs before any update: policy == reference, so Diffusion-DPO's loss is ln 2
    # (LoRA: B = 0 at init, so adapters on == adapters off)
    assert full["dpo"]["loss_first"] == pytest.approx(math.log(2), abs=1e-5)
    assert lora["dpo"]["loss_first"] == pytest.approx(math.log(2), abs=1e-5)
    assert full["dpo"]["reference"] == "frozen copy" and full["mapo"]["reference"] == "none"
    assert lora["dpo"]["reference"] == "adapters disabled"


def test_lora_flop_count(full_report):
    lora = _rows(full_report, "lora-r4")
    # frozen base weights get no weight gradient, so a LoRA pair costs less than a full fine-tune pair,
    # but the reference forward (adapters off) is still there: DPO > MaPO > SFT
    full = _rows(full_report, "full")
    assert lora["dpo"]["flops_per_pair"] < full["dpo"]["flops_per_pair"]
    assert lora["dpo"]["flops_per_pair"] > lora["mapo"]["flops_per_pair"] > lora["sft"]["flops_per_pair"]
    assert 4 < lora["dpo"]["forward_equivalents_per_pair"] < 8


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_checkpointing_row_counts_recompute(full_report, capsys):
    # in-process (the subprocess path is covered by full_report): saves a second interpreter start-up
    report = _bench_module().main(["--tiny", "--json", "--grad-accum", "1", "--steps", "1", "--warmup", "0",
                                   "--objective", "dpo", "--micro-batch", "1", "--checkpointing", "--channels-last"])
    capsys.readouterr()
    (row,) = report["rows"]
    check_row(row)
    assert row["checkpointing"] and row["channels_last"]
    assert row["loss_first"] == pytest.approx(math.log(2), abs=1e-5)
    # checkpointing recomputes the checkpointed blocks' forward in the backward: more FLOPs than 8 per pair,
    # at most one more policy forward per latent (10)
    full_dpo = _rows(full_report, "full")["dpo"]
    assert full_dpo["forward_equivalents_per_pair"] < row["forward_equivalents_per_pair"] <= 10.05


def test_count_only_real_sdxl_config(capsys):
    """The real SDXL-base config through the real code path on the meta device (no compute): the counts of
    docs/PERFORMANCE.md: 6.76 TFLOP per 1024 px forward, ~54 per DPO pair, ~41 per MaPO pair."""
    report = _bench_module().main(["--count-only", "--objective", "dpo", "--micro-batch", "1"])
    capsys.readouterr()
    (dpo,) = report["rows"]
    assert dpo["params_total"] == 2_567_463_684
    assert dpo["flops_one_forward"] / 1e12 == pytest.approx(6.76, abs=0.01)
    assert dpo["flops_per_pair"] / 1e12 == pytest.approx(54, rel=0.01)
    # the forward phase is policy + reference on the same 2 latents; MaPO is DPO without the reference forward
    mapo_per_pair = dpo["flops_forward_phase"] / 2 + dpo["flops_backward_phase"]
    assert mapo_per_pair / 1e12 == pytest.approx(41, rel=0.02)
    assert dpo["pairs_per_s_at_measured_matmul"] == pytest.approx(14.7, rel=0.02)  # the reference's ceiling


# ---------------------------------------------------------------- t2ialign.models.speed

def _small_convnet():
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1))


def test_compile_unet_sets_persistent_cache_in_place(tmp_path, monkeypatch):
    from t2ialign.models.speed import compile_unet, is_compiled

    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(variable, "")  # restored after the test
        monkeypatch.delenv(variable)
    calls = []
    # nn.Module.compile itself is PyTorch's (a real compile is the GPU benchmark's job; importing dynamo costs ~10 s)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    model = _small_convnet()
    keys = list(model.state_dict())
    out = compile_unet(model, tmp_path / "inductor", mode="max-autotune-no-cudagraphs")
    assert out is model and is_compiled(model)
    assert calls == [(model, {"dynamic": None, "fullgraph": False, "mode": "max-autotune-no-cudagraphs"})]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "inductor").resolve())
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    assert (tmp_path / "inductor").is_dir()
    assert list(model.state_dict()) == keys  # in-place compile: no _orig_mod. prefix in checkpoints
    assert compile_unet(model, tmp_path / "other") is model and len(calls) == 1  # idempotent: the first cache stays
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "inductor").resolve())


def test_default_compile_cache_dir(monkeypatch, tmp_path):
    from t2ialign.models.speed import default_compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_compile_cache_dir() == tmp_path / "t2ialign" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert default_compile_cache_dir() == tmp_path / "mine"


def test_channels_last_and_config_fields():
    from t2ialign.config import load_train_config
    from t2ialign.models.speed import apply_speed_settings, is_compiled

    config = load_train_config(data={"channels_last": True})
    assert config.channels_last and not config.compile and config.compile_cache_dir is None
    policy, reference = _small_convnet(), _small_convnet()
    x = torch.randn(2, 4, 8, 8)
    before = policy(x)
    apply_speed_settings(config, policy, reference)
    for model in (policy, reference):
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not is_compiled(model)
    torch.testing.assert_close(policy(x), before)


# ---------------------------------------------------------------- --estimate-memory

@pytest.fixture(scope="module")
def bench():
    return _bench_module()  # one module: the tiny UNet is built once for every in-process run


def estimate(bench, *extra) -> list[dict]:
    report = bench.main(["--tiny", "--estimate-memory", "--json", "--objective", "dpo", "--micro-batch", "1", *extra])
    assert report["estimate_memory"] and "MemTracker" in report["peak_memory_kind"]
    return report["rows"]


@pytest.fixture(scope="module")
def fake_estimates():
    """The CLI on fake tensors (what the real SDXL config runs on): full fine-tune and LoRA r=4."""
    report = run_script("--tiny", "--estimate-memory", "--json", "--objective", "dpo", "--lora-rank", "0,4", "--micro-batch", "1")
    assert report["smoke_test"] is True and "fake" in report["device"] and report["allocator_slack"] == 1.1
    return report["rows"]


def test_estimate_fields(fake_estimates):
    for row in fake_estimates:
        assert row["tensors"] == "fake" and row["mixed_precision"] == "bf16" and row["autocast_policy"] == "cuda"
        assert row["micro_steps_tracked"] == 2 and row["reference"] in ("frozen copy", "adapters disabled")
        breakdowns = [row[k] for k in ("peak_breakdown_bytes", "persistent_bytes", "before_optimizer_step_bytes")]
        for breakdown in breakdowns:
            assert set(breakdown) == {"parameters", "buffers", "gradients", "activations", "temps", "optimizer_states",
                                      "other", "total"}
            assert breakdown["total"] == sum(v for k, v in breakdown.items() if k != "total")
        assert row["peak_bytes"] == row["peak_breakdown_bytes"]["total"] > breakdowns[2]["total"] > breakdowns[1]["total"]
        assert row["peak_gib"] == row["peak_bytes"] / 2**30 and row["peak_gib_with_slack"] == pytest.approx(1.1 * row["peak_gib"])
        assert row["host_peak_bytes"] == 0 and row["activations_temps_peak_bytes"] > 0
        # the fused CPU flash kernel, as flash attention on the GPU; not the math path, which materialises softmax(QK^T)
        assert row["attention_ops"] == ["_scaled_dot_product_flash_attention_for_cpu",
                                        "_scaled_dot_product_flash_attention_for_cpu_backward"]


def test_estimate_byte_counts(fake_estimates):
    full, lora = fake_estimates
    n, trainable = full["params_total"], full["params_trainable"]
    assert n == trainable
    # fp32 policy (master weights) + the exact frozen reference (t2ialign.models.reference: Linear/Conv weights in
    # bf16, every other parameter in fp32 like the policy); fp32 gradients; AdamW: exp_avg + exp_avg_sq in fp32 and
    # one fp32 step counter per parameter tensor
    from t2ialign.models.tiny import tiny_sdxl_components

    unet = tiny_sdxl_components()["unet"]
    in_layers = sum(p.numel() for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                    for p in m.parameters(recurse=False))
    assert sum(p.numel() for p in unet.parameters()) == n
    assert full["persistent_bytes"]["parameters"] == 4 * n + 2 * in_layers + 4 * (n - in_layers)
    assert full["before_optimizer_step_bytes"]["gradients"] == 4 * trainable
    step_counters = full["persistent_bytes"]["optimizer_states"] - 8 * trainable
    assert 0 < step_counters < trainable / 100 and step_counters % 4 == 0
    # after the backward, the autocast region still holds the bf16 copies of the fp32 weights (the trainer's layout),
    # all but the normalisation weights, which run in fp32; and the reference's Linear/Conv weights, which layerwise
    # casting re-stores in bf16 after each layer's forward (new storage, the old one freed: same bytes, new owner)
    assert 0.99 * 2 * n + 2 * in_layers < full["before_optimizer_step_bytes"]["activations"] < 2 * n + 2 * in_layers
    # LoRA: the frozen base in bf16, fp32 adapters, gradients and states for the adapters only
    n_lora = lora["params_trainable"]
    assert lora["persistent_bytes"]["parameters"] == 2 * (lora["params_total"] - n_lora) + 4 * n_lora
    assert lora["before_optimizer_step_bytes"]["gradients"] == 4 * n_lora
    assert 8 * n_lora < lora["persistent_bytes"]["optimizer_states"] < 9 * n_lora
    assert lora["peak_bytes"] < full["peak_bytes"]


def test_estimate_fake_equals_real_tensors(bench, fake_estimates, capsys):
    real = estimate(bench, "--lora-rank", "0,4", "--real-tensors")
    capsys.readouterr()
    for fake_row, real_row in zip(fake_estimates, real):
        assert real_row["tensors"] == "real"
        for key in ("peak_bytes", "peak_breakdown_bytes", "persistent_bytes", "before_optimizer_step_bytes",
                    "activations_temps_peak_bytes", "attention_ops"):
            assert fake_row[key] == real_row[key], key


def test_estimate_checkpointing_and_offload(bench, fake_estimates, capsys):
    full = fake_estimates[0]
    (selective,) = estimate(bench, "--checkpointing", "--checkpointing-mode", "selective")
    (checkpointed, offloaded) = [*estimate(bench, "--checkpointing"), *estimate(bench, "--offload")]
    capsys.readouterr()
    assert checkpointed["checkpointing_mode"] == "full" and selective["checkpointing_mode"] == "selective"
    activations = [row["activations_temps_peak_bytes"] for row in (full, selective, checkpointed)]
    assert activations[0] > activations[1] > activations[2]
    assert full["peak_bytes"] > checkpointed["peak_bytes"]
    # offload: masters, gradient buffers and AdamW states in host RAM, none of it in the device peak
    n = offloaded["params_trainable"]
    assert offloaded["offload"] and 16 * n < offloaded["host_peak_bytes"] < 16.1 * n
    assert offloaded["persistent_bytes"]["optimizer_states"] == 0
    assert offloaded["peak_bytes"] <= full["peak_bytes"] - 8 * n
    # bf16 weights on the device (fp32 masters on the host): bf16 policy + bf16 reference, bf16 gradients
    (bf16,) = estimate(bench, "--offload", "--policy-dtype", "bf16")
    capsys.readouterr()
    assert bf16["policy_dtype"] == "bf16"
    assert bf16["persistent_bytes"]["parameters"] == 2 * n + 2 * n
    assert bf16["before_optimizer_step_bytes"]["gradients"] == 2 * n
    assert 16 * n < bf16["host_peak_bytes"] < 16.1 * n
    assert bf16["peak_bytes"] < offloaded["peak_bytes"] - 4 * n  # -2N weights, -2N gradients, no weight casts


def test_estimate_flags_reach_the_train_config(bench):
    args = bench.parse_args(["--estimate-memory", "--checkpointing", "--checkpointing-mode", "selective", "--offload"])
    config = bench.make_train_config(args, "dpo", 0)
    assert config.gradient_checkpointing and config.gradient_checkpointing_mode == "selective" and config.optim.offload
    with pytest.raises(SystemExit):
        bench.parse_args(["--estimate-memory", "--objective", "inpo"])  # data-dependent control flow: not on fake tensors


# ---------------------------------------------------------------- the other benchmarks run (smoke; no timing is asserted)

def run_other_bench(script: str, *args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    return json.loads(out[out.index("{"):]) if out.lstrip().startswith("{") else json.loads(out.strip().splitlines()[-1])


def test_sampling_benchmark_reports_every_rlg_variant():
    report = run_other_bench("bench_sampling.py", "--tiny", "--channels-last", "--iters", "2", "--warmup", "1")
    assert set(report["results"]) == {"single", "rlg_full", "lora_single", "rlg_lora_seq", "rlg_lora_batched"}
    assert report["channels_last"] and report["cfg_batch"] == 2
    assert all(row["median_ms"] > 0 and row["iters"] == 2 for row in report["results"].values())


def test_scorer_and_cache_benchmarks_report_their_rows():
    scorers = run_other_bench("bench_scorers.py", "--tiny", "--json")
    assert {r["scorer"] for r in scorers["results"]} >= {"pickscore", "hpsv21", "clip", "aesthetic", "imagereward"}
    assert all(r["images_per_s"] > 0 for r in scorers["results"])
    cache = run_other_bench("bench_cache.py", "--no-sdxl", "--json", "--read-pairs", "64", "--read-seconds", "1")
    kinds = {r["what"] for r in cache["results"]}
    assert {"read", "getitem"} <= kinds
    assert all(r["pairs_per_s"] > 0 for r in cache["results"] if r["what"] == "read")


def test_flow_estimate_on_fake_tensors_equals_real_tensors(bench):
    """The SD3.5 / FLUX estimate (flow_preference_step on fake tensors) counts the same bytes a real run holds, on the
    tiny flow configs, with a cache (transformer only) and without one (text encoders and VAE resident too)."""
    common = ["--tiny", "--estimate-memory", "--json", "--model", "sd35-medium,flux-dev", "--lora-rank", "8",
              "--cache", "both", "--micro-batch", "1"]
    fake = bench.main(common)["rows"]
    real = bench.main([*common, "--real-tensors"])["rows"]
    assert len(fake) == len(real) == 4
    for f, r in zip(fake, real):
        assert f["peak_bytes"] == r["peak_bytes"] > 0, (f.get("model"), f.get("cache"), f.get("mode"))
    with_cache = {(row["model"], row["mode"]): row["peak_bytes"] for row in fake if row["cache"] in (True, "yes")}
    without = {(row["model"], row["mode"]): row["peak_bytes"] for row in fake if row["cache"] in (False, "no")}
    assert all(without[key] > with_cache[key] for key in with_cache)  # the frozen encoders add to the peak
