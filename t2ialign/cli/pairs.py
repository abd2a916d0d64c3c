"""``t2ialign pairs``: AI-feedback preference pairs from a model's own samples, or relabelling a dataset."""
from __future__ import annotations

import argparse

HELP = """Preference pairs labelled by AI feedback, in the Pick-a-Pic schema 't2ialign train' reads unchanged.

  t2ialign pairs build --model stabilityai/stable-diffusion-xl-base-1.0 --prompts partiprompts --num-images 4 \\
      --scorers pickscore,hpsv21 --weights 0.7,0.3 --strategy best-worst --min-margin 0.1 --out pairs/sdxl
  t2ialign pairs build --model BASE --aligned runs/dpo/final --prompts my_prompts.txt --scorers my_rewards:score --out pairs/r2
  t2ialign pairs relabel yuvalkirstain/pickapic_v2 --split validation_unique --scorers pickscore --out pairs/relabelled
  t2ialign pairs rounds configs/feedback/rounds_toy.yaml

Then train on them: data.dataset=pairs/sdxl/train.parquet. See docs/FEEDBACK.md."""

BUILD_HELP = """Sample --num-images images per prompt from the model (base, --aligned, or --guide-with + --rlg-scale),
score them, pair them, and write OUT/train.parquet (+ summary.json, summary.png, image_scores.jsonl, samples/).

Scores: one scorer -> its raw score (margins in its units). Several (--scorers a,b --weights 0.7,0.3) -> each
scorer is z-normalised over all images of the run (mean 0, std 1) before the weighted sum, so margins are in
std units. A scorer is a registry name or a Python callable package.module:function.
Strategies: best-worst (one pair per prompt: highest vs lowest score), all (every pair of the prompt's images).
--min-margin drops pairs with |margin| below it in both; exact ties are always dropped.
Interrupted runs resume: rerun the same command (same dataset bytes as an uninterrupted run).
Several processes (GPUs) split the sampling and scoring; the dataset is byte-identical to a 1-process run:
  accelerate launch --config_file configs/accelerate/ddp.yaml -m t2ialign pairs build --model BASE ... --out pairs/r1
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m t2ialign pairs build ... --device cpu --out pairs/r1  (CPU)
A killed multi-process run resumes with any number of processes."""

RELABEL_HELP = """Score both images of every row of a Pick-a-Pic-schema dataset (parquet file/dir, save_to_disk dir or
hub id) and replace label_0/label_1 by the scorer's preference (the old ones kept as orig_label_0/1).
Rows with |margin| < --min-margin (or exactly 0) become ties (0.5); summary.json reports agreement with the
original labels over rows both decided, and the ties of each side separately. Ensembles as in 'pairs build'."""

ROUNDS_HELP = """On-policy (iterative) AI-feedback DPO from a YAML recipe (configs/feedback/rounds_*.yaml): for each round,
sample pairs from the previous round's policy (round 1: the base), label them with the recipe's scorers,
train on them from the previous policy (a new LoRA on top; the previous policy is the reference), and
measure the win rate over the base on held-out prompts (bootstrap 95% CI). Results: OUT/rounds.json and
OUT/rounds.md. Rerun the same command to continue a stopped run (finished steps are skipped); --set rounds=K
adds rounds to a finished one. See docs/FEEDBACK.md."""


def _add_scoring(parser, default_scorers: str | None) -> None:
    parser.add_argument("--scorers", required=default_scorers is None, default=default_scorers,
                        help="comma-separated scorer names or package.module:function callables")
    parser.add_argument("--weights", help="ensemble weights, one per scorer (default: equal); scorers are z-normalised first")
    parser.add_argument("--min-margin", dest="min_margin", type=float, default=0.0,
                        help="drop (build) / tie (relabel) pairs with |score margin| below this (default 0)")
    parser.add_argument("--scorer-path", dest="scorer_paths", action="append", default=[], metavar="NAME=PATH",
                        help="weights of one scorer: local file/directory or hub id (repeatable)")
    parser.add_argument("--scorer-device", dest="scorer_device", default=None, help="scorer device (default: cuda if available)")
    parser.add_argument("--scorer-dtype", dest="scorer_dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--scorer-batch-size", dest="scorer_batch_size", type=int, default=32)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _scorer_options(args) -> dict:
    from t2ialign.cli.score import scorer_paths

    return {"device": args.scorer_device, "dtype": args.scorer_dtype, "scorer_paths": scorer_paths(args.scorer_paths),
            "batch_size": args.scorer_batch_size}


def register(subparsers) -> None:
    from t2ialign.cli.sample import add_sampling_arguments

    parser = subparsers.add_parser("pairs", help="AI-feedback preference pairs (build from samples, or relabel a dataset)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="pairs_command", metavar="{build,relabel,rounds}")
    build = sub.add_parser("build", help="sample, score and pair", description=BUILD_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(build)
    build.add_argument("--prompt-column", dest="prompt_column", default="caption",
                       help="prompt column when --prompts is a parquet file/dir or a hub dataset (default caption)")
    build.add_argument("--strategy", default="best-worst", choices=["best-worst", "all"])
    _add_scoring(build, "pickscore")
    build.set_defaults(func=run_build)
    relabel = sub.add_parser("relabel", help="relabel a preference dataset with a scorer or ensemble",
                             description=RELABEL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    relabel.add_argument("dataset", help="parquet file/directory, save_to_disk directory or hub dataset id")
    relabel.add_argument("--out", required=True, help="output folder (train.parquet, summary.json)")
    relabel.add_argument("--split", default="train")
    relabel.add_argument("--limit", type=int, help="relabel only the first N rows")
    relabel.add_argument("--drop-ties", dest="drop_ties", action="store_true", help="leave rows the scorer ties out of the file")
    _add_scoring(relabel, None)
    relabel.set_defaults(func=run_relabel)
    rounds = sub.add_parser("rounds", help="on-policy rounds: pairs -> train -> evaluate, K times", description=ROUNDS_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    rounds.add_argument("config", help="the rounds recipe (YAML), e.g. configs/feedback/rounds_toy.yaml")
    rounds.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. rounds=3, output_dir=runs/x, train.max_steps=300")
    rounds.set_defaults(func=run_rounds)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_build(args) -> int:
    import json

    from t2ialign.cli.sample import config_from_args
    from t2ialign.errors import UserFacingError
    from t2ialign.feedback import PairsConfig, build_pairs

    if not args.out:
        raise UserFacingError("--out: name the run folder (samples, scores and train.parquet go there)")
    if args.num_images is None:
        args.num_images = 4  # pairs need several images per prompt; SampleConfig's default is 1
    sample_config = config_from_args(args)
    config = PairsConfig(sample=sample_config, scorers=args.scorers, weights=args.weights, strategy=args.strategy,
                         min_margin=args.min_margin, out_dir=args.out, prompt_column=args.prompt_column,
                         scorer_options=_scorer_options(args), progress=args.progress)
    parquet = build_pairs(config)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one report, from the process that wrote the pairs
        return 0
    summary = json.loads((parquet.parent / "summary.json").read_text())
    print(f"pairs: kept {summary['kept']} of {summary['candidates']} candidate pairs "
          f"(dropped {summary['dropped_near_tie']} near-ties below --min-margin {args.min_margin:g}, "
          f"{summary['dropped_tie']} exact ties) from {summary['prompts']} prompts")
    print(f"dataset: {parquet}  (train with data.dataset={parquet})")
    return 0


def run_relabel(args) -> int:
    from t2ialign.feedback import relabel_dataset

    summary = relabel_dataset(args.dataset, args.scorers, args.out, weights=args.weights, min_margin=args.min_margin,
                              split=args.split, limit=args.limit, drop_ties=args.drop_ties,
                              scorer_options=_scorer_options(args), progress=args.progress)
    a = summary["agreement"]
    rate = "n/a" if a["agreement"] is None else f"{a['agreement']:.3f}"
    print(f"relabelled {summary['rows']} rows ({summary['written_rows']} written): agreement with the original labels "
          f"{rate} over {a['both_decided']} rows both decided ({a['agree']} agree, {a['disagree']} disagree); "
          f"ties: {a['original_ties']} original, {a['new_ties']} new, {a['both_ties']} both")
    print(f"dataset: {args.out}/train.parquet")
    return 0


def run_rounds(args) -> int:
    from t2ialign.feedback.rounds import load_recipe, rounds_table, run_rounds as run

    recipe = load_recipe(args.config, args.overrides)
    results = run(recipe)
    print(rounds_table(results), end="")
    print(f"results: {recipe.output_dir}/rounds.json, {recipe.output_dir}/rounds.md")
    return 0
