#!/usr/bin/env python
"""Time one sampling step's network work: RL guidance (two models, CFG, batch 1) vs a single model.

    python scripts/bench_sampling.py --tiny                      # CPU, tiny SDXL-shaped UNet (smoke test)
    python scripts/bench_sampling.py --dtype bf16 [--compile]    # GPU, the real SDXL-base UNet, random weights

Rows (each = the UNet evaluations of one denoising step with CFG, i.e. a [uncond; cond] batch of 2):
  single            the base UNet alone (plain CFG: what w = 0 or w = 1 costs)
  rlg_full          RLGUNet over two full UNets (two sequential forwards)
  lora_single       the LoRA-adapted UNet alone
  rlg_lora_seq      RLGUNet over a LoRA, base and adapted branches sequentially
  rlg_lora_batched  RLGUNet over a LoRA, one forward on the duplicated batch (per-sample adapter mask)
Prints a table and a JSON line (``--json PATH`` also writes it). The weights are random: the timings are
those of the real architecture, the images would be noise.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from t2ialign.models.configs import SDXL_BASE_UNET_CONFIG  # written out: the bench machine cannot download it

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_unet(tiny: bool, device, dtype):
    from diffusers import UNet2DConditionModel

    if tiny:
        from t2ialign.models.tiny import tiny_sdxl_components

        unet = tiny_sdxl_components()["unet"]
    else:
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the GPU: ~2.6B parameters
            unet = UNet2DConditionModel.from_config(SDXL_BASE_UNET_CONFIG)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def unet_inputs(unet, batch: int, resolution: int, device, dtype) -> dict:
    """A CFG batch ([uncond; cond], 2 * batch samples) with SDXL conditioning."""
    cfg = unet.config
    n = 2 * batch
    latent = resolution // 8
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    gen = torch.Generator("cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        sample=rand(n, cfg.in_channels, latent, latent), timestep=torch.tensor(500.0, device=device),
        encoder_hidden_states=rand(n, 77, cfg.cross_attention_dim),
        added_cond_kwargs={"text_embeds": rand(n, text_dim),
                           "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n,
                                                    device=device, dtype=dtype)},
    )


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_call(fn, inputs, device, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        fn(**inputs, return_dict=False)
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(**inputs, return_dict=False)
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def _peak_mem(device):
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def main(argv=None) -> dict:
    from t2ialign.guidance import RLGUNet
    from t2ialign.models.lora import add_lora

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL-shaped UNet (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default 1024; 32 with --tiny)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per step (the CFG batch is twice this)")
    parser.add_argument("--w", type=float, default=1.5, help="RLG scale (not 0 or 1, which run one model)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet(s)")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="Inductor mode; reduce-overhead replays CUDA graphs (the eager step is launch-bound)")
    parser.add_argument("--compile-cache-dir", default=None, help="persistent Inductor cache (default ~/.cache/t2ialign/torchinductor)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolution weights and latents")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (CPU runs)")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")]
    resolution = args.resolution or (32 if args.tiny else 1024)
    warmup = args.warmup if args.warmup is not None else (3 if not args.compile else 5)
    iters = args.iters if args.iters is not None else (10 if args.tiny else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.compile:  # compiled artefacts persist across runs, as in training (t2ialign.models.speed)
        from t2ialign.models.speed import configure_compile_cache

        configure_compile_cache(args.compile_cache_dir)
    maybe_compile = (lambda m: torch.compile(m, mode=args.compile_mode)) if args.compile else (lambda m: m)

    results = {}
    base = build_unet(args.tiny, device, dtype)
    inputs = unet_inputs(base, args.batch, resolution, device, dtype)
    if args.channels_last:
        from t2ialign.models.speed import to_channels_last

        to_channels_last(base)
        inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)

    def run(name, fn):
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results[name] = {**time_call(fn, inputs, device, warmup, iters), "peak_mem_gib": _peak_mem(device)}
        print(f"  {name:18s} {results[name]['median_ms']:9.2f} ms", flush=True)

    # full aligned UNet: a second copy with perturbed weights
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.001)
    base_c, tuned_c = maybe_compile(base), maybe_compile(tuned)
    run("single", base_c)
    run("rlg_full", RLGUNet(base_c, tuned_c, w=args.w))
    del tuned, tuned_c
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()

    # LoRA on the base (B perturbed so the adapter is non-trivial)
    add_lora(base, rank=args.lora_rank)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    lora = maybe_compile(base)
    run("lora_single", lora)
    seq = RLGUNet(lora, None, w=args.w, batched=False)
    run("rlg_lora_seq", seq)
    batched = RLGUNet(lora, None, w=args.w, batched=True)
    run("rlg_lora_batched", batched)

    single = results["single"]["median_ms"]
    for row in results.values():
        row["vs_single"] = round(row["median_ms"] / single, 3)
    report = {
        "bench": "rlg_sampling_step", "unet": "tiny-sdxl" if args.tiny else "sdxl-base-1.0 (random weights)",
        "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""), "resolution": resolution, "batch": args.batch, "cfg_batch": 2 * args.batch,
        "w": args.w, "lora_rank": args.lora_rank, "compile": args.compile, "compile_mode": args.compile_mode,
        "channels_last": args.channels_last, "torch": torch.__version__,
        "results": results,
    }
    print(f"\n{'row':18s} {'median ms':>10s} {'min ms':>9s} {'x single':>9s} {'peak GiB':>9s}")
    for name, row in results.items():
        mem = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}"
        print(f"{name:18s} {row['median_ms']:10.2f} {row['min_ms']:9.2f} {row['vs_single']:9.2f} {mem:>9s}")
    print(json.dumps(report))
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
