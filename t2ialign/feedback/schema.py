"""The pairs' rows: the Pick-a-Pic v2 columns ``t2ialign train`` reads (``t2ialign/data/pickapic.py``) plus
scores, seeds, sampler settings and model provenance; written like the toy pairs (``toy/pairs.py``)."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PARQUET_NAME = "train.parquet"


def image_uid(model: str, row: dict) -> str:
    """A uid that is a function of what drew the image (stable across reruns, unique across models/runs)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"t2ialign-pairs|{model}|{row['seed']}|{row['prompt']}|{row['file']}"))


def pair_columns(folder: Path, rows: Sequence[dict], pairs, combined, raw: Mapping[str, np.ndarray],
                 settings: dict) -> dict[str, list]:
    """Column-major rows, one per pair; the images are the sampler's PNG bytes as stored."""
    model = settings["model"]
    columns: dict[str, list] = {}
    for k, pair in enumerate(pairs):
        a, b = rows[pair.first], rows[pair.second]
        uid_0, uid_1 = image_uid(model, a), image_uid(model, b)
        row = {
            "caption": a["prompt"], "jpg_0": (folder / a["file"]).read_bytes(), "jpg_1": (folder / b["file"]).read_bytes(),
            "label_0": pair.label_0, "label_1": 1.0 - pair.label_0, "best_image_uid": uid_0 if pair.label_0 == 1.0 else uid_1,
            "image_0_uid": uid_0, "image_1_uid": uid_1, "model_0": model, "model_1": model, "are_different": True,
            "has_label": True, "ranking_id": k, "user_id": 0, "num_example_per_prompt": 1,
            "score_0": float(combined[pair.first]), "score_1": float(combined[pair.second]),
            "margin": float(abs(combined[pair.first] - combined[pair.second])),
            "raw_scores_0": json.dumps({n: float(v[pair.first]) for n, v in raw.items()}),
            "raw_scores_1": json.dumps({n: float(v[pair.second]) for n, v in raw.items()}),
            "seed_0": int(a["seed"]), "seed_1": int(b["seed"]), "prompt_index": int(a["prompt_index"]),
            "image_index_0": int(a.get("image_index", 0)), "image_index_1": int(b.get("image_index", 0)),
            **settings,
        }
        for name, value in row.items():
            columns.setdefault(name, []).append(value)
    return columns


def write_parquet_atomic(columns: dict, path: Path) -> Path:
    """``datasets`` writes the file (its features metadata included, as for the toy pairs); temporary file,
    then rename, so a kill leaves the previous file or none, never half of one."""
    import datasets

    if not columns:  # every pair dropped: an empty file with the schema's core columns still loads
        columns = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
        features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Value("binary"),
                                      "jpg_1": datasets.Value("binary"), "label_0": datasets.Value("float64"),
                                      "label_1": datasets.Value("float64")})
        dataset = datasets.Dataset.from_dict(columns, features=features)
    else:
        dataset = datasets.Dataset.from_dict(columns)
    return write_dataset_atomic(dataset, path)


def write_dataset_atomic(dataset, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    dataset.to_parquet(str(tmp))
    os.replace(tmp, path)
    return path


def write_json_atomic(data: dict, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
