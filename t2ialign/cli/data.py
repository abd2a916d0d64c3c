"""``t2ialign data check PATH``: compare a local copy of Pick-a-Pic with the published figures."""
from __future__ import annotations

import argparse

HELP = """Check a local copy of Pick-a-Pic v2 (parquet file/folder, or webdataset .tar shards).

  t2ialign data check ~/data/pickapic_v2/data
  t2ialign data check "/data/pickapic_v2_webdataset/*.tar" --json report.json

Reports the schema (columns and types against the Pick-a-Pic schema), per split the number of pairs,
ties and their share, unique captions, and flags differences from the published figures, naming each
source (docs/DATA.md, "Where Pick-a-Pic lives now"). Reads captions and labels only, never the images.
Exit code 1 when something is flagged."""


def run_check(args) -> int:
    import json

    from t2ialign.data.check import check_copy

    report = check_copy(args.path)
    print("\n".join(report.lines()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2)
    return 1 if report.problems or report.schema_problems else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect local preference data (check a Pick-a-Pic copy)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    check = actions.add_parser("check", help="compare a local copy with the published Pick-a-Pic figures",
                               description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("path", help="parquet file or folder, .tar shard folder, or a glob of .tar shards")
    check.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    check.set_defaults(func=run_check)
