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
    # the same for the flow transformers (SD3.5-medium / -large, FLUX.1-dev; published configs in
    # scripts/flow_model_configs.json), with a pre-encoded cache and without one (text encoders + VAE resident)
    python scripts/bench_train.py --estimate-memory --model sd35-medium,flux-dev --cache both --lora-rank 0,32 --checkpointing

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
  reference H100 (what docs/PERFORMANCE.md's MFU column uses).
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
- ``--model sd35-medium|sd35-large|flux-dev`` (comma-separated for several): the flow transformers built from their
  published configs and run through the trainer's ``flow_preference_step`` (scripts/bench_train_flow.py);
  ``--cache yes|no|both``: pre-encoded batches (no VAE or text encoders loaded) or images + captions encoded each
  micro-step with CLIP / T5 and the VAE resident in the autocast dtype. ``--tiny`` uses the tiny SD3 / FLUX components.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_SCRIPTS, ".."))
if _SCRIPTS not in sys.path:  # the bench_train_* modules next to this file (also when it is loaded from its path)
    sys.path.insert(0, _SCRIPTS)

import torch  # noqa: E402

from bench_train_flops import H100_BF16_DENSE_PEAK, count_only_row  # noqa: E402
from bench_train_memory import estimate_meta, estimate_row, format_estimate_table  # noqa: E402
from bench_train_setup import build_row, make_train_config  # noqa: E402,F401  (part of this script's interface)
from bench_train_flow import FLOW_MODELS  # noqa: E402
from bench_train_timing import bench_row  # noqa: E402

OBJECTIVES = ("dpo", "mapo", "dcpo", "inpo", "sft")
UNET_MODELS = ("sdxl",)
CACHE_MODES = {"yes": (True,), "no": (False,), "both": (True, False)}


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
    parser.add_argument("--channels-last", action="store_true", help="channels-last convolution weights (t2ialign.models.speed); latents stay NCHW, as in training")
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
    parser.add_argument("--model", default="sdxl",
                        help=f"comma-separated: {', '.join(UNET_MODELS)} (default) or flow models "
                             f"({', '.join(FLOW_MODELS)}; --estimate-memory only)")
    parser.add_argument("--cache", choices=tuple(CACHE_MODES), default="yes",
                        help="flow models: pre-encoded batches (yes), images + captions encoded each step with the text "
                             "encoders and VAE resident (no), or a row of each (both)")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="flow models: T5 tokens (default: the pipeline's, SD3 256, FLUX 512)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="print one JSON object to stdout (no PATH) or write it to PATH and print the table")
    args = parser.parse_args(argv)
    args.objectives = list(OBJECTIVES) if args.objective == "all" else [o.strip() for o in args.objective.split(",") if o.strip()]
    unknown = [o for o in args.objectives if o not in OBJECTIVES]
    if unknown:
        parser.error(f"--objective: unknown {unknown}; allowed: {', '.join(OBJECTIVES)} or all")
    _check_models(parser, args)
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


def _check_models(parser, args) -> None:
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in UNET_MODELS + FLOW_MODELS]
    if unknown or not args.models:
        parser.error(f"--model: unknown {unknown}; allowed: {', '.join(UNET_MODELS + FLOW_MODELS)}")
    args.flow = any(m in FLOW_MODELS for m in args.models)
    if args.flow and any(m in UNET_MODELS for m in args.models):
        parser.error("--model: estimate the SDXL UNet and the flow transformers in separate runs")
    if args.flow and not args.estimate_memory:
        parser.error("--model: flow models are supported with --estimate-memory only")
    if args.cache != "yes" and not args.flow:
        parser.error("--cache: the SDXL rows always use pre-encoded batches; --cache no|both is for flow models")
    if args.flow and "inpo" in args.objectives:
        if args.objective != "all":
            parser.error("--objective inpo: DDIM-InPO is not defined for flow models (docs/FLOW.md)")
        args.objectives.remove("inpo")
    if args.flow and args.real_tensors and not args.tiny:
        parser.error("--real-tensors: the flow models have billions of parameters; validate with --tiny")


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
    if args.flow:
        return _main_flow(args, meta)
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
    return _emit(args, {**meta, "rows": rows})


def _main_flow(args, meta: dict) -> dict:
    """--estimate-memory rows of the flow transformers: model x cache x LoRA rank x objective."""
    from bench_train_flow import estimate_flow_row

    from t2ialign.errors import UserFacingError

    source = "t2ialign.models.tiny_flow" if args.tiny else "published configs, scripts/flow_model_configs.json"
    meta = {**meta, "flow": True, "unet": f"{', '.join(args.models)} transformers ({source}), random weights"}
    rows = []
    for model in args.models:
        for cached in CACHE_MODES[args.cache]:
            for lora_rank in args.lora_ranks:
                for objective in args.objectives:
                    mode = "full" if lora_rank == 0 else f"lora r={lora_rank}"
                    print(f"[bench_train] {model} cache={'yes' if cached else 'no'} {objective} {mode} ...", file=sys.stderr, flush=True)
                    try:
                        rows.append(estimate_flow_row(args, model, objective, lora_rank, cached))
                    except UserFacingError as exc:
                        print(f"error: {exc}", file=sys.stderr)
                        raise SystemExit(2)
                    gc.collect()
    return _emit(args, {**meta, "rows": rows})


def _emit(args, report: dict) -> dict:
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
    if report.get("flow"):
        from bench_train_flow import format_flow_estimate_table

        return format_flow_estimate_table(report)
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


if __name__ == "__main__":
    main()
