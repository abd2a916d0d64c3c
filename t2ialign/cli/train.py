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
metrics.jsonl, logs/ (tensorboard), config.yaml and runs.jsonl (every start and resume).

An output_dir belongs to one run: a second run on it is refused while the first runs, and a new run into
a directory that holds a finished or interrupted one needs --set resume=latest or --overwrite.
SIGTERM / Ctrl-C: the run finishes its optimizer step, writes a checkpoint and exits with 143 / 130;
the same signal again (after 2 s) exits at once. See docs/RELIABILITY.md."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train with Diffusion-DPO, MaPO, DCPO, InPO or SFT", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for sections (repeatable), e.g. --set lora.rank=16")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds another run, deleting it (overwrite_output_dir: true)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume with settings that differ from the checkpoint's beyond max_steps, log_every and the "
                             "like (allow_config_change: true); settings that change the model are refused even then")
    parser.set_defaults(func=run)


def run(args) -> int:
    from t2ialign.config import load_train_config
    from t2ialign.preflight import check_model_source

    flags = [f"{key}=true" for key, on in (("overwrite_output_dir", args.overwrite),
                                            ("allow_config_change", args.allow_config_change)) if on]
    config = load_train_config(args.config, [*args.overrides, *flags])
    check_model_source(config)  # before the heavy imports: a wrong path or an offline hub id fails in a second
    from t2ialign.training.run_dir import preflight

    preflight(config)  # so does a new run over another run, or a resume with a changed model

    from t2ialign.training import TrainingInterrupted, train

    try:
        result = train(config)
    except TrainingInterrupted as stopped:  # already logged; resume with --set resume=latest
        return stopped.exit_code
    print(f"trained {result.final_step} steps; export: {result.export_dir}")
    return 0
