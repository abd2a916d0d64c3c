#!/usr/bin/env python
"""What each optimizer memory mode costs per optimizer step, scaled to the SDXL UNet (2.57 B parameters).

    python scripts/bench_optimizer.py                       # the available device (cuda, else cpu)
    python scripts/bench_optimizer.py --params 200e6 --json results.json

Modes (``optim.optimizer`` / ``optim.offload`` in a training config):
- ``adamw``: AdamW states on the device (8 bytes/parameter), fused kernel.
- ``adafactor``: factored second moments (well under 1 byte/parameter for 2-D weights).
- ``adamw8bit``: bitsandbytes' 8-bit AdamW (2 bytes/parameter); CUDA only, when bitsandbytes is installed.
- ``adamw+offload``: fp32 masters + AdamW states in pinned host RAM, fused AdamW on the CPU, gradients down
  and weights up over PCIe (``t2ialign.training.offload``); device memory for states: 0.

Each mode runs the optimizer the trainer builds (``t2ialign.training.optim.build_optimizer``) over
about ``--params`` parameters with SDXL's tensor shapes (every k-th tensor of the real config), with
random gradients. It reports the median step time, that time scaled linearly to 2.57 B parameters (an
optimizer step is one pass over the parameters), the optimizer-state bytes per parameter kept on the device
and in host RAM, and the step time amortised per pair for a given ``--pairs-per-step`` (micro-batch x
gradient accumulation). On a CPU-only machine the "device" is the CPU: offload then measures the host side
of the step (the CPU AdamW pass) without the PCIe copies.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

SDXL_UNET_PARAMS = 2_567_463_684
MODES = ("adamw", "adafactor", "adamw8bit", "adamw+offload")


def make_parameters(total: int, device) -> list[torch.nn.Parameter]:
    """About ``total`` parameters with the SDXL UNet's own shapes (every k-th of its 1,680 tensors), so the mix
    of projections, 3x3 convolutions and vectors, which sets Adafactor's state size, is SDXL's."""
    from t2ialign.models.configs import sdxl_base_unet

    shapes = [p.shape for p in sdxl_base_unet(torch.device("meta")).parameters()]
    stride = max(1, round(SDXL_UNET_PARAMS / total))
    return [torch.nn.Parameter(torch.randn(shape, device=device) * 0.02) for shape in shapes[::stride]]


def state_bytes(optimizer) -> dict:
    inner = getattr(optimizer, "inner", optimizer)
    by_device = {}
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                by_device[value.device.type] = by_device.get(value.device.type, 0) + value.numel() * value.element_size()
    return by_device


def bench_mode(mode: str, total: int, device, steps: int) -> dict:
    from t2ialign.config import OptimConfig
    from t2ialign.training.optim import build_optimizer

    name, _, offload = mode.partition("+")
    params = make_parameters(total, device)
    n = sum(p.numel() for p in params)
    optimizer = build_optimizer(params, OptimConfig(optimizer=name, offload=bool(offload)), 1e-5)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for _ in range(steps + 1):  # the first step allocates the states
        _sync(device)
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    states = state_bytes(optimizer)
    host_extra = 8 * n if offload else 0  # fp32 masters + fp32 gradient buffers in host RAM
    return {
        "mode": mode, "device": device.type, "params": n, "step_ms": 1e3 * step_s,
        "sdxl_step_s": step_s * SDXL_UNET_PARAMS / n,
        "device_state_bytes_per_param": (0 if offload else sum(states.values())) / n,
        "host_bytes_per_param": (sum(states.values()) + host_extra) / n if offload else 0.0,
    }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available(mode: str, device) -> str | None:
    if mode == "adamw8bit":
        if device.type != "cuda":
            return "bitsandbytes' 8-bit AdamW needs CUDA"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed"
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6, help="parameters per run (default 1e8; scaled to 2.57e9)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per mode")
    parser.add_argument("--pairs-per-step", type=int, default=32, help="micro-batch x grad accumulation, for the per-pair cost")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH", help="write the rows as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for mode in args.modes.split(","):
        reason = available(mode, device)
        if reason:
            print(f"skipping {mode}: {reason}", file=sys.stderr)
            continue
        row = bench_mode(mode, int(args.params), device, args.steps)
        row["sdxl_ms_per_pair"] = 1e3 * row["sdxl_step_s"] / args.pairs_per_step
        rows.append(row)
    print(f"device: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(f"{'mode':<15}{'step ms':>10}{'SDXL step s':>13}{'ms/pair @' + str(args.pairs_per_step):>13}"
          f"{'device B/param':>16}{'host B/param':>14}")
    for r in rows:
        print(f"{r['mode']:<15}{r['step_ms']:>10.1f}{r['sdxl_step_s']:>13.2f}{r['sdxl_ms_per_pair']:>13.1f}"
              f"{r['device_state_bytes_per_param']:>16.2f}{r['host_bytes_per_param']:>14.2f}")
    if args.json:
        text = json.dumps(rows, indent=2)
        print(text) if args.json == "-" else open(args.json, "w").write(text)
    return rows


if __name__ == "__main__":
    main()
