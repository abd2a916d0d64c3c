"""The ``t2ialign`` command: argument parsing and dispatch only.

Each subcommand lives in its own module here and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (a callable taking the parsed args and returning an exit code). The work
itself is done by recipe functions elsewhere in the package, so Python users call the same code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# modules under t2ialign.cli, one per subcommand, in --help order
COMMANDS = ["demo", "train", "cache", "sample", "sweep", "score", "eval", "pairs", "data", "toy", "push"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2ialign",
        description="Align text-to-image diffusion models (SDXL, SD1.5/2.1) with human preferences.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 't2ialign COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"t2ialign.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"t2ialign.cli.{name}":
                continue  # command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    from t2ialign.hub import use_offline_mode_if_unreachable

    use_offline_mode_if_unreachable()  # before diffusers/transformers are imported: they read it at import
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from t2ialign.errors import UserFacingError

    try:
        return int(args.func(args) or 0)
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
