"""``t2ialign train CONFIG [--set key=value ...]``"""
from __future__ import annotations

import argparse

HELP = """Train a UNet (full fine-tune or LoRA) with a preference objective from a YAML config.

Copy a file from configs/ (e.g. configs/sdxl_dpo.yaml), edit it, and run:
  t2ialign train my.yaml
  t2ialign train my.yaml --set optim.learning_rate=1e-5 --set max_steps=100
Multi-GPU: accelerate launch --config_file configs/accelerate/ddp.yaml -m t2ialign train my.yaml
Resume after an interruption: --set resume=latest
Outputs in output_dir: checkpoint-*/ (full training state), final/ (diffusers UNet or LoRA weights),
metrics.jsonl and logs/ (tensorboard)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train with Diffusion-DPO, MaPO, DCPO, InPO or SFT", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for sections (repeatable), e.g. --set lora.rank=16")
    parser.set_defaults(func=run)


def run(args) -> int:
    from t2ialign.config import load_train_config
    from t2ialign.preflight import check_model_source

    config = load_train_config(args.config, args.overrides)
    check_model_source(config)  # before the heavy imports: a wrong path or an offline hub id fails in a second

    from t2ialign.training import train

    result = train(config)
    print(f"trained {result.final_step} steps; export: {result.export_dir}")
    return 0
