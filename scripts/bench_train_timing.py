"""The timed rows of scripts/bench_train.py: warmup and timed optimizer steps, pairs/s, MFU and peak memory.

The measuring protocol: the docstring of scripts/bench_train.py.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from bench_train_flops import H100_MEASURED_MATMUL_PEAK, _register_cpu_attention_flops, count_flops_of_step
from bench_train_setup import build_row, describe


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def bench_row(args, objective: str, lora_rank: int, device) -> dict:
    from t2ialign.models.speed import apply_speed_settings

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
    shared_graph = config.compile and built["spec"].needs_reference
    apply_speed_settings(config, policy, None if shared_graph else reference)
    if shared_graph:  # as the trainer does (t2ialign.training.setup): the reference runs the policy's compiled graph
        from t2ialign.models.reference import shared_graph_reference

        built["models"].reference = shared_graph_reference(policy, lora=config.lora.enabled)
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
