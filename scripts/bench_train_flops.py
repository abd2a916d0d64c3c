"""FLOP counting for scripts/bench_train.py: ``FlopCounterMode`` over one micro-step, and ``--count-only`` rows.

What is counted and how MFU is derived: the docstring of scripts/bench_train.py.
"""
from __future__ import annotations

import torch

from bench_train_setup import build_row, describe

H100_BF16_DENSE_PEAK = 989e12  # H100 SXM5 datasheet, bf16 dense (no sparsity)
H100_MEASURED_MATMUL_PEAK = 798e12  # dense bf16 matmul measured on the reference H100 (docs/PERFORMANCE.md)


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
