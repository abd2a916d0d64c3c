#!/usr/bin/env python
"""Training throughput of the real ``preference_step`` code path: pairs/s, optimizer step, peak memory, MFU.

    # GPU: the real SDXL-base UNet (random weights), 1024 px (128x128 latents), bf16 autocast, fp32 master
    python scripts/bench_train.py --objective dpo --micro-batch 2 --grad-accum 4
    python scripts/bench_train.py --objective dpo,mapo,dcpo,inpo,sft --lora-rank 0,64 --json results.json
    python scripts/bench_train.py --objective dpo --micro-batch 4 --compile --channels-last
    # CPU smoke test: tiny SDXL-structured UNet (t2ialign.models.tiny), a few steps
    python scripts/bench_train.py --tiny --objective dpo,mapo --json
    # any machine: FLOPs of the REAL config through the real code path, without computing anything
    # (meta-device weights and inputs; no timing, no memory): ~54.8 TFLOP/pair for DPO, ~41.2 for MaPO
    python scripts/bench_train.py --count-only --objective dpo,mapo,dcpo,sft --lora-rank 0,64

What is measured (per row = one objective x one mode):
- Models are built by ``t2ialign.training.setup.build_policy_and_reference`` (full fine-tune: fp32 master
  weights + a frozen copy in ``--reference-dtype``; LoRA: frozen base in the autocast dtype, fp32 adapters,
  reference = adapters disabled) and the optimizer by ``t2ialign.training.optim.build_optimizer`` (fused
  AdamW on CUDA), exactly as ``t2ialign train`` does. ``--compile`` / ``--channels-last`` go through
  ``t2ialign.training.speed``.
- Each micro-step is ``preference_step`` (the trainer's own function) on a pre-encoded batch (random
  ``latents`` (2B,4,h,w), ``prompt_embeds`` (2B,77,2048), ``pooled_prompt_embeds``, ``time_ids``: the
  ``t2ialign cache`` layout, so the VAE and text encoders are excluded) and ``loss.backward()`` under
  autocast. The optimizer step (grad-norm clip + step + zero_grad, as the trainer does) is timed apart.
  Both are synchronised (``torch.cuda.synchronize``). ``--warmup`` optimizer steps first (compilation
  happens there), then ``--steps`` (>= 5) timed optimizer steps of ``--grad-accum`` micro-steps each.
- pairs/s = pairs processed in the timed steps / their total time (optimizer step amortised over
  ``--grad-accum``); ``pairs_per_s_micro`` leaves the optimizer step out.
- FLOPs: one micro-step counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convs,
  attention; elementwise work is not counted), before compilation, with the same seed as every timed
  micro-step (so DDIM-InPO's inversion depth, which depends on the drawn timestep, is identical).
  With ``--checkpointing`` the count includes the recomputed forward (what the GPU executes; the
  convention of the reference table, where DPO is 54 TFLOP/pair, 68 with checkpointing).
  ``forward_equivalents_per_pair`` divides by one single-latent forward of the policy: ~8 for DPO/DCPO,
  ~6 for MaPO, ~3 for SFT, 8 + inversion forwards for InPO.
- MFU = counted FLOPs / measured time / ``--peak-flops``. Default peak: 989e12, the H100 SXM bf16 dense
  datasheet figure. ``mfu_vs_measured_matmul`` uses the ~798e12 dense bf16 matmul rate measured on the
  reference H100 (what /work/shared/reference/PERFORMANCE.md's MFU column uses).
- Peak memory: ``torch.cuda.max_memory_allocated`` over warmup + timed steps (optimizer states included);
  on CPU the process-lifetime peak RSS (``resource.getrusage``), which only grows from row to row.
Weights are random: compute and memory do not depend on their values. Never assert on these timings in tests.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

OBJECTIVES = ("dpo", "mapo", "dcpo", "inpo", "sft")
H100_BF16_DENSE_PEAK = 989e12  # H100 SXM5 datasheet, bf16 dense (no sparsity)
H100_MEASURED_MATMUL_PEAK = 798e12  # dense bf16 matmul measured on the reference H100 (PERFORMANCE.md)
TEXT_TOKENS = 77


# ---------------------------------------------------------------- FLOP counting

def _register_cpu_attention_flops() -> None:
    """FlopCounterMode has formulas for the CUDA attention kernels only; add PyTorch's CPU flash kernel
    (same math: 2 matmuls forward, 5 backward incl. the recomputed scores) so CPU counts are complete."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward.default not in fc.flop_registry and forward not in fc.flop_registry:
        @fc.register_flop_formula(forward)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)
    if backward is not None and backward.default not in fc.flop_registry and backward not in fc.flop_registry:
        @fc.register_flop_formula(backward)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn) -> tuple[int, object]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


# ---------------------------------------------------------------- inputs and models

def make_batch(unet_config, pairs: int, latent_size: int, device, seed: int, channels_last: bool) -> dict:
    """A pre-encoded micro-batch, winners first (the ``t2ialign cache`` layout read by ``preference_step``)."""
    n = 2 * pairs
    text_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    resolution = 8 * latent_size
    gen = torch.Generator("cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    latents = rand(n, unet_config.in_channels, latent_size, latent_size)
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    return {
        "latents": latents,
        "prompt_embeds": rand(n, TEXT_TOKENS, unet_config.cross_attention_dim),
        "pooled_prompt_embeds": rand(n, text_dim),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n, dtype=torch.float32, device=device),
        "captions": [""] * pairs,
    }


_TINY_UNET = []


def build_unet(tiny: bool, device):
    if tiny:  # built once per process (the components include text encoders and tokenizers), copied per row
        if not _TINY_UNET:
            from t2ialign.models.tiny import tiny_sdxl_components

            _TINY_UNET.append(tiny_sdxl_components()["unet"])
        return copy.deepcopy(_TINY_UNET[0]).to(device)
    from t2ialign.models.configs import sdxl_base_unet

    return sdxl_base_unet(device)


def make_train_config(args, objective: str, lora_rank: int):
    from t2ialign.config import TrainConfig

    config = TrainConfig()
    config.objective.name = objective
    config.mixed_precision = args.mixed_precision
    config.gradient_checkpointing = args.checkpointing
    config.model.attention = args.attention
    config.model.reference_dtype = args.reference_dtype
    config.lora.enabled = lora_rank > 0
    config.lora.rank = max(lora_rank, 1)
    config.optim.optimizer = args.optimizer
    config.train_batch_size = args.micro_batch
    config.gradient_accumulation_steps = args.grad_accum
    config.compile = args.compile
    config.channels_last = args.channels_last
    config.compile_cache_dir = args.compile_cache_dir
    return config


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


# ---------------------------------------------------------------- one row

def build_row(args, objective: str, lora_rank: int, device) -> dict:
    """Models, optimizer, batch and the step closures of one row, as ``t2ialign train`` builds them."""
    import dataclasses

    from t2ialign.models.configs import sdxl_noise_scheduler
    from t2ialign.models.loading import DiffusionComponents
    from t2ialign.objectives import get_objective, objective_params
    from t2ialign.training.optim import build_optimizer
    from t2ialign.training.setup import build_policy_and_reference
    from t2ialign.training.step import StepModels, preference_step

    config = make_train_config(args, objective, lora_rank)
    spec = get_objective(objective)
    params = objective_params(spec, None, {})
    unet = build_unet(args.tiny, device)
    components = DiffusionComponents(unet=unet, vae=None, noise_scheduler=sdxl_noise_scheduler(), is_sdxl=True)
    # the levers are applied after the FLOP count (a compiled graph hides its ops from FlopCounterMode)
    plain = dataclasses.replace(config, compile=False, channels_last=False)
    policy, reference, trainable = build_policy_and_reference(plain, spec, components)
    if reference is not None:
        reference.to(device)
    optimizer = None if args.count_only else build_optimizer(trainable, config.optim, 1e-6)
    models = StepModels(policy, policy, reference, components, lora=config.lora.enabled)
    batch = make_batch(unet.config, args.micro_batch, args.latent_size, device, args.seed, args.channels_last)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    def forward():
        # the same draw each micro-step (see the module docstring); meta tensors (count-only) draw on the CPU
        generator = torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(args.seed)
        with autocast():
            return preference_step(models, spec, params, batch, resolution=8 * args.latent_size,
                                   prompt_dropout=0.0, generator=generator)

    def backward(output):
        with autocast():
            output.loss.backward()

    def one_forward():
        """A single-latent forward of the policy (the unit of ``forward_equivalents_per_pair``)."""
        with torch.no_grad(), autocast():
            dtype = next(policy.parameters()).dtype
            cond = {
                "encoder_hidden_states": batch["prompt_embeds"][:1].to(dtype),
                "added_cond_kwargs": {"text_embeds": batch["pooled_prompt_embeds"][:1].to(dtype),
                                      "time_ids": batch["time_ids"][:1].to(dtype)},
            }
            return policy(batch["latents"][:1].to(dtype), torch.tensor([500], device=device), **cond).sample

    reference_kind = "frozen copy" if reference is not None else (
        "adapters disabled" if lora_rank > 0 and spec.needs_reference else "none")
    return dict(config=config, spec=spec, policy=policy, reference=reference, trainable=trainable, optimizer=optimizer,
                forward=forward, backward=backward, one_forward=one_forward, reference_kind=reference_kind)


def describe(args, objective: str, lora_rank: int, built: dict) -> dict:
    return {
        "objective": objective,
        "mode": f"lora-r{lora_rank}" if lora_rank > 0 else "full",
        "lora_rank": lora_rank,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "checkpointing": args.checkpointing,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "attention": args.attention,
        "optimizer": args.optimizer,
        "mixed_precision": args.mixed_precision,
        "reference": built["reference_kind"],
        "params_total": sum(p.numel() for p in built["policy"].parameters()),
        "params_trainable": sum(p.numel() for p in built["trainable"]),
    }


def count_flops_of_step(built: dict) -> dict:
    """FLOPs of one micro-step (forward phase, backward phase) and of one single-latent policy forward."""
    flops_forward, output = count_flops(built["forward"])
    flops_backward, _ = count_flops(lambda: built["backward"](output))
    flops_one_forward, _ = count_flops(built["one_forward"])
    return dict(flops_forward=flops_forward, flops_backward=flops_backward, flops_one_forward=flops_one_forward,
                loss=output.loss.detach())


def count_only_row(args, objective: str, lora_rank: int, device) -> dict:
    """The real code path on the meta device: shapes and FLOPs only, nothing is computed or allocated."""
    _register_cpu_attention_flops()
    built = build_row(args, objective, lora_rank, torch.device("meta"))
    counted = count_flops_of_step(built)
    micro = counted["flops_forward"] + counted["flops_backward"]
    return {
        **describe(args, objective, lora_rank, built),
        "flops_per_micro_step": micro,
        "flops_forward_phase": counted["flops_forward"],
        "flops_backward_phase": counted["flops_backward"],
        "flops_per_pair": micro / args.micro_batch,
        "flops_one_forward": counted["flops_one_forward"],
        "forward_equivalents_per_pair": micro / args.micro_batch / counted["flops_one_forward"],
        "pairs_per_s_at_peak": args.peak_flops * args.micro_batch / micro,
        "pairs_per_s_at_measured_matmul": H100_MEASURED_MATMUL_PEAK * args.micro_batch / micro,
    }


def bench_row(args, objective: str, lora_rank: int, device) -> dict:
    from t2ialign.training.speed import apply_speed_settings

    built = build_row(args, objective, lora_rank, device)
    config, policy, reference = built["config"], built["policy"], built["reference"]
    trainable, optimizer, forward, backward = built["trainable"], built["optimizer"], built["forward"], built["backward"]

    def optimizer_step():
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.optim.max_grad_norm)
        value = float(grad_norm)  # the trainer reads it (non-finite check): one host sync, as in training
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    # ---- FLOPs: one micro-step, eager, counted once (forward phase and backward phase apart)
    if device.type == "cpu":
        _register_cpu_attention_flops()
    counted = count_flops_of_step(built)
    flops_forward, flops_backward, flops_one_forward = (counted[k] for k in ("flops_forward", "flops_backward", "flops_one_forward"))
    loss0 = float(counted.pop("loss"))
    optimizer.zero_grad(set_to_none=True)
    flops_micro = flops_forward + flops_backward

    # ---- speed levers, then warmup and timed steps
    apply_speed_settings(config, policy, reference)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    micro_times, opt_times, losses = [], [], []
    warmup_start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        for _ in range(args.grad_accum):
            _sync(device)
            start = time.perf_counter()
            output = forward()
            backward(output)
            _sync(device)
            if timed:
                micro_times.append(time.perf_counter() - start)
            losses.append(output.loss.detach())
            del output
        start = time.perf_counter()
        grad_norm = optimizer_step()
        _sync(device)
        if timed:
            opt_times.append(time.perf_counter() - start)
        if step == args.warmup - 1:
            warmup_s = time.perf_counter() - warmup_start
    if args.warmup == 0:
        warmup_s = 0.0
    losses = [float(x) for x in losses]
    peak_gib = _peak_memory_gib(device)

    pairs_timed = args.micro_batch * args.grad_accum * args.steps
    total_s = sum(micro_times) + sum(opt_times)
    micro_s = statistics.median(micro_times)
    opt_s = statistics.median(opt_times)
    flops_timed = flops_micro * args.grad_accum * args.steps
    row = {
        **describe(args, objective, lora_rank, built),
        "timed_optimizer_steps": args.steps,
        "timed_micro_steps": len(micro_times),
        "warmup_s": warmup_s,
        "micro_step_s": micro_s,
        "micro_step_s_min": min(micro_times),
        "optimizer_step_s": opt_s,
        "optimizer_step_s_min": min(opt_times),
        "pairs_per_s": pairs_timed / total_s,
        "pairs_per_s_micro": args.micro_batch / micro_s,
        "flops_per_micro_step": flops_micro,
        "flops_forward_phase": flops_forward,
        "flops_backward_phase": flops_backward,
        "flops_per_pair": flops_micro / args.micro_batch,
        "flops_one_forward": flops_one_forward,
        "forward_equivalents_per_pair": flops_micro / args.micro_batch / flops_one_forward,
        "achieved_tflops": flops_timed / total_s / 1e12,
        "mfu": flops_timed / total_s / args.peak_flops,
        "mfu_micro": flops_micro / micro_s / args.peak_flops,
        "mfu_vs_measured_matmul": flops_timed / total_s / H100_MEASURED_MATMUL_PEAK,
        "peak_memory_gib": peak_gib,
        "loss_first": loss0,
        "loss_last": losses[-1],
        "grad_norm_last": grad_norm,
    }
    return row


# ---------------------------------------------------------------- main

def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="dpo", help=f"comma-separated, or 'all' ({', '.join(OBJECTIVES)})")
    parser.add_argument("--lora-rank", default="0", help="0 = full fine-tune; comma-separated for several rows (e.g. 0,64)")
    parser.add_argument("--micro-batch", type=int, default=2, help="preference pairs per micro-step")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-steps per optimizer step")
    parser.add_argument("--checkpointing", action="store_true", help="gradient (activation) checkpointing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet(s) (t2ialign.training.speed)")
    parser.add_argument("--compile-cache-dir", default=None, help="persistent Inductor cache (default ~/.cache/t2ialign/torchinductor)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last convolution weights and latents")
    parser.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "adafactor"), default="adamw")
    parser.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), default=None, help="default: bf16 on GPU, no on CPU")
    parser.add_argument("--reference-dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--latent-size", type=int, default=None, help="latent side (default 128 = 1024 px; 16 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps (default 2, 3 with --compile, 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (>= 5)")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE_PEAK,
                        help="peak FLOP/s for MFU (default 989e12: H100 SXM bf16 dense datasheet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL-structured UNet on CPU (a smoke test, not a measurement)")
    parser.add_argument("--count-only", action="store_true",
                        help="FLOPs only, on the meta device (no compute, no memory; runs anywhere in seconds); no timing")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="print one JSON object to stdout (no PATH) or write it to PATH and print the table")
    args = parser.parse_args(argv)
    args.objectives = list(OBJECTIVES) if args.objective == "all" else [o.strip() for o in args.objective.split(",") if o.strip()]
    unknown = [o for o in args.objectives if o not in OBJECTIVES]
    if unknown:
        parser.error(f"--objective: unknown {unknown}; allowed: {', '.join(OBJECTIVES)} or all")
    if args.count_only and "inpo" in args.objectives:
        if args.objective != "all":
            parser.error("--count-only: inpo's inversion depth depends on the drawn timestep (data-dependent control flow), "
                         "which meta tensors do not have; count it with --tiny or on the GPU")
        args.objectives.remove("inpo")
    args.lora_ranks = _int_list(args.lora_rank)
    if not args.lora_ranks or any(r < 0 for r in args.lora_ranks):
        parser.error("--lora-rank: non-negative integers, 0 = full fine-tune")
    if args.steps < 5 and not args.tiny:
        parser.error("--steps: time at least 5 optimizer steps (the measuring protocol)")
    if args.steps < 1 or args.micro_batch < 1 or args.grad_accum < 1:
        parser.error("--steps, --micro-batch and --grad-accum must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.count_only else "cpu"))
    on_gpu = device.type == "cuda"
    if args.count_only:  # meta tensors have no autocast; FLOP counts do not depend on the dtype
        args.mixed_precision, args.reference_dtype = "no", "fp32"
    args.mixed_precision = args.mixed_precision or ("bf16" if on_gpu else "no")
    args.reference_dtype = args.reference_dtype or ("bf16" if on_gpu else "fp32")
    args.latent_size = args.latent_size or (16 if args.tiny else 128)
    if args.warmup is None:
        args.warmup = 3 if args.compile else (1 if args.tiny else 2)
    if args.threads or args.tiny:  # tiny: one thread, robust on a shared, loaded CPU (oversubscribed OpenMP crawls)
        torch.set_num_threads(args.threads or 1)
    if on_gpu:  # the trainer's default (TrainConfig.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    import diffusers
    import peft

    from t2ialign.errors import UserFacingError

    meta = {
        "bench": "train_micro_step",
        "unet": "tiny-sdxl (t2ialign.models.tiny)" if args.tiny else "sdxl-base-1.0 config, random weights",
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({platform.processor() or platform.machine()}, "
                                                                     f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores)",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "resolution": 8 * args.latent_size, "latent_size": args.latent_size,
        "peak_flops": args.peak_flops,
        "peak_flops_source": "H100 SXM bf16 dense datasheet" if args.peak_flops == H100_BF16_DENSE_PEAK else "--peak-flops",
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if on_gpu else "process peak RSS (ru_maxrss), cumulative over rows",
        "warmup_optimizer_steps": args.warmup,
        "smoke_test": bool(args.tiny or not on_gpu),
        "count_only": args.count_only,
    }
    if args.count_only:
        for key in ("load_average", "peak_memory_kind", "warmup_optimizer_steps"):
            meta.pop(key)
        meta["device"] = "none (meta tensors: FLOPs counted, nothing computed)"
    run_row = count_only_row if args.count_only else bench_row
    rows = []
    for lora_rank in args.lora_ranks:
        for objective in args.objectives:
            print(f"[bench_train] {objective} {'full' if lora_rank == 0 else f'lora r={lora_rank}'} ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_row(args, objective, lora_rank, device))
            except UserFacingError as exc:  # e.g. xformers / bitsandbytes not installed
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(2)
            # the row's models are gone once it returned: free them before the next row is built
            gc.collect()
            if args.compile:
                torch._dynamo.reset()
            if on_gpu:
                torch.cuda.empty_cache()
    report = {**meta, "rows": rows}
    table = format_table(report)
    if args.json == "-":
        print(table, file=sys.stderr)
        print(json.dumps(report))
    else:
        print(table)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=2)
    return report


def format_table(report: dict) -> str:
    lines = [f"{report['unet']} on {report['device']}, {report['resolution']} px, torch {report['torch']}"]
    if report.get("count_only"):
        lines.append(f"{'objective':9s} {'mode':9s} {'B':>2s} {'ckpt':>4s} {'TFLOP/pair':>10s} {'fwd TFLOP':>9s} {'fwd-eq':>6s} "
                     f"{'pairs/s @989T':>13s} {'@798T':>6s}")
        for r in report["rows"]:
            lines.append(
                f"{r['objective']:9s} {r['mode']:9s} {r['micro_batch']:2d} {'yes' if r['checkpointing'] else 'no':>4s} "
                f"{r['flops_per_pair'] / 1e12:10.2f} {r['flops_one_forward'] / 1e12:9.3f} {r['forward_equivalents_per_pair']:6.2f} "
                f"{r['pairs_per_s_at_peak']:13.2f} {r['pairs_per_s_at_measured_matmul']:6.2f}"
            )
        return "\n".join(lines)
    header = (f"{'objective':9s} {'mode':9s} {'B':>2s} {'acc':>3s} {'ckpt':>4s} {'pairs/s':>8s} {'micro s':>8s} "
              f"{'opt s':>7s} {'TFLOP/pair':>10s} {'fwd-eq':>6s} {'MFU':>6s} {'peak GiB':>8s}")
    lines.append(header)
    for r in report["rows"]:
        lines.append(
            f"{r['objective']:9s} {r['mode']:9s} {r['micro_batch']:2d} {r['grad_accum']:3d} {'yes' if r['checkpointing'] else 'no':>4s} "
            f"{r['pairs_per_s']:8.3f} {r['micro_step_s']:8.4f} {r['optimizer_step_s']:7.4f} {r['flops_per_pair'] / 1e12:10.4g} "
            f"{r['forward_equivalents_per_pair']:6.2f} {100 * r['mfu']:6.3g}% {r['peak_memory_gib']:8.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
