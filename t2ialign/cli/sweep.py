"""``t2ialign sweep``: RL-guidance scale sweep (sample each w with identical seeds, score, plot score vs w)."""
from __future__ import annotations

import argparse

HELP = """Sample the base model mixed with an aligned model by RL guidance at several scales w, score each
folder and plot score vs w. Every w uses the same prompts and initial latents.

  t2ialign sweep --model stabilityai/stable-diffusion-xl-base-1.0 --guide-with runs/sdxl-dpo/final \\
      --scales 0,0.5,1,1.5,2,3 --scorers pickscore,hpsv21 --prompts partiprompts --limit 200 --out sweeps/dpo

w = 0 is the base model, w = 1 the aligned model, w > 1 extrapolates (docs/ALGORITHMS.md section 5).
The same for SD3 / SD3.5 and FLUX bases with an aligned transformer or transformer LoRA export.
Writes <out>/w<scale>/ (images, metadata.jsonl, scores.jsonl), <out>/sweep.json (mean score per scorer
with a bootstrap CI over prompts, win rate vs w = 0) and <out>/sweep.png. Interrupted sweeps resume."""


def parse_scales(spec: str) -> list[float]:
    from t2ialign.errors import UserFacingError

    try:
        scales = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UserFacingError(f"--scales wants comma-separated numbers such as 0,0.5,1,1.5,2; got {spec!r}") from None
    if not scales:
        raise UserFacingError("--scales: give at least one scale, e.g. 0,0.5,1,1.5,2")
    return scales


def register(subparsers) -> None:
    from t2ialign.cli.sample import add_sampling_arguments

    parser = subparsers.add_parser("sweep", help="RL-guidance scale sweep: sample, score and plot score vs w",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--scales", required=True, help="comma-separated RLG scales, e.g. 0,0.5,1,1.5,2")
    parser.add_argument("--scorers", default="pickscore,hpsv21", help="comma-separated scorer names (default: pickscore,hpsv21)")
    parser.add_argument("--scorer-path", dest="scorer_paths", action="append", default=[], metavar="NAME=PATH",
                        help="weights of one scorer: local file/directory or hub id (repeatable)")
    parser.add_argument("--scorer-device", dest="scorer_device", default=None, help="scorer device (default: cuda if available)")
    parser.add_argument("--scorer-dtype", dest="scorer_dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--scorer-batch-size", dest="scorer_batch_size", type=int, default=32)
    parser.add_argument("--n-boot", dest="n_boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--ci", type=float, default=0.95, help="confidence level (default 0.95)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from t2ialign.cli.sample import config_from_args
    from t2ialign.cli.score import scorer_paths
    from t2ialign.config import SampleConfig
    from t2ialign.errors import UserFacingError
    from t2ialign.evaluation.sweep import rlg_sweep, scale_key
    from t2ialign.scoring import canonical_scorer_name, get_scorer, parse_scorer_list

    scales = parse_scales(args.scales)
    aligned, args.aligned = args.aligned, None  # --aligned is accepted as a synonym of --guide-with here
    if aligned and not args.guide_with:
        args.guide_with = aligned
    config = config_from_args(args)
    if not config.guide_with:
        raise UserFacingError("--guide-with: name the aligned model (training export, UNet / transformer or LoRA directory)")
    out = args.out or (config.output_dir if config.output_dir != SampleConfig.output_dir else "sweep")
    names = parse_scorer_list(args.scorers)
    paths = {canonical_scorer_name(k): v for k, v in scorer_paths(args.scorer_paths).items()}
    scorers = {}
    for name in names:
        scorer = get_scorer(name, paths.get(name), device=args.scorer_device, dtype=args.scorer_dtype,
                            batch_size=args.scorer_batch_size)
        scorers[scorer.name] = scorer
    sweep = rlg_sweep(config, scales, scorers, out, n_boot=args.n_boot, ci=args.ci)
    names = list(scorers)
    print("w\t" + "\t".join(f"{n} [{int(100 * args.ci)}% CI]" for n in names))
    for w in sweep["scales"]:
        stats = sweep["results"][scale_key(w)]["scores"]
        print(f"{w:g}\t" + "\t".join(f"{stats[n]['mean']:.4f} [{stats[n]['low']:.4f}, {stats[n]['high']:.4f}]" for n in names))
    print(f"sweep.json and sweep.png in {out}")
    return 0
