"""``t2ialign push``: upload a training run to the Hugging Face hub as a model repository with a model card."""
from __future__ import annotations

import argparse

HELP = """Share a finished training run as a Hugging Face hub model repository.

  t2ialign push runs/dpo-lora --repo-id you/sdxl-dpo-lora --eval-report reports/dpo/report.json
  t2ialign push runs/dpo-lora --repo-id you/sdxl-dpo-lora --folder-only share/   # write the folder, no upload

The upload folder (default RUN_DIR/share) holds the export (unet/, or the LoRA as
pytorch_lora_weights.safetensors for diffusers plus <name>_kohya.safetensors for AUTOMATIC1111 /
ComfyUI / kohya), the run's config.yaml, and a README.md model card: base model, objective, data, steps,
effective batch, learning rate, the eval win rates with CIs (--eval-report), and how to load it.
Uploading needs a token (`hf auth login` or HF_TOKEN). Without network the folder is still written and
the error names the `hf upload` command to run on a machine with network."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("push", help="upload a training run to the hub with a model card",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder (holds final/ and config.yaml)")
    parser.add_argument("--repo-id", dest="repo_id", required=True, metavar="USER/NAME", help="hub model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it does not exist)")
    parser.add_argument("--eval-report", dest="eval_report", default=None, metavar="PATH",
                        help="a 't2ialign eval' report.json (or its folder): win rates for the model card")
    parser.add_argument("--folder-only", dest="folder_only", default=None, metavar="OUT",
                        help="write the upload folder to OUT and stop (no upload)")
    parser.add_argument("--license", default=None,
                        help="license for the card (default: the base model's license when it is a known one)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from t2ialign.sharing import prepare_share_folder, push_to_hub, upload_command

    if args.folder_only:
        folder = prepare_share_folder(args.run_dir, args.folder_only, eval_report=args.eval_report,
                                      repo_id=args.repo_id, license=args.license)
        print(f"wrote {folder} (upload it with `{upload_command(args.repo_id, folder, args.private)}`)")
        return 0
    url = push_to_hub(args.run_dir, args.repo_id, private=args.private, eval_report=args.eval_report, license=args.license)
    print(f"uploaded to {url}")
    return 0
