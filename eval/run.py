#!/usr/bin/env python
"""Reproduce a published result: run one protocol of eval/protocols/ and print published vs ours.

  python eval/run.py eval/protocols/diffusion_dpo_sdxl.yaml --out runs/eval/dpo-sdxl --device cuda
  python eval/run.py eval/protocols/diffusion_dpo_sdxl.yaml --toy --out /tmp/dpo-toy      # offline, on a CPU
  python eval/run.py --list

With real weights the models, scorers and prompt sets are loaded by hub id (or local path: edit a copy of
the protocol, or pass --scorer-path NAME=PATH). --toy runs the protocol's toy-world version end to end
offline: the toy base, aligned toy models trained with the demo's recipes, toy scorers. Images and scores
already in --out are reused, so an interrupted run continues.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

PROTOCOLS = Path(__file__).resolve().parent / "protocols"


def _parser() -> argparse.ArgumentParser:
    from t2ialign.cli.score import add_scorer_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", nargs="?", help="a protocol YAML file, or the name of one in eval/protocols/")
    parser.add_argument("--out", help="output folder (samples, reports, comparison.md)")
    parser.add_argument("--toy", action="store_true", help="run the protocol's toy-world version (offline, CPU)")
    parser.add_argument("--toy-root", help="where toy pairs and aligned toy models are kept (default: OUT/toy-world)")
    parser.add_argument("--toy-steps", type=int, default=150, help="training steps of each aligned toy model (default 150)")
    parser.add_argument("--toy-pairs", type=int, default=1024, help="toy training pairs (default 1024)")
    parser.add_argument("--toy-heldout-pairs", type=int, default=256, help="held-out toy pairs for the implicit reward (default 256)")
    parser.add_argument("--limit", type=int, help="first N prompts of each prompt set (overrides the protocol)")
    parser.add_argument("--n-boot", dest="n_boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap and implicit-reward seed")
    parser.add_argument("--list", action="store_true", help="list the shipped protocols and exit")
    add_scorer_arguments(parser)
    parser.set_defaults(scorers=None)
    return parser


def _protocol_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    candidate = PROTOCOLS / (name if name.endswith(".yaml") else f"{name}.yaml")
    return candidate if candidate.is_file() else path


def _list() -> int:
    from t2ialign.evaluation.protocol import load_protocol

    for path in sorted(PROTOCOLS.glob("*.yaml")):
        protocol = load_protocol(path)
        print(f"{path.stem:<24} {protocol.title or protocol.paper}")
    return 0


def main(argv=None) -> int:
    from t2ialign.hub import use_offline_mode_if_unreachable

    use_offline_mode_if_unreachable()
    args = _parser().parse_args(argv)
    if args.list:
        return _list()
    if not args.protocol or not args.out:
        _parser().error("give a protocol and --out (or --list)")
    from t2ialign.cli.score import scorer_kwargs
    from t2ialign.evaluation.protocol import load_protocol
    from t2ialign.evaluation.reproduce import run_protocol

    protocol = load_protocol(_protocol_path(args.protocol), toy=args.toy)
    if args.limit:
        protocol.sampler["limit"] = args.limit
    if args.scorers:
        protocol.scorers = [s for s in args.scorers.split(",") if s.strip()]
    toy_world = None
    if args.toy:
        from t2ialign.toy.protocol_world import ToyWorld

        toy_world = ToyWorld(Path(args.toy_root or Path(args.out) / "toy-world"), train_steps=args.toy_steps,
                             num_pairs=args.toy_pairs, num_heldout_pairs=args.toy_heldout_pairs)
    kwargs = scorer_kwargs(args)
    device = kwargs.pop("device") or "auto"
    result = run_protocol(protocol, args.out, toy_world=toy_world, device=device, n_boot=args.n_boot, seed=args.seed,
                          scorer_kwargs=kwargs)
    print(result["markdown"])
    print(f"written: {Path(args.out) / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from t2ialign.errors import UserFacingError

    try:
        sys.exit(main())
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
