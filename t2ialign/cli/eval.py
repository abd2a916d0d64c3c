"""``t2ialign eval``: score several model folders, win rates with bootstrap CIs, HTML/JSON report."""
from __future__ import annotations

import argparse

HELP = """Compare models sampled with the same prompts and seeds: per-model means, pairwise win rates with
bootstrap confidence intervals (per scorer; per category for PartiPrompts), and a report.

  t2ialign eval base=samples/base dpo=samples/dpo --baseline base --out reports/dpo
  t2ialign eval samples/base samples/dpo --scorers pickscore,hpsv21 --n-boot 2000
  t2ialign eval base=samples/base dpo=samples/dpo --runs dpo=runs/dpo --sweep sweeps/dpo --out reports/dpo

Win rate of A over B = (#prompts with s_A > s_B + 0.5 * #ties) / N (images of one prompt averaged first).
Writes OUT/report.json, OUT/report.html (self-contained), OUT/winrates.png, histograms.png, grid.png;
with --runs (training output folders: loss / implicit accuracy from metrics.jsonl) training_metrics.png,
with --sweep (a `t2ialign sweep` folder: sweep.json) rlg_sweep.png; both also appear in report.html.
Folders already scored with the requested scorers are not rescored (use --rescore)."""


def run(args) -> int:
    from t2ialign.cli.score import scorer_kwargs
    from t2ialign.evaluation.recipes import evaluate

    kw = scorer_kwargs(args)
    paths = evaluate(args.models, args.scorers, args.out, baseline=args.baseline, rescore=args.rescore, n_boot=args.n_boot,
                     ci=args.ci, seed=args.seed, title=args.title, max_grid_prompts=args.grid, runs=args.runs or None,
                     sweep=args.sweep, **kw)
    import json

    with open(paths["report.json"]) as fh:
        report = json.load(fh)
    for w in report["win_rates"]:
        print(f"{w['model_a']} vs {w['model_b']} [{w['scorer']}]: win rate {w['win_rate']:.3f} "
              f"[{w['low']:.3f}, {w['high']:.3f}] (N={w['n']})")
    print(f"report: {paths['report.html']}")
    return 0


def register(subparsers) -> None:
    from t2ialign.cli.score import add_scorer_arguments

    parser = subparsers.add_parser("eval", help="win rates with bootstrap CIs and an HTML/JSON report",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="[NAME=]FOLDER", help="model folders (images/ + metadata.jsonl)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--baseline", help="model name to compare every other model against (default: all pairs)")
    parser.add_argument("--n-boot", dest="n_boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--ci", type=float, default=0.95, help="confidence level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--rescore", action="store_true", help="score again even if scores.jsonl has the scorers")
    parser.add_argument("--title", help="report title")
    parser.add_argument("--grid", type=int, default=16, help="prompts shown in the image grid (default 16)")
    # one folder per flag (repeat it): a list-valued option would swallow the model folders after it
    parser.add_argument("--runs", action="append", metavar="[NAME=]DIR", default=[],
                        help="a training output folder (metrics.jsonl) whose loss / implicit accuracy curves go into the "
                             "report; repeat for several runs")
    parser.add_argument("--sweep", metavar="DIR", help="an RLG sweep folder (sweep.json of `t2ialign sweep`) to add to the report")
    add_scorer_arguments(parser)
    parser.set_defaults(func=run)
