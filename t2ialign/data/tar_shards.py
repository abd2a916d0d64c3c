"""Pick-a-Pic stored as webdataset ``.tar`` shards, read with ``datasets``' own webdataset builder.

The webdataset mirror of Pick-a-Pic v2 (``sayakpaul/pickapic_v2_webdataset``, see docs/DATA.md "Where
Pick-a-Pic lives now") groups one pair per key prefix, as written by the conversion script in diffusers'
``examples/research_projects/diffusion_orpo/README.md``::

    <key>.original_prompt.txt   <key>.jpg_0.jpg   <key>.jpg_1.jpg   <key>.label_0.txt   <key>.label_1.txt

Other layouts work too: a member's field name minus its last extension becomes a column (``jpg_0.jpg`` ->
``jpg_0``, ``prompt.txt`` -> ``prompt``; map it with ``data.caption_column`` etc.), a ``<key>.json`` member's
keys become columns, and ``original_prompt`` / ``txt`` are the caption. Labels stored as text become numbers;
an unreadable one becomes null, which the metadata pre-pass counts as a bad row. Images stay encoded bytes,
so a corrupt image member is a bad row when first decoded, as for parquet.
"""
from __future__ import annotations

import glob
import os
import tarfile
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import datasets
from datasets.exceptions import DatasetGenerationError

from t2ialign.errors import DataError

CAPTION_ALIASES = {"original_prompt": "caption", "txt": "caption"}  # the mirror's name, webdataset's plain-text default
SKIPPED_FIELDS = ("__key__", "__url__")
GLOB_CHARS = ("*", "?", "[")


def tar_shards(source: Union[str, Sequence[str]]) -> Optional[list]:
    """The ``.tar`` files ``data.dataset`` names (a glob, a list, one .tar, or a folder holding only tars), else None."""
    if isinstance(source, (list, tuple)):
        files = [Path(s).expanduser() for s in source]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"data.dataset: no such file: {missing[0]}")
        return files if all(f.suffix == ".tar" for f in files) else None
    text = os.path.expanduser(str(source))
    if any(c in text for c in GLOB_CHARS) and not Path(text).exists():
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.dataset: no files match {source}")
        return files if all(f.suffix == ".tar" for f in files) else None
    path = Path(text)
    if path.is_file():
        return [path] if path.suffix == ".tar" else None
    if path.is_dir():
        kinds = {p.suffix for p in path.rglob("*") if p.is_file() and p.suffix in (".tar", ".parquet", ".arrow")}
        return sorted(p for p in path.rglob("*.tar") if p.is_file()) if kinds == {".tar"} else None
    return None


def load_tar_shards(files: list, streaming: bool, label_columns: Sequence[str] = ("label_0", "label_1"),
                    caption_column: str = "caption") -> Union[datasets.Dataset, datasets.IterableDataset]:
    """One dataset of the shards' pairs, with a column per field (see the module docstring)."""
    try:
        raw = datasets.load_dataset("webdataset", data_files=[str(f) for f in files], split="train", streaming=streaming)
    except (DatasetGenerationError, ValueError, tarfile.TarError, OSError) as exc:
        cause = " ".join(str(exc.__cause__ or exc).split())[:200]
        raise DataError(f"data.dataset: datasets could not read the tar shards ({cause}); every shard must be a "
                        "complete tar in the webdataset layout (members <key>.<field>); re-download the bad one") from None
    # undecoded: datasets would decode an image member to PIL, and raise on a corrupt one inside the DataLoader
    for name, feature in (raw.features or {}).items():
        if isinstance(feature, datasets.Image):
            raw = raw.cast_column(name, datasets.Image(decode=False))
    labels, text = set(label_columns), {caption_column, "caption"}
    features = _row_features(raw.features, labels, text)
    convert = partial(_to_row, names=_field_names(raw.features), labels=labels, text=text)
    kwargs = {} if streaming else {"desc": "tar shards -> Pick-a-Pic rows"}
    return raw.map(convert, remove_columns=list(raw.features), features=features, **kwargs)


def _field_names(features) -> dict:
    """member field -> column: the last extension dropped (``jpg_0.jpg`` -> ``jpg_0``), caption aliases applied."""
    names = {}
    for field in features:
        if field in SKIPPED_FIELDS or field == "json":
            continue
        base = field.rsplit(".", 1)[0] if "." in field else field
        names[field] = CAPTION_ALIASES.get(base, base)
    return names


def _row_features(features, labels: set, text: set) -> datasets.Features:
    out = {}
    for field, column in _field_names(features).items():
        out[column] = _column_type(features[field], column, labels, text)
    json_feature = features.get("json")
    if isinstance(json_feature, dict):  # a <key>.json member: its keys are columns (labels, caption, models, ...)
        for column, feature in json_feature.items():
            out.setdefault(CAPTION_ALIASES.get(column, column), _column_type(feature, column, labels, text))
    return datasets.Features(out)


def _column_type(feature, column: str, labels: set, text: set):
    if column in labels:
        return datasets.Value("float64")
    if column in text:
        return datasets.Value("string")
    if isinstance(feature, datasets.Image):
        return datasets.Value("binary")  # the same type as the parquet's jpg_0 / jpg_1
    return feature


def _to_row(example: dict, names: dict, labels: set, text: set) -> dict:
    row = {}
    payload = example.get("json")
    if isinstance(payload, dict):
        row.update({CAPTION_ALIASES.get(k, k): v for k, v in payload.items()})
    for field, column in names.items():
        value = example.get(field)
        if isinstance(value, dict) and "bytes" in value:  # an undecoded image member
            value = value["bytes"]
        row[column] = value
    for column in labels & row.keys():
        row[column] = _number(row[column])
    for column in text & row.keys():
        if isinstance(row[column], bytes):  # a caption member without a .txt extension
            row[column] = row[column].decode("utf-8", errors="replace")
    return row


def _number(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # not a number: the metadata pre-pass reports the row as invalid_labels
