"""The on-disk format of sampled images and their scores.

A *model folder* (written by ``t2ialign sample``; one per model compared)::

    <model_dir>/
        metadata.jsonl        one JSON object per image, in generation order
        images/00000.png      the images (any path relative to <model_dir> is allowed)
        scores.jsonl          written by ``t2ialign score`` / ``eval``: the metadata rows + "scores"
        scores_meta.json      which scorers produced scores.jsonl (name, weights, preprocessing, dtype)

``metadata.jsonl`` rows::

    {"prompt": "a red bus", "prompt_index": 12, "seed": 1000, "file": "images/00012.png", "category": "Vehicles"}

* ``prompt`` (str, required) - the prompt the image was generated from;
* ``prompt_index`` (int, required) - index in the prompt set; rows of different models with the same
  ``prompt_index`` are compared (several rows per index = several images per prompt, averaged);
* ``seed`` (int, required) - the seed of the initial latents (same seeds across models);
* ``file`` (str, required) - image path relative to ``<model_dir>``;
* ``category`` (str or null, optional) - PartiPrompts Category, HPSv2 style, GenEval tag;
* ``image_index`` (int, optional) - k-th image of that prompt (``t2ialign sample`` writes it);
* any other keys are kept and passed through to ``scores.jsonl``.

``scores.jsonl`` rows are the metadata rows plus ``"scores": {"pickscore": 21.9, "hpsv21": 0.28, ...}``.
"""
from __future__ import annotations

import json
import os

from t2ialign.errors import DataError

METADATA = "metadata.jsonl"
SCORES = "scores.jsonl"
SCORES_META = "scores_meta.json"
REQUIRED_KEYS = ("prompt", "prompt_index", "seed", "file")


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{ln}: not a JSON object ({exc.msg})") from None
    return rows


def write_jsonl(path: str, rows) -> None:
    """Atomic (temporary file, then rename): a failed write leaves the previous file as it was."""
    from t2ialign.data.files import reported_write

    tmp = path + ".tmp"
    with reported_write(path, f"the previous {os.path.basename(path)} (if any) is intact", cleanup=tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)


def read_metadata(model_dir: str, check_files: bool = True) -> list[dict]:
    """Validated rows of ``<model_dir>/metadata.jsonl``."""
    path = os.path.join(model_dir, METADATA)
    if not os.path.isfile(path):
        raise DataError(f"{model_dir}: no {METADATA}; expected a folder written by 't2ialign sample' "
                        f"(images/ + {METADATA} with keys {', '.join(REQUIRED_KEYS)})")
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: empty")
    for i, r in enumerate(rows, 1):
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise DataError(f"{path}:{i}: missing key(s) {', '.join(missing)}")
        try:
            r["prompt_index"] = int(r["prompt_index"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{i}: prompt_index must be an integer, got {r['prompt_index']!r}") from None
        if check_files and not os.path.isfile(image_path(model_dir, r)):
            raise DataError(f"{path}:{i}: image {r['file']} not found in {model_dir}")
    # a resumed sampling run may append a row for a file again: keep the last row per file, in order
    by_file = {}
    for r in rows:
        by_file.pop(r.get("file"), None)
        by_file[r.get("file")] = r
    rows = list(by_file.values())
    return rows


def image_path(model_dir: str, row: dict) -> str:
    f = row["file"]
    return f if os.path.isabs(f) else os.path.join(model_dir, f)


def read_scores(model_dir: str) -> list[dict] | None:
    path = os.path.join(model_dir, SCORES)
    return read_jsonl(path) if os.path.isfile(path) else None
