"""Preference data: loading (hub, parquet, arrow, save_to_disk), column mapping, filters, bad-row
accounting, pair transforms, batching, and synthetic Pick-a-Pic files for tests.

Typical use::

    rows = load_preference_dataset(cfg.data)                # canonical columns, filtered
    pairs = PreferencePairs(rows, PairTransform(1024), cfg.data)
    loader = DataLoader(pairs, batch_size=4, collate_fn=collate_pairs)

or ``build_preference_pairs(cfg.data, seed)`` for all three with one shared ``BadRowReport``.
"""
from t2ialign.data.badrows import BadRow, BadRowReport, decode_image, metadata_problem, to_rgb
from t2ialign.data.pairs import (
    IterablePreferencePairs, PreferencePairs, build_preference_pairs, collate_pairs, scan_rows,
)
from t2ialign.data.pickapic import load_preference_dataset, load_raw, resolve_columns
from t2ialign.data.synthetic import BAD_ROW_KINDS, read_injected_rows, write_pickapic_parquet
from t2ialign.data.transforms import PairTransform, TransformedPair

__all__ = [
    "BAD_ROW_KINDS", "BadRow", "BadRowReport", "IterablePreferencePairs", "PairTransform", "PreferencePairs",
    "TransformedPair", "build_preference_pairs", "collate_pairs", "decode_image", "load_preference_dataset",
    "load_raw", "metadata_problem", "read_injected_rows", "resolve_columns", "scan_rows", "to_rgb",
    "write_pickapic_parquet",
]
