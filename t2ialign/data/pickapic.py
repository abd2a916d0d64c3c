"""Load preference datasets (Pick-a-Pic v2 and its relatives) and apply the config's filters.

``load_preference_dataset(cfg)`` accepts a hub id or a local parquet file, directory of parquet
files, arrow file, or ``save_to_disk`` directory. It returns a ``datasets.Dataset`` (or an
``IterableDataset`` with ``data.streaming``) whose columns have the CANONICAL names

    caption, jpg_0, jpg_1, label_0, label_1, [caption_0, caption_1], [model_0, model_1],
    [image_0_uid, image_1_uid], source_row (map-style only: the row's position before filtering)

whatever the source calls them (``data.caption_column``, ``data.image_columns``, ...). Images are
left encoded (bytes); nothing here decodes one. Filters touch only metadata columns, so they
stay cheap on the 959k-row Pick-a-Pic train split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

from t2ialign.config import DataConfig
from t2ialign.data.badrows import DUPLICATE, TIE, BadRowReport
from t2ialign.data.local_files import check_data_files
from t2ialign.data.tar_shards import load_tar_shards, tar_shards
from t2ialign.errors import DataError
from t2ialign.hub import fix_hint, offline_note, use_offline_mode_if_unreachable

logger = logging.getLogger(__name__)

CANONICAL_IMAGES = ("jpg_0", "jpg_1")
CANONICAL_LABELS = ("label_0", "label_1")
CANONICAL_IMAGE_CAPTIONS = ("caption_0", "caption_1")
MODEL_COLUMNS = ("model_0", "model_1")
UID_COLUMNS = ("image_0_uid", "image_1_uid")
DEFAULT_IMAGE_CAPTIONS = list(CANONICAL_IMAGE_CAPTIONS)
FILTER_BATCH = 10_000

AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]


def load_preference_dataset(cfg: DataConfig, report: Optional[BadRowReport] = None,
                            require_image_captions: bool = False) -> AnyDataset:
    """Load, rename to canonical columns, and filter (ties, models, duplicates, row limit).

    Rows removed by filters are counted in ``report.filtered`` (map-style datasets) and logged.
    Duplicates of a streaming dataset are removed later, by IterablePreferencePairs.
    ``require_image_captions`` (objectives with per-image captions, DCPO): the caption columns
    (``data.image_caption_columns``, default included) must exist, else DataError.
    """
    report = report if report is not None else BadRowReport()
    raw = load_raw(cfg)
    mapping = resolve_columns(column_names(raw), cfg, require_image_captions=require_image_captions)
    dataset = select_canonical(raw, mapping)
    if isinstance(dataset, datasets.Dataset):
        dataset = dataset.add_column("source_row", np.arange(len(dataset), dtype=np.int64))  # numpy: hashed fast
    dataset = decode_images_lazily(dataset)
    if cfg.drop_ties:
        dataset = _counted_filter(dataset, _not_a_tie, list(CANONICAL_LABELS), TIE, report)
    if cfg.model_names:
        dataset = filter_models(dataset, cfg.model_names, report)
    if cfg.drop_duplicates and isinstance(dataset, datasets.Dataset):
        dataset = drop_duplicate_pairs(dataset, report)
    dataset = limit_rows(dataset, cfg.max_rows, cfg.shuffle_seed)
    if report.filtered:
        logger.info("data filters: %s", report.summary())
    return dataset


# ---------------------------------------------------------------- loading


def load_raw(cfg: DataConfig) -> AnyDataset:
    """The dataset as stored, one split; DataError for a missing path or split."""
    shards = tar_shards(cfg.dataset)  # webdataset .tar shards: a folder of them, a glob, or a list
    if shards is not None:
        return load_tar_shards(_tar_split(shards, cfg), cfg.streaming, cfg.label_columns, cfg.caption_column)
    source = str(cfg.dataset)
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path, cfg.split, cfg.streaming)
    if source.startswith((".", "/", "~")) or source.endswith((".parquet", ".arrow")) or source.count("/") > 1:
        raise DataError(f"data.dataset: no such file or directory: {source}")
    use_offline_mode_if_unreachable()  # offline: datasets reads its cache instead of retrying the hub
    try:
        return datasets.load_dataset(source, split=cfg.split, streaming=cfg.streaming)
    except ValueError as exc:  # unknown split: datasets names the available ones
        raise DataError(f"data.dataset '{source}', data.split '{cfg.split}': {exc}") from None
    except (FileNotFoundError, ConnectionError, OSError) as exc:  # not found, or offline
        first = " ".join(str(exc).split())[:200]
        raise DataError(
            f"data.dataset: {offline_note()}'{source}' is neither a local path nor a reachable hub dataset ({first}). "
            + fix_hint(source, "set data.dataset=DIR (or a parquet/arrow file, or a save_to_disk directory)",
                       repo_type="dataset")
        ) from None


def _tar_split(shards: list, cfg: DataConfig) -> list:
    """Shards of ``cfg.split``: split-named ones (``train_00000.tar``, ``test/``) when the names carry splits,
    else all of them are ``train`` (the webdataset mirror holds the train split only)."""
    root = Path(os.path.commonpath([str(s.parent) for s in shards]))
    named = {s: _file_split(s, root) for s in shards}
    if any(named.values()):
        chosen = [s for s, split in named.items() if split == cfg.split]
        if chosen:
            return chosen
    elif cfg.split == "train":
        return shards
    found = sorted({split for split in named.values() if split})
    raise DataError(f"data.split: no .tar shards for split '{cfg.split}' in {cfg.dataset}; splits found from file "
                    f"names: {', '.join(found) or '(none: the shards form the train split)'}")


def _load_local(path: Path, split: str, streaming: bool) -> AnyDataset:
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return _load_saved(path, split, streaming)
    if path.is_file():
        files = [path]
    else:
        files = _split_files(path, split)
    kinds = {f.suffix for f in files}
    if kinds - {".parquet", ".arrow"} or len(kinds) != 1:
        raise DataError(f"data.dataset: {path} must hold .parquet or .arrow files (one kind), found {sorted(kinds)}")
    builder = "parquet" if kinds == {".parquet"} else "arrow"
    check_data_files(files, builder, path)  # one schema, no empty files: datasets would merge/cast or fail later
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming)
    except DatasetGenerationError as exc:  # a defect the checks above do not look for (e.g. a corrupt data page)
        cause = " ".join(str(exc.__cause__ or exc).split())[:200]
        raise DataError(f"data.dataset: datasets could not read {path} ({cause}); re-download or re-export the "
                        "file(s)") from None


def _load_saved(path: Path, split: str, streaming: bool) -> AnyDataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets fails with IndexError on a saved dataset of zero rows (no data files)
        if _saved_without_data_files(path):
            raise DataError(f"data.dataset: {path} (split '{split}') has no rows; point data.dataset at a dataset "
                            "with data") from None
        cause = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"data.dataset: datasets could not read the saved dataset {path} ({cause}); save it again "
                        "with save_to_disk") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"data.split: '{split}' is not in {path}; available splits: {', '.join(saved)}")
        saved = saved[split]
    if len(saved) == 0:
        raise DataError(f"data.dataset: {path} (split '{split}') has no rows; point data.dataset at a dataset with data")
    return saved.to_iterable_dataset() if streaming else saved


def _saved_without_data_files(path: Path) -> bool:
    states = [path / "state.json"] if (path / "state.json").exists() else list(path.glob("*/state.json"))
    try:
        return any(not json.loads(state.read_text()).get("_data_files") for state in states)
    except (OSError, ValueError):
        return False


def _split_files(directory: Path, split: str) -> list:
    """Data files of one split: named ``<split>-*`` / ``<split>.*`` or inside a ``<split>/`` folder
    (the hub layout); a directory without split names is all ``train``."""
    files = sorted(p for p in directory.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file())
    if not files:
        raise DataError(f"data.dataset: no .parquet or .arrow files under {directory}")
    in_split = [f for f in files if _file_split(f, directory) == split]
    if in_split:
        return in_split
    named = {_file_split(f, directory) for f in files} - {None}
    if split == "train" and not named:
        return files
    raise DataError(
        f"data.split: no files for split '{split}' under {directory}; "
        f"splits found from file names: {', '.join(sorted(named)) or '(none: the files form the train split)'}"
    )


# "*_unique" first: else "test_unique-0.parquet" (the hub layout) would match as "test"
SPLIT_NAME = re.compile(r"^([a-z]+_unique|train|validation|valid|test)(?=[-._])")


def _file_split(file: Path, root: Path) -> Optional[str]:
    for folder in file.relative_to(root).parts[:-1]:
        if SPLIT_NAME.match(folder + "."):
            return folder
    match = SPLIT_NAME.match(file.name)
    return match.group(1) if match else None


# ---------------------------------------------------------------- columns


def column_names(dataset: AnyDataset) -> list:
    names = dataset.column_names
    if names is None:  # some streaming sources learn their columns from the first row
        names = list(next(iter(dataset)).keys())
    return list(names)


def resolve_columns(available: list, cfg: DataConfig, require_image_captions: bool = False) -> dict:
    """canonical name -> source column; DataError naming the config key for anything missing.

    Per-image captions are optional unless ``require_image_captions`` (DCPO) or set to non-default columns."""
    if len(cfg.image_columns) != 2 or len(cfg.label_columns) != 2:
        raise DataError("data.image_columns and data.label_columns need exactly two entries each (image 0, image 1)")
    required = {"caption": (cfg.caption_column, "data.caption_column")}
    for canonical, source in zip(CANONICAL_IMAGES, cfg.image_columns):
        required[canonical] = (source, "data.image_columns")
    for canonical, source in zip(CANONICAL_LABELS, cfg.label_columns):
        required[canonical] = (source, "data.label_columns")
    mapping = {}
    for canonical, (source, key) in required.items():
        if source not in available:
            raise DataError(_missing_column_message(source, key, available))
        mapping[canonical] = source
    mapping.update(_image_caption_mapping(available, cfg, require_image_captions))
    for extra in MODEL_COLUMNS + UID_COLUMNS:
        if extra in available and extra not in mapping.values():
            mapping[extra] = extra
    return mapping


def _image_caption_mapping(available: list, cfg: DataConfig, required: bool = False) -> dict:
    """Per-image captions (DCPO) when present. A non-default setting that is missing is an error;
    the default is optional because most datasets (Pick-a-Pic itself) have no per-image captions,
    unless ``required`` (the objective conditions each image on its own caption)."""
    sources = list(cfg.image_caption_columns or [])
    if not sources:
        if required:
            raise DataError(missing_image_captions_message([], available))
        return {}
    if len(sources) != 2:
        raise DataError(f"data.image_caption_columns: need two entries (one per image) or none, got {sources}")
    missing = [s for s in sources if s not in available]
    if not missing:
        return dict(zip(CANONICAL_IMAGE_CAPTIONS, sources))
    if required:
        raise DataError(missing_image_captions_message(missing, available))
    if sources == DEFAULT_IMAGE_CAPTIONS:
        return {}
    raise DataError(_missing_column_message(missing[0], "data.image_caption_columns", available))


def missing_image_captions_message(missing: list, available: list) -> str:
    """One line for an objective that needs per-image captions (DCPO) on a dataset without them."""
    what = (f"has no column {', '.join(repr(c) for c in missing)}" if missing
            else "has no per-image caption columns configured (data.image_caption_columns is empty)")
    return (
        f"data.image_caption_columns: DCPO conditions each image on its own caption, but the dataset {what}; "
        f"available columns: {', '.join(available)}. Map the two columns that caption data.image_columns with "
        "data.image_caption_columns=COLUMN_0,COLUMN_1, or add them to the dataset as README.md's \"DCPO captions\" "
        "describes (a VLM caption per image, or the prompt and a perturbed prompt; DualCPO/pick-double-caption ships them)"
    )


def _missing_column_message(column: str, key: str, available: list) -> str:
    return (
        f"column '{column}' is not in the dataset (set by {key}); available columns: {', '.join(available)}. "
        f"Map your dataset's column with {key}."
    )


def select_canonical(dataset: AnyDataset, mapping: dict) -> AnyDataset:
    """Keep only the mapped columns and give them their canonical names (metadata-only operations)."""
    dataset = dataset.select_columns(list(mapping.values()))
    renames = {source: canonical for canonical, source in mapping.items() if source != canonical}
    return dataset.rename_columns(renames) if renames else dataset


def decode_images_lazily(dataset: AnyDataset) -> AnyDataset:
    """Image features (e.g. from imagefolder/save_to_disk) -> undecoded {"bytes", "path"}: our own
    decoder handles bad bytes and odd modes; datasets' would raise inside the DataLoader."""
    features = dataset.features or {}
    for column in CANONICAL_IMAGES:
        feature = features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


# ---------------------------------------------------------------- filters


def iter_metadata(dataset: datasets.Dataset, columns: list, batch_rows: int = 100_000):
    """Arrow tables of ``columns``, in row order, ``batch_rows`` rows at a time.

    After ``filter``/``select`` a Dataset reads through an indices mapping, and datasets' row
    gather then yields one arrow chunk per row (~50x slower for vectorised checks); one ``take``
    on the underlying table gives contiguous arrays. Falls back to the public API if datasets'
    internals change.
    """
    indices = getattr(dataset, "_indices", None)
    try:
        table = dataset.data.table.select(columns)
    except AttributeError:
        table = None
    for start in range(0, len(dataset), batch_rows):
        stop = min(start + batch_rows, len(dataset))
        if table is None:
            yield dataset.select_columns(columns).with_format("arrow")[start:stop].combine_chunks()
        elif indices is None:
            yield table.slice(start, stop - start)
        else:
            yield table.take(indices.column(0).slice(start, stop - start))


def _counted_filter(dataset: AnyDataset, keep_batch, columns: list, reason: str, report: BadRowReport) -> AnyDataset:
    """``filter`` reading only ``columns`` (never the images), counting what it removed."""
    before = len(dataset) if isinstance(dataset, datasets.Dataset) else None
    kwargs = {"input_columns": columns, "batched": True, "batch_size": FILTER_BATCH}
    if isinstance(dataset, datasets.Dataset):
        kwargs["desc"] = f"filter {reason}"
    dataset = dataset.filter(keep_batch, **kwargs)
    if before is not None:
        report.record_filtered(reason, before - len(dataset))
    return dataset


def _not_a_tie(labels_0: list, labels_1: list) -> list:
    return [not (l0 == 0.5 and l1 == 0.5) for l0, l1 in zip(labels_0, labels_1)]


def filter_models(dataset: AnyDataset, model_names: list, report: BadRowReport) -> AnyDataset:
    """Keep rows whose two images both come from a model in ``model_names``."""
    missing = [c for c in MODEL_COLUMNS if c not in column_names(dataset)]
    if missing:
        raise DataError(
            f"data.model_names needs the columns model_0 and model_1, but '{missing[0]}' is not in the dataset; "
            f"available columns: {', '.join(column_names(dataset))}. Remove data.model_names for this dataset."
        )
    allowed = set(model_names)

    def keep(models_0: list, models_1: list) -> list:
        return [m0 in allowed and m1 in allowed for m0, m1 in zip(models_0, models_1)]

    return _counted_filter(dataset, keep, list(MODEL_COLUMNS), "model_names", report)


def drop_duplicate_pairs(dataset: datasets.Dataset, report: BadRowReport) -> datasets.Dataset:
    """Keep the first of rows with the same caption and the same two images (in either order).

    Images are identified by their uids when the dataset has them (Pick-a-Pic: no image bytes are
    read), else by a hash of their bytes (reads the bytes, fine for the ~20k-row sets).
    """
    use_uids = all(c in dataset.column_names for c in UID_COLUMNS)
    columns = ["caption", *(UID_COLUMNS if use_uids else CANONICAL_IMAGES)]
    seen, keep = set(), []
    position = 0
    for table in iter_metadata(dataset, columns, batch_rows=100_000 if use_uids else 256):
        for caption, first, second in zip(*(table[c].to_pylist() for c in columns)):
            key = (caption, *sorted((image_key(first), image_key(second))))
            if key not in seen:
                seen.add(key)
                keep.append(position)
            position += 1
    removed = len(dataset) - len(keep)
    report.record_filtered(DUPLICATE, removed)
    return dataset.select(keep) if removed else dataset


def image_key(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or b""
        value = value.encode() if isinstance(value, str) else value
    return hashlib.sha1(value or b"").hexdigest()


def limit_rows(dataset: AnyDataset, max_rows: Optional[int], seed: int) -> AnyDataset:
    """A reproducible random subset of ``max_rows`` rows (shuffled with ``seed``); all rows if None.

    Without a limit the order is kept: the training sampler shuffles anyway.
    """
    if max_rows is None:
        return dataset
    if max_rows <= 0:
        raise DataError(f"data.max_rows: must be positive (or null for all rows), got {max_rows}")
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.shuffle(seed=seed, buffer_size=10_000).take(max_rows)
    if max_rows >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_rows))
