"""``t2ialign sample``: images for a prompt set from a base model, an aligned UNet / transformer or LoRA, or RL guidance."""
from __future__ import annotations

import argparse

HELP = """Sample images for a prompt set with a fixed seed per prompt (identical initial latents across models).

  t2ialign sample --model stabilityai/stable-diffusion-xl-base-1.0 --prompts partiprompts --out samples/base
  t2ialign sample --model BASE --aligned runs/sdxl-dpo/final --out samples/dpo
  t2ialign sample --model BASE --guide-with runs/sdxl-dpo/final --rlg-scale 1.5 --out samples/rlg1.5
Bases: SD 1.x / 2.x, SDXL, SD3 / SD3.5 and FLUX pipelines (for FLUX.1-dev --guidance is its distilled guidance
input, e.g. 3.5; RL guidance then mixes the guided velocities of the base and aligned transformers).
Prompt sets: partiprompts, geneval, hpsv2, pickapic_test_unique, or a .txt (one prompt per line) / .tsv / .jsonl file.
Interrupted runs continue where they stopped (existing images are kept). Writes images/ and metadata.jsonl."""

# command-line flag -> SampleConfig field
FLAGS = {
    "model": "pretrained", "aligned": "aligned", "guide_with": "guide_with", "rlg_scale": "rlg_scale",
    "prompts": "prompts", "limit": "limit", "out": "output_dir", "num_images": "num_images_per_prompt",
    "seed": "seed", "steps": "num_inference_steps", "guidance": "guidance_scale", "resolution": "resolution",
    "batch_size": "batch_size", "dtype": "dtype", "device": "device", "scheduler": "scheduler",
    "compile": "compile", "compile_mode": "compile_mode", "channels_last": "channels_last",
    "max_sequence_length": "max_sequence_length",
}


def add_sampling_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file with SampleConfig keys (flags override it)")
    parser.add_argument("--model", help="base pipeline: hub id or local diffusers directory (required unless --config "
                        "sets pretrained)")
    parser.add_argument("--aligned", help="sample this aligned model (training export, UNet / transformer or LoRA directory)")
    parser.add_argument("--guide-with", dest="guide_with", help="RL guidance: aligned model mixed with the base")
    parser.add_argument("--rlg-scale", dest="rlg_scale", type=float, help="RL guidance scale w (0 = base, 1 = aligned, >1 extrapolates)")
    parser.add_argument("--prompts", help="prompt set name or file (default: partiprompts)")
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--num-images", dest="num_images", type=int, help="images per prompt (default 1)")
    parser.add_argument("--seed", type=int, help="base seed (default 0)")
    parser.add_argument("--steps", type=int, help="inference steps (default 30)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 5.0; FLUX.1-dev: the distilled guidance)")
    parser.add_argument("--resolution", type=int, help="image size (default: the model's)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="images per pipeline call (default 4)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="GPU precision (CPU always runs fp32)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, or auto (default)")
    parser.add_argument("--scheduler", help="diffusers scheduler class, e.g. DDIMScheduler")
    parser.add_argument("--compile", action="store_const", const=True, help="torch.compile the UNet(s) / transformer(s); the first batch "
                        "compiles (minutes on SDXL), later runs reuse ~/.cache/t2ialign/torchinductor")
    parser.add_argument("--compile-mode", dest="compile_mode", choices=["default", "reduce-overhead", "max-autotune"],
                        help="Inductor mode; reduce-overhead replays CUDA graphs (fewest kernel launches per step)")
    parser.add_argument("--channels-last", dest="channels_last", action="store_const", const=True,
                        help="NHWC convolution weights")
    parser.add_argument("--max-sequence-length", dest="max_sequence_length", type=int,
                        help="SD3 / FLUX: T5 tokens per prompt (default: the pipeline's, SD3 256, FLUX 512); use the "
                        "training run's flow.max_sequence_length")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override any SampleConfig key")


def config_from_args(args):
    from t2ialign.config import load_sample_config

    _require_model(args)
    overrides = list(args.overrides)
    for flag, key in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_sample_config(args.config, overrides)


def _require_model(args) -> None:
    """No silent default base model: sampling SDXL when the user meant another model wastes a long run
    and mislabels the folder. --model, --set pretrained=... or pretrained in --config names it."""
    from t2ialign.config.parsing import load_yaml
    from t2ialign.errors import UserFacingError

    if args.model or any(o.split("=", 1)[0].strip() == "pretrained" for o in args.overrides):
        return
    if args.config and "pretrained" in load_yaml(args.config):
        return
    raise UserFacingError(
        "--model: name the base pipeline to sample, a hub id (e.g. --model stabilityai/stable-diffusion-xl-base-1.0) "
        "or a local diffusers directory; no model is assumed (or set pretrained in the --config file)"
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="sample images for a prompt set (base, aligned, or RL guidance)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from t2ialign.evaluation.sampling import sample

    out = sample(config_from_args(args))
    print(f"images and metadata.jsonl in {out}")
    return 0
