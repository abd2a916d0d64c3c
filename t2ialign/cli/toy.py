"""``t2ialign toy``: the offline toy world (pretrain its tiny SDXL pipeline, build preference pairs)."""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

DESCRIPTION = """\
The toy world: 32x32 images of one coloured shape, captioned by template ("a large red circle at
the top left"), and a tiny SDXL-structured pipeline (two text encoders, micro-conditioning, a real VAE)
pretrained on it in a few CPU minutes. Everything runs offline, so the whole alignment method can be
seen working on a laptop: pretrain -> pairs -> train (any objective) -> sample -> score.
"""

PAIRS_EPILOG = """\
preferences (programmatic "human" labellers; reward higher = preferred):
{preferences}

The dataset has the Pick-a-Pic v2 columns (jpg_0, jpg_1, label_0, label_1, caption, model_0, ...),
plus caption_0 / caption_1 (what the world's captioner sees in each image, for DCPO) and
reward_0 / reward_1. Read it with datasets.load_dataset("parquet", data_files=".../train.parquet").
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "toy", help="offline toy world: pretrain a tiny SDXL pipeline, build labelled preference pairs",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    toy_commands = parser.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    _register_pretrain(toy_commands)
    _register_pairs(toy_commands)


def _register_pretrain(toy_commands) -> None:
    from t2ialign.toy.pretrain import PretrainConfig

    defaults = PretrainConfig()
    parser = toy_commands.add_parser(
        "pretrain", help="train (or find in the cache) the toy base pipeline",
        description="Train the toy VAE, then the UNet, and save a standard diffusers SDXL pipeline directory "
        "(StableDiffusionXLPipeline.from_pretrained loads it). Without --out the result is cached under "
        "$T2IALIGN_CACHE/toy/<hash> (default ~/.cache/t2ialign) and reused until the world, architecture or "
        "settings change. The default settings are not retrained but written out in seconds from the base shipped "
        "with the package (t2ialign/toy/base; --force retrains, --verify-shipped checks it against a fresh "
        "pretrain). Prints the directory.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="write the pipeline here instead of the cache (always trains)")
    parser.add_argument("--steps", type=int, default=defaults.unet_steps,
                        help=f"UNet training steps (default {defaults.unet_steps}); the VAE gets "
                        f"{defaults.vae_steps} steps scaled by the same ratio")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for the data and the weights")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached pipeline exists")
    parser.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl",
                        help="sdxl (UNet, default) or sd3: a StableDiffusion3Pipeline whose transformer is trained with "
                        "rectified flow, reusing the sdxl toy's VAE and CLIP encoders (what `t2ialign demo --family sd3` "
                        "uses); --steps then counts transformer steps")
    parser.add_argument("--export-shipped", type=Path, metavar="DIR", default=None,
                        help="pretrain from scratch (one thread) and write the package's shipped base into DIR: "
                        "fp16 UNet/VAE weights and manifest.json (what t2ialign/toy/base holds)")
    parser.add_argument("--verify-shipped", action="store_true",
                        help="pretrain from scratch (one thread, ~14 CPU minutes) and check that its fp16 export "
                        "has the same sha256 as the shipped base; exit 1 if not")
    parser.set_defaults(func=run_pretrain)


def _register_pairs(toy_commands) -> None:
    from t2ialign.toy.pairs import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from t2ialign.toy.preferences import DEFAULT_PREFERENCE, PREFERENCES

    listing = "\n".join(
        textwrap.fill(p.description, 96, initial_indent=f"  {name:<11} ", subsequent_indent=" " * 14)
        for name, p in PREFERENCES.items()
    )
    parser = toy_commands.add_parser(
        "pairs", help="sample image pairs from the toy base and label them with a preference function",
        description="Sample two images per prompt from the toy base pipeline (different seeds), label each\n"
        "pair with a programmatic preference, and write a Pick-a-Pic v2-schema parquet file\n"
        "(OUT/train.parquet) plus OUT/pairs_info.json with label statistics.",
        epilog=PAIRS_EPILOG.format(preferences=listing), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", type=Path, default=None,
                        help="toy pipeline directory (default: the cached one, pretrained on first use)")
    parser.add_argument("--preference", default=DEFAULT_PREFERENCE, choices=list(PREFERENCES),
                        help=f"which labeller to imitate (default {DEFAULT_PREFERENCE}; see below)")
    parser.add_argument("--num-pairs", type=int, default=512, help="pairs to write, one prompt each (default 512)")
    parser.add_argument("--out", type=Path, default=Path("toy_pairs"), help="output directory (default ./toy_pairs)")
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="Bradley-Terry temperature in units of the preference's typical reward gap: "
                        "0 = always pick the higher reward, 1 = a typical gap is labelled right ~73%% of the time")
    parser.add_argument("--tie-margin", type=float, default=0.0,
                        help="label pairs whose reward gap is within this many typical gaps as ties (0.5/0.5); "
                        "exactly equal rewards are always ties")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts, sampling and label noise")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--image-format", choices=["png", "jpeg"], default="png",
                        help="encoding of jpg_0/jpg_1 (png keeps colours exact; default png)")
    parser.add_argument("--save-to-disk", action="store_true",
                        help="also write OUT/hf_dataset for datasets.load_from_disk")
    parser.set_defaults(func=run_pairs)


def run_pretrain(args) -> int:
    from dataclasses import replace

    from t2ialign.errors import UserFacingError
    from t2ialign.toy.pretrain import PretrainConfig, get_toy_pipeline, pretrain_toy_pipeline

    if args.steps < 1:
        raise UserFacingError(f"--steps must be at least 1, got {args.steps}")
    config = replace(PretrainConfig(), seed=args.seed).with_steps(args.steps)
    if args.family == "sd3":
        return _pretrain_flow(args)
    if args.verify_shipped or args.export_shipped is not None:
        return _shipped_base(args, config)
    if args.out is not None:
        directory = pretrain_toy_pipeline(args.out, config)
    else:
        directory = get_toy_pipeline(config=config, force=args.force)
    print(directory)
    return 0


def _pretrain_flow(args) -> int:
    from dataclasses import replace

    from t2ialign.errors import UserFacingError
    from t2ialign.toy.flow_pretrain import FlowPretrainConfig, get_flow_toy_pipeline, pretrain_flow_pipeline

    if args.verify_shipped or args.export_shipped is not None:
        raise UserFacingError("--verify-shipped / --export-shipped: only the sdxl toy base ships with the package; "
                              "the sd3 toy is pretrained on first use and cached")
    config = replace(FlowPretrainConfig(), seed=args.seed).with_steps(args.steps)
    if args.out is not None:
        directory = pretrain_flow_pipeline(args.out, config)
    else:
        directory = get_flow_toy_pipeline(config=config, force=args.force)
    print(directory)
    return 0


def _shipped_base(args, config) -> int:
    import tempfile

    from t2ialign.toy import shipped

    if args.verify_shipped:
        results = shipped.verify_shipped(config)
        built_with = results.pop("built_with")
        for name, (expected, fresh) in results.items():
            print(f"{name}: {'identical' if expected == fresh else 'DIFFERENT'}  shipped {expected}  fresh {fresh}")
        same = all(expected == fresh for expected, fresh in results.values())
        if not same and built_with[0] != built_with[1]:
            print(f"note: the shipped base was built with {built_with[0]}, this machine has {built_with[1]}; float "
                  "kernels differ across torch builds and CPU instruction sets, so the bytes match only where both do")
        return 0 if same else 1
    with tempfile.TemporaryDirectory(prefix="t2ialign-export-") as workdir:
        manifest = shipped.export_shipped(shipped.pretrain_fresh(Path(workdir), config), args.export_shipped)
    print(json.dumps(manifest, indent=2))
    return 0


def run_pairs(args) -> int:
    from t2ialign.errors import UserFacingError
    from t2ialign.toy.pairs import INFO_NAME, build_preference_pairs

    if args.num_pairs < 1:
        raise UserFacingError(f"--num-pairs must be at least 1, got {args.num_pairs}")
    if args.base is not None and not (args.base / "model_index.json").is_file():
        raise UserFacingError(f"--base {args.base} is not a diffusers pipeline directory (no model_index.json); "
                              "create one with 't2ialign toy pretrain --out DIR'")
    path = build_preference_pairs(
        args.base, out_dir=args.out, preference=args.preference, num_pairs=args.num_pairs,
        label_noise=args.label_noise, tie_margin=args.tie_margin, seed=args.seed, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, image_format=args.image_format, save_to_disk=args.save_to_disk,
    )
    summary = json.loads((path.parent / INFO_NAME).read_text())
    print(f"{path}  ({summary['num_pairs']} pairs, {summary['ties']} ties, "
          f"reward {summary['reward_mean']:.3f} +- {summary['reward_std']:.3f})")
    return 0
