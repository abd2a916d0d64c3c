"""Relabel an existing preference dataset with a scorer or ensemble (AI feedback in place of the human
label: the Salesforce Diffusion-DPO script's ``--choice_model``), and measure agreement with the old labels.

Both images of every row are scored; with several scorers each is z-normalised over all images of the
dataset before weighting (``feedback.ensemble``). A row whose margin is below ``min_margin`` (or exactly 0)
becomes a tie (0.5 / 0.5), which ``t2ialign train`` drops by default (``data.drop_ties``); ``drop_ties=True``
leaves such rows out of the file instead. The old labels are kept as ``orig_label_0`` / ``orig_label_1``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from t2ialign.errors import DataError

from .ensemble import ensemble_scores, parse_weights
from .schema import PARQUET_NAME, write_dataset_atomic, write_json_atomic

REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def relabel_dataset(dataset: str, scorers, out_dir, weights: Optional[Sequence[float]] = None, min_margin: float = 0.0,
                    split: str = "train", limit: Optional[int] = None, drop_ties: bool = False,
                    scorer_options: Optional[dict] = None, progress: bool = True, chunk: int = 64) -> dict:
    """Write ``out_dir/train.parquet`` (same schema, new labels) and ``out_dir/summary.json``; returns the summary."""
    from t2ialign.evaluation.recipes import _build_scorers

    from .build import _loader_options, _scorer_list

    ds = _load(dataset, split, limit)
    built = _build_scorers(_scorer_list(scorers), **_loader_options(scorer_options or {}))
    weights = parse_weights(weights, len(built)) if len(built) > 1 else [1.0]
    raw_0, raw_1 = _score(ds, built, chunk, progress)
    n = len(ds)
    combined = ensemble_scores({k: np.concatenate([raw_0[k], raw_1[k]]) for k in raw_0}, weights)
    s0, s1 = combined[:n], combined[n:]
    margin = s0 - s1
    new_0 = np.where((np.abs(margin) < min_margin) | (margin == 0), 0.5, np.where(margin > 0, 1.0, 0.0))
    old_0 = np.asarray(ds["label_0"], dtype=np.float64)
    summary = {"dataset": str(dataset), "split": split, "rows": n, "scorers": list(raw_0), "weights": weights,
               "min_margin": min_margin, "agreement": agreement(old_0, new_0)}
    out = ds.rename_columns({"label_0": "orig_label_0", "label_1": "orig_label_1"})
    new_columns = {"label_0": new_0, "label_1": 1.0 - new_0, "score_0": s0, "score_1": s1,
                   "raw_scores_0": [json.dumps({k: float(v[i]) for k, v in raw_0.items()}) for i in range(n)],
                   "raw_scores_1": [json.dumps({k: float(v[i]) for k, v in raw_1.items()}) for i in range(n)]}
    for name, values in new_columns.items():
        out = out.remove_columns(name) if name in out.column_names else out
        out = out.add_column(name, list(values))
    if drop_ties:
        out = out.select(np.flatnonzero(new_0 != 0.5))
    summary["written_rows"] = len(out)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_atomic(out, out_dir / PARQUET_NAME)
    write_json_atomic(summary, out_dir / "summary.json")
    return summary


def agreement(old_label_0, new_label_0) -> dict:
    """Counts and the agreement rate over rows both decided; ties on either side are counted, not guessed."""
    old, new = np.asarray(old_label_0, dtype=np.float64), np.asarray(new_label_0, dtype=np.float64)
    old_tie, new_tie = old == 0.5, new == 0.5
    both = ~old_tie & ~new_tie
    agree = int(((old == new) & both).sum())
    return {"both_decided": int(both.sum()), "agree": agree, "disagree": int(both.sum()) - agree,
            "agreement": agree / int(both.sum()) if both.any() else None,
            "original_ties": int(old_tie.sum()), "new_ties": int(new_tie.sum()), "both_ties": int((old_tie & new_tie).sum())}


def _load(dataset: str, split: str, limit: Optional[int]):
    import datasets

    from t2ialign.config import DataConfig
    from t2ialign.data.pickapic import load_raw

    ds = load_raw(DataConfig(dataset=str(dataset), split=split))
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise DataError(f"{dataset}: missing column(s) {', '.join(missing)}; relabel reads the Pick-a-Pic schema "
                        f"({', '.join(REQUIRED)})")
    for column in ("jpg_0", "jpg_1"):  # keep the stored bytes: written back unchanged
        if isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def _decode(value) -> Image.Image:
    if isinstance(value, dict):
        value = value.get("bytes") or open(value["path"], "rb").read()
    with Image.open(io.BytesIO(value)) as image:
        return image.convert("RGB")


def _score(ds, scorers, chunk: int, progress: bool) -> tuple[dict, dict]:
    raw_0 = {s.name: [] for s in scorers}
    raw_1 = {s.name: [] for s in scorers}
    bar = tqdm(total=len(ds), desc="relabelling", unit="pair", disable=not progress)
    for batch in ds.select_columns(["caption", "jpg_0", "jpg_1"]).iter(batch_size=chunk):
        images_0, images_1 = [_decode(v) for v in batch["jpg_0"]], [_decode(v) for v in batch["jpg_1"]]
        for s in scorers:
            raw_0[s.name].extend(s.score(images_0, batch["caption"]).tolist())
            raw_1[s.name].extend(s.score(images_1, batch["caption"]).tolist())
        bar.update(len(batch["caption"]))
    bar.close()
    return {k: np.asarray(v) for k, v in raw_0.items()}, {k: np.asarray(v) for k, v in raw_1.items()}
