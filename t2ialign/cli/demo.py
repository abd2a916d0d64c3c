"""``t2ialign demo``: the offline toy preference world, end to end."""
from __future__ import annotations

import argparse

HELP = """Run the whole method offline on a CPU, in minutes, with nothing downloaded:

  1. take the tiny SDXL-structured pipeline pretrained on a procedurally generated world of captioned
     shapes (shipped with the package, byte-checked against `t2ialign toy pretrain --verify-shipped`, and
     written as a pipeline directory under ~/.cache/t2ialign, or $T2IALIGN_CACHE);
  2. sample preference pairs from it and label them with a programmatic "human" preference;
  3. align it with each objective (Diffusion-DPO, MaPO, DCPO, DDIM-InPO, SFT) using the same trainer
     as a real SDXL run;
  4. sample base and aligned models on held-out prompts with identical seeds, score them, and print
     the win rate over the base with a 95% bootstrap confidence interval;
  5. write a report folder: demo.json, report.html, a base-vs-aligned image grid, reward over training,
     and the RL-guidance sweep.

Every intermediate is a real artefact: the base model is a diffusers SDXL pipeline directory, the
pairs a Pick-a-Pic-schema parquet, each run a normal training output with its config.

--family sd3 runs the same steps on a rectified-flow base instead: a tiny StableDiffusion3Pipeline (MMDiT
transformer, CLIP-L/G + T5, the SDXL toy's VAE) pretrained with flow matching on the same world on first
use (a few CPU minutes, then cached), aligned with DPO, MaPO, DCPO and SFT through the flow trainer
(DDIM-InPO inverts a UNet and has no flow version), with the same RL-guidance sweep."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the offline toy world end to end (no downloads, CPU, minutes)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="t2ialign-demo", help="output folder (default: t2ialign-demo)")
    parser.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl",
                        help="the toy base: sdxl (UNet, shipped; default) or sd3 (rectified flow, pretrained on first use)")
    parser.add_argument("--objectives", help="comma-separated subset, e.g. dpo,mapo (default: all of the family's)")
    parser.add_argument("--preference", help="toy preference function (default: the world's default; see `t2ialign toy pairs --help`)")
    parser.add_argument("--steps", type=int, help="optimizer steps per objective")
    parser.add_argument("--pairs", type=int, help="number of preference pairs to build")
    parser.add_argument("--eval-prompts", type=int, help="held-out prompts to score")
    parser.add_argument("--full", action="store_true",
                        help="fine-tune the whole UNet (sd3: transformer) instead of LoRA adapters (the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2,
                        help="processes for the pairs, the objectives and the RLG sweep, one thread each "
                        "(default 2; 1 = run everything in this process); results do not depend on it")
    parser.set_defaults(func=run)


def run(args) -> int:
    from t2ialign.errors import UserFacingError
    from t2ialign.toy.demo import DemoSettings, run_demo

    if args.workers < 1:
        raise UserFacingError(f"--workers must be at least 1, got {args.workers}")
    settings = DemoSettings(output_dir=args.out, family=args.family, seed=args.seed, lora=not args.full,
                            preference=args.preference, workers=args.workers)
    if args.objectives:
        settings.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for flag, key in (("steps", "train_steps"), ("pairs", "num_pairs"), ("eval_prompts", "num_eval_prompts")):
        if getattr(args, flag) is not None:
            setattr(settings, key, getattr(args, flag))
    run_demo(settings)
    return 0
