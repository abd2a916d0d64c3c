"""Torch datasets of preference pairs (winner first) and their collate function.

Bad rows are handled in two stages so that every batch is full and every run is deterministic:

1. ``scan_rows`` (at construction): reads only caption and label columns, drops rows with an empty
   caption, a tie or labels not summing to 1 (and, when the objective needs per-image captions
   (DCPO, ``require_image_captions``), an empty caption_0 / caption_1), and keeps the list of good
   row indices. Pick-a-Pic's 959k rows scan in seconds, because no image is read.
2. ``__getitem__(i)`` decodes the images of good row ``i``. If one is undecodable or too small,
   the row is counted and replaced by the next good row (``i+1``, ``i+2``, ... wrapping around),
   so position ``i`` always yields a pair and always the same pair. A row found bad is remembered
   and not decoded again by this process.

Each sample carries ``bad_rows``: the (row, reason) events met while producing it, including
mode conversions ("converted_CMYK", ...), and ``rows_read``: the rows whose images it read (the
rows the image checks cover). ``collate_pairs`` concatenates both into the batch, so a trainer
using DataLoader workers can merge them into its report with
``report.record_events(batch["bad_rows"])`` and ``report.record_read(batch["rows_read"])`` (with
``num_workers=0`` the dataset's own ``report`` is already complete). ``bad_row_summary()`` says how
many rows the counts cover. With ``data.strict`` the first bad row raises ``DataError`` naming the row.

Rows in reports and events are SOURCE rows (the ``source_row`` column that load_preference_dataset
adds: the position in the source files before any filter), so a user can look them up; datasets
without that column (streams) report their own positions.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from t2ialign.config import DataConfig
from t2ialign.data.badrows import (
    CONVERTED_PREFIX, DUPLICATE, BadRow, BadRowReport, decode_image, metadata_problem, winner_is_first,
)
from t2ialign.data.pickapic import (
    CANONICAL_IMAGE_CAPTIONS, CANONICAL_IMAGES, column_names, image_key, iter_metadata, load_preference_dataset,
    missing_image_captions_message,
)
from t2ialign.data.transforms import PairTransform
from t2ialign.errors import DataError

SCAN_BATCH = 100_000


def scan_rows(dataset, report: Optional[BadRowReport] = None, strict: bool = False,
              require_image_captions: bool = False) -> np.ndarray:
    """Indices of rows whose caption and labels are usable (no image is read); the rest are counted
    in ``report`` (strict: DataError at the first one). ``require_image_captions`` (DCPO): the
    per-image captions caption_0 / caption_1 must be non-empty too.

    A vectorised arrow pass finds the rows that are certainly fine; only the others go through
    ``metadata_problem`` (the one definition of each problem), which names their reason.
    """
    report = report if report is not None else BadRowReport()
    own = list(CANONICAL_IMAGE_CAPTIONS) if require_image_captions else []
    columns = ["caption", "label_0", "label_1", *own] + (["source_row"] if "source_row" in dataset.column_names else [])
    good, start = [], 0
    for table in iter_metadata(dataset, columns, SCAN_BATCH):
        fine = _certainly_fine(table, own).to_numpy(zero_copy_only=False)
        good.append(start + np.flatnonzero(fine))
        for offset in np.flatnonzero(~fine):
            row = table.slice(int(offset), 1).to_pylist()[0]
            problem = metadata_problem(row["caption"], row["label_0"], row["label_1"],
                                       tuple(row[c] for c in own) if own else None)
            if problem is None:
                good.append(np.asarray([start + offset]))
            else:
                _handle_bad_row(report, strict, start + int(offset), problem, row.get("source_row"))
        start += table.num_rows
    return np.sort(np.concatenate(good)).astype(np.int64) if good else np.zeros(0, dtype=np.int64)


def _non_empty_text(table, column: str, key: str) -> "pa.ChunkedArray":
    try:
        text = table[column].cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"the {column} column holds {table[column].type}, not text; check {key}") from None
    return pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)


def _certainly_fine(table, image_captions: list = ()) -> "pa.ChunkedArray":
    """Non-empty caption (and ``image_captions`` columns) and labels that sum to 1 and differ; nulls and NaNs
    count as not fine."""
    has_text = _non_empty_text(table, "caption", "data.caption_column")
    for column in image_captions:
        has_text = pc.and_(has_text, _non_empty_text(table, column, "data.image_caption_columns"))
    try:
        label_0, label_1 = (table[c].cast(pa.float64()) for c in ("label_0", "label_1"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError("the label columns must hold numbers (1/0, or 0.5/0.5 for a tie); check data.label_columns") from None
    sums_to_one = pc.less_equal(pc.abs(pc.subtract(pc.add(label_0, label_1), 1.0)), 1e-6)
    valid = pc.and_(pc.and_(pc.greater_equal(label_0, 0.0), pc.greater_equal(label_1, 0.0)), pc.not_equal(label_0, label_1))
    return pc.fill_null(pc.and_(pc.and_(has_text, sums_to_one), valid), False)


def _handle_bad_row(report: BadRowReport, strict: bool, row: int, problem: BadRow, source: Optional[int] = None) -> None:
    """Count the row under its source-file position when known (what a user can look up)."""
    if strict:
        where = f"row {row}" + (f" (source row {source})" if source is not None else "")
        raise DataError(
            f"bad data at {where}: {problem.reason}: {problem.detail}. "
            "data.strict=true stops at the first bad row; set data.strict=false to skip and count bad rows."
        )
    report.record(source if source is not None else row, problem.reason)
    report.record_read([source if source is not None else row])  # a bad row was read too: counts cover it


def _require_canonical_columns(available: list) -> None:
    missing = [c for c in ("caption", *CANONICAL_IMAGES, "label_0", "label_1") if c not in available]
    if missing:
        raise DataError(
            f"column '{missing[0]}' is missing (columns: {', '.join(available)}); load the dataset with "
            "load_preference_dataset, which maps data.caption_column/image_columns/label_columns to canonical names"
        )


def _require_image_caption_columns(available: list) -> None:
    missing = [c for c in CANONICAL_IMAGE_CAPTIONS if c not in available]
    if missing:
        raise DataError(missing_image_captions_message(missing, available))


def _config_value(cfg: Optional[DataConfig], name: str, override, default):
    if override is not None:
        return override
    return getattr(cfg, name, default) if cfg is not None else default


class _PairBuilder:
    """Shared by the map-style and iterable datasets: one record -> one winner-first sample."""

    transform: PairTransform
    min_image_size: int
    strict: bool
    report: BadRowReport
    require_image_captions: bool = False  # DCPO: per-image captions must exist; an empty one is a bad row

    def _row_problem(self, record: dict) -> Optional[BadRow]:
        """``metadata_problem`` of a streamed record (map-style datasets check this in ``scan_rows``)."""
        own = tuple(record.get(c) for c in CANONICAL_IMAGE_CAPTIONS) if self.require_image_captions else None
        return metadata_problem(record["caption"], record["label_0"], record["label_1"], own)

    def _build(self, record: dict, index: int, epoch: Optional[int], events: list) -> dict:
        images = []
        for column in CANONICAL_IMAGES:
            image, converted_from = decode_image(record[column], self.min_image_size)
            if converted_from is not None:
                events.append((record.get("source_row", index), CONVERTED_PREFIX + converted_from))
            images.append(image)
        caption = str(record["caption"])
        own = [record.get(c) for c in CANONICAL_IMAGE_CAPTIONS]
        own_captions = all(c is not None and str(c).strip() for c in own)
        if self.require_image_captions and not own_captions:  # scan_rows / _row_problem filtered these rows
            raise metadata_problem(caption, record["label_0"], record["label_1"], tuple(own))
        # objectives without per-image captions (and datasets without them): the prompt stands in for a missing one
        image_captions = [c or caption for c in own]
        order = (0, 1) if winner_is_first(record["label_0"]) else (1, 0)
        pair = self.transform(images[order[0]], images[order[1]], index=index, epoch=epoch)
        return {
            "pixel_values": pair.pixel_values,
            "caption": caption,
            "caption_w": str(image_captions[order[0]]),
            "caption_l": str(image_captions[order[1]]),
            "original_sizes": pair.original_sizes,
            "crop_top_left": pair.crop_top_left,
            "own_captions": own_captions,
            "index": int(index),
        }

    def _note_events(self, events: list) -> None:
        for row, reason in events:
            self.report.record(row, reason)

    def bad_row_summary(self) -> str:
        """The report's summary with the rows it covers (all rows of a map-style dataset; a stream's length
        is unknown)."""
        total = len(self.dataset) if isinstance(self, PreferencePairs) else None
        return self.report.coverage_summary(total)


class PreferencePairs(torch.utils.data.Dataset, _PairBuilder):
    """Map-style dataset of winner-first preference pairs over a canonical-column HF dataset.

    ``dataset[i]`` for i in range(len(dataset)) (or ``dataset[(i, epoch)]`` to pick the augmentation
    epoch explicitly) returns::

        pixel_values   float (2, 3, R, R) in [-1, 1], [winner, loser]
        caption        str, the pair's prompt
        caption_w/_l   str, per-image captions (data.image_caption_columns) or the prompt
        own_captions   bool, True when both came from the row (False: the prompt stood in for one or both)
        original_sizes long (2, 2), (height, width) of each decoded image
        crop_top_left  long (2, 2), (top, left) of each crop
        index          int, the row of the HF dataset actually used (after any replacement)
        bad_rows       list of (source row, reason) met while producing this sample

    Options come from ``cfg`` (strict, min_image_size) unless given as keywords.
    ``require_image_captions`` (objectives with per-image captions, DCPO): caption_0 / caption_1 must
    be columns, and a row with an empty one is a bad row (``empty_image_caption``), never trained on
    the pair's prompt.
    """

    def __init__(
        self,
        dataset,
        transform: PairTransform,
        cfg: Optional[DataConfig] = None,
        *,
        strict: Optional[bool] = None,
        min_image_size: Optional[int] = None,
        report: Optional[BadRowReport] = None,
        require_image_captions: bool = False,
    ):
        _require_canonical_columns(dataset.column_names)
        if require_image_captions:
            _require_image_caption_columns(dataset.column_names)
        self.dataset = dataset
        self.transform = transform
        self.strict = bool(_config_value(cfg, "strict", strict, False))
        self.min_image_size = int(_config_value(cfg, "min_image_size", min_image_size, 0))
        self.report = report if report is not None else BadRowReport()
        self.require_image_captions = bool(require_image_captions)
        self.good_rows = scan_rows(dataset, self.report, self.strict, self.require_image_captions)
        if len(self.good_rows) == 0:
            raise DataError(f"data.dataset: no usable rows ({len(dataset)} rows after the load filters; "
                            f"{self.report.summary()}); check data.dataset and its filters (data.drop_ties, "
                            "data.model_names, data.max_rows)")
        self._known_bad: set = set()

    def __len__(self) -> int:
        return len(self.good_rows)

    def set_epoch(self, epoch: int) -> None:
        self.transform.set_epoch(epoch)

    def __getitem__(self, item) -> dict:
        position, epoch = item if isinstance(item, tuple) else (item, None)
        events: list = []
        read: list = []
        count = len(self.good_rows)
        for step in range(count):
            row = int(self.good_rows[(int(position) + step) % count])
            if row in self._known_bad:
                continue
            record = self.dataset[row]
            read.append(int(record.get("source_row", row)))
            try:
                sample = self._build(record, row, epoch, events)
            except BadRow as problem:
                _handle_bad_row(self.report, self.strict, row, problem, record.get("source_row"))
                self._known_bad.add(row)
                events.append((record.get("source_row", row), problem.reason))
                continue
            self._note_events(events)
            self.report.record_read(read)
            sample["bad_rows"], sample["rows_read"] = events, read
            return sample
        raise DataError(f"data.dataset: no row has two usable images ({self.report.summary()}); check that "
                        "data.image_columns hold encoded images (JPEG/PNG bytes) and data.min_image_size")


class IterablePreferencePairs(torch.utils.data.IterableDataset, _PairBuilder):
    """Streaming variant (``data.streaming``): the same samples, bad rows skipped on the fly.

    ``index`` is the row's position in this process's stream (used for augmentation seeds).
    Duplicates are dropped per pass with an in-memory set of (caption, image uids or hashes).
    DataLoader workers each read a share of the stream's shards (datasets does the split).
    """

    def __init__(
        self,
        dataset,
        transform: PairTransform,
        cfg: Optional[DataConfig] = None,
        *,
        strict: Optional[bool] = None,
        min_image_size: Optional[int] = None,
        drop_duplicates: Optional[bool] = None,
        report: Optional[BadRowReport] = None,
        require_image_captions: bool = False,
    ):
        if require_image_captions:
            _require_image_caption_columns(column_names(dataset))
        self.require_image_captions = bool(require_image_captions)
        self.dataset = dataset
        self.transform = transform
        self.strict = bool(_config_value(cfg, "strict", strict, False))
        self.min_image_size = int(_config_value(cfg, "min_image_size", min_image_size, 0))
        self.drop_duplicates = bool(_config_value(cfg, "drop_duplicates", drop_duplicates, True))
        self.report = report if report is not None else BadRowReport()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.transform.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)  # reshuffles a shuffled stream

    def __iter__(self) -> Iterator[dict]:
        seen: set = set()
        for index, record in enumerate(self.dataset):
            events: list = []
            try:
                problem = self._row_problem(record)
                if problem is not None:
                    raise problem
                if self.drop_duplicates and self._is_duplicate(record, seen):
                    raise BadRow(DUPLICATE, "same caption and images as an earlier row")
                sample = self._build(record, index, self.epoch, events)
            except BadRow as problem:
                _handle_bad_row(self.report, self.strict, index, problem)
                continue
            self._note_events(events)
            self.report.record_read([index])
            sample["bad_rows"], sample["rows_read"] = events, [index]
            yield sample

    @staticmethod
    def _is_duplicate(record: dict, seen: set) -> bool:
        ids = [record.get("image_0_uid"), record.get("image_1_uid")]
        if not all(ids):
            ids = [record[c] for c in CANONICAL_IMAGES]
        key = (record["caption"], *sorted(image_key(value) for value in ids))
        if key in seen:
            return True
        seen.add(key)
        return False


def collate_pairs(rows: list) -> dict:
    """Samples -> batch laid out winners first: [w_1..w_B, l_1..l_B] for every per-image field."""
    def winners_then_losers(key: str) -> torch.Tensor:
        return torch.cat([torch.stack([r[key][0] for r in rows]), torch.stack([r[key][1] for r in rows])])

    return {
        "pixel_values": winners_then_losers("pixel_values"),
        "captions": [r["caption"] for r in rows],
        "captions_w": [r["caption_w"] for r in rows],
        "captions_l": [r["caption_l"] for r in rows],
        "original_sizes": winners_then_losers("original_sizes"),
        "crop_top_left": winners_then_losers("crop_top_left"),
        "indices": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        "bad_rows": [event for r in rows for event in r.get("bad_rows", [])],
        "rows_read": [row for r in rows for row in r.get("rows_read", [])],
    }


def build_preference_pairs(cfg: DataConfig, seed: int = 0, report: Optional[BadRowReport] = None,
                           require_image_captions: bool = False) -> Any:
    """load_preference_dataset + PairTransform + (Iterable)PreferencePairs sharing one report.

    ``require_image_captions``: set it for objectives that condition each image on its own caption
    (``get_objective(name).per_image_captions``, DCPO): a dataset without the per-image caption columns
    is a DataError, and a row with an empty one a bad row (not silently the pair's prompt, i.e. DPO)."""
    report = report if report is not None else BadRowReport()
    rows = load_preference_dataset(cfg, report=report, require_image_captions=require_image_captions)
    transform = PairTransform(cfg.resolution, random_crop=cfg.random_crop, random_flip=cfg.random_flip, seed=seed)
    pairs_class = IterablePreferencePairs if cfg.streaming else PreferencePairs
    return pairs_class(rows, transform, cfg, report=report, require_image_captions=require_image_captions)
