#!/usr/bin/env python
"""Training throughput of the real ``preference_step`` code path: pairs/s, optimizer step, peak memory, MFU;
and, without a GPU, FLOPs (``--count-only``) and the peak GPU memory (``--estimate-memory``) of the real config.

    # GPU: the real SDXL-base UNet (random weights), 1024 px (128x128 latents), bf16 autocast, fp32 master
    python scripts/bench_train.py --objective dpo --micro-batch 2 --grad-accum 4
    python scripts/bench_train.py --objective dpo,mapo,dcpo,inpo,sft --lora-rank 0,64 --json results.json
    python scripts/bench_train.py --objective dpo --micro-batch 4 --compile --channels-last
    # CPU smoke test: tiny SDXL-structured UNet (t2ialign.models.tiny), a few steps
    python scripts/bench_train.py --tiny --objective dpo,mapo --json
    # any machine: FLOPs of the REAL config through the real code path, without computing anything
    # (meta-device weights and inputs; no timing, no memory): ~54.8 TFLOP/pair for DPO, ~41.2 for MaPO
    python scripts/bench_train.py --count-only --objective dpo,mapo,dcpo,sft --lora-rank 0,64
    # any machine: peak GPU memory of one optimizer step of the REAL config through the real code path, on
    # fake tensors (shapes and dtypes only; ~30 s per row on one CPU core, ~1 GB of RAM)
    python scripts/bench_train.py --estimate-memory --objective dpo,mapo --lora-rank 0,64 --micro-batch 1 --checkpointing

What is measured (per row = one objective x one mode):
- Models are built by ``t2ialign.training.setup.build_policy_and_reference`` (full fine-tune: fp32 master
  weights + a frozen copy in ``--reference-dtype``; LoRA: frozen base in the autocast dtype, fp32 adapters,
  reference = adapters disabled) and the optimizer by ``t2ialign.training.optim.build_optimizer`` (fused
  AdamW on CUDA), exactly as ``t2ialign train`` does. ``--compile`` / ``--channels-last`` go through
  ``t2ialign.models.speed``.
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

Peak-memory estimate (``--estimate-memory``, no GPU needed; ``--checkpointing-mode``, ``--offload``, ``--optimizer``
and the batch flags apply):
- The same rows (``build_row``: models, optimizer, batch) built under ``torch._subclasses.fake_tensor.FakeTensorMode``
  on the CPU: every tensor has its real shape and dtype and no data, so nothing is computed or allocated. PyTorch's
  ``MemTracker`` (``torch.distributed._tools.mem_tracker``) follows every tensor storage alive through one optimizer
  step as the trainer runs it (``loop._run_steps``): bf16 autocast as on the GPU (fp32 master weights, bf16 frozen
  reference), each micro-step ``preference_step`` + ``loss.backward()`` in one autocast region (its bf16 copies of the
  fp32 weights live until the region ends), and in the last one grad-norm clip, ``optimizer.step()``, ``zero_grad``.
  The optimizer states exist from the start (one untracked step on zero gradients first: AdamW makes them lazily),
  and min(``--grad-accum``, 2) micro-steps run: from the second on all gradients are held, later ones repeat it.
- Autocast follows CUDA's op lists (``--autocast-policy cuda``, the default): CPU autocast keeps group/layer norms
  and upsampling in bf16 where CUDA runs them in fp32, which changes what the backward saves. Attention runs PyTorch's
  fused CPU flash kernel, which saves what flash attention saves on the GPU (output + logsumexp), not the math path
  that would materialise softmax(QK^T); ``attention_ops`` lists the attention ops seen.
- Reported: ``peak_bytes`` / ``peak_gib`` (on the device) with the breakdown at that moment by MemTracker category:
  parameters, buffers, gradients, activations (made in the forward: saved tensors, the bf16 weight copies),
  temps (made in the backward), optimizer_states, other (the batch); ``persistent_bytes`` (before the step),
  ``before_optimizer_step_bytes`` (after the last backward), ``activations_temps_peak_bytes``. With ``--offload``
  the fp32 masters, gradient buffers and optimizer states are in host RAM: ``host_peak_bytes``, not in the peak.
- Tensor bytes only, what ``torch.cuda.max_memory_allocated`` counts: the CUDA context (~0.5-1 GiB), cuBLAS/cuDNN
  workspaces, kernels' internal scratch and the caching allocator's fragmentation are not included;
  ``peak_gib_with_slack`` adds 10 % for the allocator (typically +5-10 % reserved over allocated).
- ``--real-tensors`` runs the same on real CPU tensors (small models): with ``--tiny`` both agree to the byte
  (tests/test_bench.py). Not for InPO (its inversion depth is data-dependent) nor with ``--compile``.
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
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

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


def tiny_unet():
    """Built once per process (the components include text encoders and tokenizers); rows copy it."""
    if not _TINY_UNET:
        from t2ialign.models.tiny import tiny_sdxl_components

        _TINY_UNET.append(tiny_sdxl_components()["unet"])
    return _TINY_UNET[0]


def build_unet(tiny: bool, device):
    if tiny:
        from torch._guards import active_fake_mode

        if active_fake_mode() is not None:  # real weights cannot be deep-copied into fake tensors: same architecture, rebuilt
            with torch.device(device):
                return type(tiny_unet()).from_config(tiny_unet().config)
        return copy.deepcopy(tiny_unet()).to(device)
    from t2ialign.models.configs import sdxl_base_unet

    return sdxl_base_unet(device)


def make_train_config(args, objective: str, lora_rank: int):
    from t2ialign.config import TrainConfig

    config = TrainConfig()
    config.objective.name = objective
    config.mixed_precision = args.mixed_precision
    config.gradient_checkpointing = args.checkpointing
    config.gradient_checkpointing_mode = args.checkpointing_mode
    config.model.attention = args.attention
    config.model.reference_dtype = args.reference_dtype
    config.lora.enabled = lora_rank > 0
    config.lora.rank = max(lora_rank, 1)
    config.optim.optimizer = args.optimizer
    config.optim.offload = args.offload
    config.model.policy_dtype = args.policy_dtype if lora_rank == 0 else "fp32"  # LoRA adapters stay fp32
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
                batch=batch, autocast=autocast, forward=forward, backward=backward, one_forward=one_forward,
                reference_kind=reference_kind)


def describe(args, objective: str, lora_rank: int, built: dict) -> dict:
    return {
        "objective": objective,
        "mode": f"lora-r{lora_rank}" if lora_rank > 0 else "full",
        "lora_rank": lora_rank,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "checkpointing": args.checkpointing,
        "checkpointing_mode": args.checkpointing_mode if args.checkpointing else None,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "attention": args.attention,
        "optimizer": args.optimizer,
        "offload": args.offload,
        "policy_dtype": args.policy_dtype if lora_rank == 0 else "fp32",
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


# ---------------------------------------------------------------- peak-memory estimate (--estimate-memory)

GIB = 2**30
ALLOCATOR_SLACK = 1.10  # CUDA caching allocator: fragmentation and cached-but-free blocks, typically +5-10 %
# aten ops that CUDA autocast runs in fp32 (AT_FORALL_FP32, aten/src/ATen/autocast_mode.h). CPU autocast leaves
# most of them in bf16, so without this a CPU run would save bf16 norm outputs where the GPU saves fp32 ones.
CUDA_AUTOCAST_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss",
    "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
CATEGORIES = {  # MemTracker's reference types -> report keys
    _MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "gradients",
    _MemRefType.ACT: "activations", _MemRefType.TEMP: "temps", _MemRefType.OPT: "optimizer_states",
    _MemRefType.OTH: "other", _TOTAL_KEY: "total",
}


def _fp32_kernel(op):
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def upcast(value):
        return value.float() if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16) else value

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):  # as CUDA autocast: cast, then run without autocast
            args, kwargs = torch.utils._pytree.tree_map(upcast, (args, kwargs))
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy():
    """CPU autocast with CUDA's fp32 list: group/layer norms and upsampling give fp32 outputs, as on the GPU.
    (CPU and CUDA agree on what runs in bf16: matmuls, convolutions, attention.)"""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    library = torch.library.Library("aten", "IMPL")
    try:
        for name in CUDA_AUTOCAST_FP32_OPS:
            if has_kernel(f"aten::{name}", "AutocastCUDA") and not has_kernel(f"aten::{name}", "AutocastCPU"):
                packet, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, packet), overload or "default")
                library.impl(name, _fp32_kernel(op), "AutocastCPU")
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def fake_tensors():
    """A FakeTensorMode in which the trainer's model building (``copy.deepcopy``, ``.to(dtype)``) works."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    # Module.to() swaps fake parameters in place, which torch refuses for a tensor with weak references, and the
    # mode's memo holds one to every fake tensor (it only serves real -> fake conversions, identity of the same real)
    mode.fake_tensor_converter.set_tensor_memo = lambda tensor, fake: None
    # copy.deepcopy(module) copies each fake tensor's __dict__, fake_mode included: tensors of a copied mode cannot mix
    mode.__deepcopy__ = lambda memo: mode
    with warnings.catch_warnings(), mode:
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # Tensor.__deepcopy__ probes it
        yield mode


class StepMemTracker(MemTracker):
    """MemTracker for a training step: the peak of the bytes on the device and the breakdown at that moment.

    With optimizer offload, optimizer states (fp32 masters, gradient buffers, states and the step's temporaries)
    live in host RAM: ``host_categories=(OPT,)`` counts them apart from the device peak.
    """

    def __init__(self, host_categories=()):
        super().__init__()
        self.host_categories = tuple(host_categories)
        self.device_peak, self.device_peak_snapshot = 0, {}
        self.host_peak = 0
        self.transient_peak = 0  # activations + temps, whenever they peak
        self.ops = set()

    def track_optimizer_tensors(self, *tensors) -> None:
        for tensor in tensors:
            self._update_and_maybe_create_winfos(tensor, _MemRefType.OPT)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        # MemTracker hooks every parameter of a module it sees run; frozen ones (reference, LoRA base) refuse hooks
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for param in module.parameters() if install_grad_hooks else ():
            if param.requires_grad and param not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(self._track_grad),
                    param.register_post_accumulate_grad_hook(lambda p: self._track_grad(p.grad)),
                )
        return memory

    def _track_grad(self, grad) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _pre_fw_hook(self, module, inputs) -> None:
        # the policy runs once per micro-step (twice in one with LoRA: adapters off is the reference); MemTracker's
        # per-module statistics refuse a second forward of a root module, and only the global peak is used here
        if not self._mod_tracker.is_bw:
            self.memory_tracking.pop(module, None)
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:
        # global peak only: MemTracker's per-module peaks cost a pass over every module per op
        for device, snapshot in self._curr_mem_snap.items():
            host = sum(snapshot[category] for category in self.host_categories)
            self.host_peak = max(self.host_peak, host)
            self.transient_peak = max(self.transient_peak, snapshot[_MemRefType.ACT] + snapshot[_MemRefType.TEMP])
            if snapshot[_TOTAL_KEY] - host > self.device_peak:
                self.device_peak = snapshot[_TOTAL_KEY] - host
                self.device_peak_snapshot = {device: dict(snapshot)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _by_category(snapshot: dict, host_categories=()) -> dict:
    """Bytes per report key; ``host_categories`` (offload) are left out: they are not on the device."""
    out = dict.fromkeys(CATEGORIES.values(), 0)
    for device_snapshot in snapshot.values():
        for category, nbytes in device_snapshot.items():
            if category in host_categories:
                out["total"] -= nbytes
            else:
                out[CATEGORIES[category]] += nbytes
    return out


def _offload_optimizer_class():
    try:
        from t2ialign.training.offload import CPUOffloadOptimizer
    except ImportError:
        raise NotImplementedError("--offload: t2ialign.training.offload is not in this checkout yet; "
                                  "estimate without --offload") from None
    return CPUOffloadOptimizer


def _offloaded_tensors(optimizer, offload_class) -> list:
    """What the offload optimizer keeps in host RAM: fp32 masters, gradient buffers, the inner optimizer's states."""
    if not isinstance(optimizer, offload_class):
        raise NotImplementedError(f"--offload: build_optimizer returned {type(optimizer).__name__}, not {offload_class.__name__}")
    states = [t for state in optimizer.inner.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return [*optimizer._masters, *optimizer._grad_buffers, *states]


def _create_optimizer_states(trainable, optimizer) -> None:
    """AdamW and Adafactor make their states at the first step(): one untracked step on zero gradients, so the tracked
    step is a steady-state one (states held from its first micro-step on)."""
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _tracked_optimizer_step(built: dict, micro_steps: int, tracker) -> dict:
    """One optimizer step as the trainer runs it (loop._run_steps): each micro-step in one autocast region, whose
    bf16 weight-cast cache lives until the region ends, and the optimizer step inside the last one.
    Returns the snapshot taken after the last backward, before the optimizer step."""
    trainable, optimizer = built["trainable"], built["optimizer"]
    for micro_step in range(micro_steps):
        with built["autocast"]():
            output = built["forward"]()
            built["backward"](output)
            del output
            if micro_step == micro_steps - 1:
                before_step = tracker.get_tracker_snapshot()
                torch.nn.utils.clip_grad_norm_(trainable, built["config"].optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return before_step


def estimate_row(args, objective: str, lora_rank: int, device) -> dict:
    """The real code path of one optimizer step on fake CPU tensors (nothing is computed or allocated), under
    MemTracker: the peak tensor bytes a GPU run would hold, and what they are (see the module docstring)."""
    start = time.perf_counter()
    if args.tiny:
        tiny_unet()  # real weights, built before any fake mode
    offload_class = _offload_optimizer_class() if args.offload else None
    micro_steps = min(args.grad_accum, 2)  # from the second micro-step on, all gradients are held: later ones repeat it
    with contextlib.ExitStack() as stack:
        if not args.real_tensors:
            stack.enter_context(fake_tensors())
        if args.autocast_policy == "cuda":
            stack.enter_context(cuda_autocast_policy())
        built = build_row(args, objective, lora_rank, torch.device("cpu"))
        _create_optimizer_states(built["trainable"], built["optimizer"])
        offloaded = _offloaded_tensors(built["optimizer"], offload_class) if args.offload else []
        tracker = StepMemTracker(host_categories=(_MemRefType.OPT,) if args.offload else ())
        batch = [value for value in built["batch"].values() if isinstance(value, torch.Tensor)]
        tracker.track_external(built["policy"], built["reference"], built["optimizer"], *batch)
        tracker.track_optimizer_tensors(*offloaded)
        with tracker:
            persistent = tracker.get_tracker_snapshot()
            before_step = _tracked_optimizer_step(built, micro_steps, tracker)
    peak = tracker.device_peak
    return {
        **describe(args, objective, lora_rank, built),
        "tensors": "real" if args.real_tensors else "fake",
        "autocast_policy": args.autocast_policy if args.mixed_precision != "no" else None,
        "micro_steps_tracked": micro_steps,
        "peak_bytes": peak,
        "peak_gib": peak / GIB,
        "peak_gib_with_slack": peak * ALLOCATOR_SLACK / GIB,
        "peak_breakdown_bytes": _by_category(tracker.device_peak_snapshot, tracker.host_categories),
        "persistent_bytes": _by_category(persistent, tracker.host_categories),
        "before_optimizer_step_bytes": _by_category(before_step, tracker.host_categories),
        "activations_temps_peak_bytes": tracker.transient_peak,
        "host_peak_bytes": tracker.host_peak,
        "attention_ops": sorted(op for op in tracker.ops if "attention" in op or "softmax" in op),
        "estimate_s": time.perf_counter() - start,
    }


def estimate_meta(meta: dict, args) -> dict:
    """The report header of ``--estimate-memory``: what its numbers are and what they leave out."""
    meta = {k: v for k, v in meta.items() if k not in ("load_average", "warmup_optimizer_steps", "peak_flops", "peak_flops_source")}
    if not args.real_tensors:
        meta["device"] = "none (fake CPU tensors: shapes and dtypes tracked, nothing computed or allocated)"
    return {
        **meta,
        "estimate_memory": True,
        "smoke_test": bool(args.tiny),  # an estimate of the real configuration, not a CPU stand-in for it
        "peak_memory_kind": ("tensor bytes at the peak of one optimizer step (torch MemTracker); not included: the CUDA "
                             "context (~0.5-1 GiB), cuBLAS/cuDNN workspaces, allocator fragmentation (peak_gib_with_slack)"),
        "allocator_slack": ALLOCATOR_SLACK,
    }


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
    parser.add_argument("--checkpointing-mode", choices=("full", "selective"), default="full",
                        help="with --checkpointing: recompute whole blocks (full) or only the cheap ops in them (selective)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet(s) (t2ialign.models.speed)")
    parser.add_argument("--compile-cache-dir", default=None, help="persistent Inductor cache (default ~/.cache/t2ialign/torchinductor)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last convolution weights and latents")
    parser.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "adafactor"), default="adamw")
    parser.add_argument("--offload", action="store_true", help="optimizer offload: fp32 masters and states in host RAM")
    parser.add_argument("--policy-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="full fine-tune weights on the device; bf16 needs --offload (fp32 masters in host RAM)")
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
    parser.add_argument("--estimate-memory", action="store_true",
                        help="peak GPU memory of one optimizer step, on fake CPU tensors (no GPU, nothing computed)")
    parser.add_argument("--real-tensors", action="store_true",
                        help="with --estimate-memory: track real CPU tensors instead (validates the fake run; small models)")
    parser.add_argument("--autocast-policy", choices=("cuda", "cpu"), default="cuda",
                        help="with --estimate-memory: which autocast op lists to follow (default: CUDA's, as the GPU run)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="print one JSON object to stdout (no PATH) or write it to PATH and print the table")
    args = parser.parse_args(argv)
    args.objectives = list(OBJECTIVES) if args.objective == "all" else [o.strip() for o in args.objective.split(",") if o.strip()]
    unknown = [o for o in args.objectives if o not in OBJECTIVES]
    if unknown:
        parser.error(f"--objective: unknown {unknown}; allowed: {', '.join(OBJECTIVES)} or all")
    if args.count_only and args.estimate_memory:
        parser.error("--count-only and --estimate-memory: choose one")
    if args.real_tensors and not args.estimate_memory:
        parser.error("--real-tensors: only with --estimate-memory")
    if args.estimate_memory and args.compile:
        parser.error("--estimate-memory: eager only (compiled graphs run no Python per op, which the tracker needs); drop --compile")
    shape_only = "--count-only" if args.count_only else "--estimate-memory" if args.estimate_memory and not args.real_tensors else None
    if shape_only and "inpo" in args.objectives:
        if args.objective != "all":
            instead = "count it with --tiny" if args.count_only else "estimate it with --tiny --real-tensors"
            parser.error(f"{shape_only}: inpo's inversion depth depends on the drawn timestep (data-dependent control flow), "
                         f"which meta and fake tensors do not have; {instead} or run it on the GPU")
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
    without_gpu = args.count_only or args.estimate_memory
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not without_gpu else "cpu"))
    on_gpu = device.type == "cuda"
    if args.count_only:  # meta tensors have no autocast; FLOP counts do not depend on the dtype
        args.mixed_precision, args.reference_dtype = "no", "fp32"
    gpu_defaults = on_gpu or args.estimate_memory  # the estimate is of a GPU run
    args.mixed_precision = args.mixed_precision or ("bf16" if gpu_defaults else "no")
    args.reference_dtype = args.reference_dtype or ("bf16" if gpu_defaults else "fp32")
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
    if args.estimate_memory:
        meta = estimate_meta(meta, args)
    run_row = count_only_row if args.count_only else estimate_row if args.estimate_memory else bench_row
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
    if report.get("estimate_memory"):
        return format_estimate_table(report)
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


def format_estimate_table(report: dict) -> str:
    slack = round(100 * (report["allocator_slack"] - 1))
    title = (f"{report['unet']}, {report['resolution']} px, torch {report['torch']}: peak tensor GiB of one optimizer step "
             f"(+slack: +{slack}% allocator fragmentation; CUDA context and workspaces not included). Breakdown at the peak:")
    header = (f"{'objective':9s} {'mode':9s} {'B':>2s} {'ckpt':>9s} {'optimizer':>14s} {'peak GiB':>8s} {'+slack':>6s} | "
              f"{'params':>6s} {'grads':>6s} {'optim':>6s} {'activ':>6s} {'temps':>6s} {'other':>5s} | {'host':>5s} {'s':>4s}")
    lines = [title, header]
    for r in report["rows"]:
        at_peak = {k: v / GIB for k, v in r["peak_breakdown_bytes"].items()}
        ckpt = r["checkpointing_mode"] if r["checkpointing"] else "no"
        optimizer = r["optimizer"] + ("+offload" if r["offload"] else "")
        lines.append(
            f"{r['objective']:9s} {r['mode']:9s} {r['micro_batch']:2d} {ckpt:>9s} {optimizer:>14s} {r['peak_gib']:8.2f} "
            f"{r['peak_gib_with_slack']:6.2f} | {at_peak['parameters'] + at_peak['buffers']:6.2f} {at_peak['gradients']:6.2f} "
            f"{at_peak['optimizer_states']:6.2f} {at_peak['activations']:6.2f} {at_peak['temps']:6.2f} {at_peak['other']:5.2f} | "
            f"{r['host_peak_bytes'] / GIB:5.1f} {r['estimate_s']:4.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
