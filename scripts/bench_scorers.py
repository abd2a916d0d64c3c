#!/usr/bin/env python
"""Images/s of each scorer, preprocessing included (random weights of the real architectures).

  python scripts/bench_scorers.py --tiny                       # CPU, small configs (a smoke test)
  python scripts/bench_scorers.py --device cuda                 # real-size towers (ViT-H/14, ViT-L/14, BLIP ViT-L)
  python scripts/bench_scorers.py --device cuda --dtype bf16 --tf32 --resize-on device --check-precision

Input: N PIL images of --image-size px (default 1024, SDXL output) and prompts, scored with
``scorer.score`` exactly as ``t2ialign score`` does. Reports images/s end to end and of the
preprocessing alone; ``--check-precision`` also scores the same batch in fp32 with exact CPU
preprocessing and prints the max |delta| (the tolerance to state for bf16 / TF32 / GPU resize).
``--json`` prints one JSON object instead of the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from t2ialign.scoring import clip_preprocess, hps_preprocess  # noqa: E402
from t2ialign.scoring.tiny import tiny_scorer  # noqa: E402

ALL = ["pickscore", "hpsv21", "clip", "aesthetic", "imagereward"]


def make_images(n, size, seed=0):
    rs = np.random.RandomState(seed)
    base = rs.randint(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        arr = np.roll(base, i, axis=0)
        out.append(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
    return out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_one(name, args, images, prompts):
    size = "tiny" if args.tiny else "full"
    kwargs = {"batch_size": args.batch_size, "tf32": args.tf32}
    if name != "imagereward":
        kwargs["resize_on"] = args.resize_on
    scorer = tiny_scorer(name, size=size, device=args.device, dtype=args.dtype, **kwargs)
    scorer.score(images[: args.batch_size], prompts[: args.batch_size])  # warm-up
    sync(scorer.device)
    t0 = time.perf_counter()
    scores = scorer.score(images, prompts)
    sync(scorer.device)
    dt = time.perf_counter() - t0
    # preprocessing alone (CPU recipe)
    t1 = time.perf_counter()
    pre = hps_preprocess if name.startswith("hps") else clip_preprocess
    for i in range(0, len(images), args.batch_size):
        pre(images[i : i + args.batch_size])
    dt_pre = time.perf_counter() - t1
    row = {"scorer": name, "size": size, "device": str(scorer.device), "dtype": str(scorer.dtype).replace("torch.", ""),
           "tf32": args.tf32, "resize_on": args.resize_on if name != "imagereward" else "cpu", "batch_size": args.batch_size,
           "n_images": len(images), "image_px": args.image_size, "images_per_s": len(images) / dt,
           "cpu_preprocess_images_per_s": len(images) / dt_pre}
    if args.check_precision:
        ref = tiny_scorer(name, size=size, device=args.device, dtype="fp32", batch_size=args.batch_size)
        ref_scores = ref.score(images, prompts)
        row["max_abs_delta_vs_fp32_exact"] = float((scores - ref_scores).abs().max())
        row["score_scale_abs_mean"] = float(ref_scores.abs().mean())
        del ref
    del scorer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small random configs on CPU (CI smoke test)")
    p.add_argument("--scorers", default=",".join(ALL))
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--resize-on", dest="resize_on", default="cpu", choices=["cpu", "device"], help="device: GPU-side resize")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--n-images", dest="n_images", type=int, default=None)
    p.add_argument("--image-size", dest="image_size", type=int, default=None)
    p.add_argument("--check-precision", action="store_true", help="also report max |delta| vs fp32 + exact preprocessing")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.batch_size = args.batch_size or (4 if args.tiny else 64)
    args.n_images = args.n_images or (8 if args.tiny else 256)
    args.image_size = args.image_size or (256 if args.tiny else 1024)
    images = make_images(args.n_images, args.image_size)
    prompts = [f"a photo of a red car number {i} on a street at night" for i in range(args.n_images)]
    rows = [bench_one(n.strip(), args, images, prompts) for n in args.scorers.split(",") if n.strip()]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and "cuda" in args.device else "cpu"
    if args.json:
        print(json.dumps({"hardware": gpu, "torch": torch.__version__, "results": rows}, indent=2))
    else:
        print(f"hardware: {gpu}; torch {torch.__version__}; {args.n_images} images of {args.image_size}px")
        cols = ["scorer", "size", "dtype", "tf32", "resize_on", "batch_size", "images_per_s", "cpu_preprocess_images_per_s"]
        if args.check_precision:
            cols += ["max_abs_delta_vs_fp32_exact", "score_scale_abs_mean"]
        print("\t".join(cols))
        for r in rows:
            print("\t".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
