"""Local parquet/arrow files, checked before ``datasets`` reads them.

``datasets`` merges a folder of files with different schemas silently: a column missing from some
files becomes null there (for DCPO, per-image captions vanish from part of the data), and a column
of another type is cast (labels stored as strings). It also fails with a traceback on an empty or
truncated file, or a file with a schema but no rows. ``check_data_files`` reads only each file's
footer/schema (and, for arrow streams, batch lengths), and raises one ``DataError`` naming the file,
what is wrong, and the fix.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from t2ialign.errors import DataError

MAX_NAMES = 8  # columns listed per kind of difference; the rest are counted


def check_data_files(files: list, builder: str, root: Path) -> None:
    """Every file readable, with rows, and with the first file's columns and types."""
    reference, total = None, 0
    for file in files:
        schema, rows = read_schema(file, builder, root)
        if rows == 0 and len(files) > 1:  # datasets fails on it ("BatchSize must be greater than 0")
            raise DataError(f"data.dataset: {file} has no rows (a schema only); delete it or re-export it with its rows")
        if reference is None:
            reference = (file, schema)
        difference = schema_difference(reference[1], schema)
        if difference:
            raise DataError(
                f"data.dataset: {file} has a different schema from {reference[0].name} ({difference}); every file of a "
                "dataset needs the same columns and types, else missing columns silently become null and types are cast. "
                f"Fix: re-export {file.name} with the columns and types of {reference[0].name}, or move it out of {root}"
            )
        total += rows
    if total == 0:
        raise DataError(f"data.dataset: {root} has no rows (the file holds a schema only); point data.dataset at a "
                        "file or folder with data")


def read_schema(file: Path, builder: str, root: Path) -> tuple:
    """(arrow schema, number of rows) of one parquet or arrow file; DataError if it cannot be read."""
    try:
        if builder == "parquet":
            handle = pq.ParquetFile(str(file))
            return handle.schema_arrow, handle.metadata.num_rows
        return _read_arrow_schema(file)
    except (pa.ArrowException, OSError) as exc:
        cause = " ".join(str(exc).split())[:160] or type(exc).__name__
        where = "" if file == root else f", or remove it from {root}"
        raise DataError(f"data.dataset: {file} is not a readable .{builder} file ({cause}); it is empty, truncated or "
                        f"another format. Fix: re-download or re-export it{where}") from None


def _read_arrow_schema(file: Path) -> tuple:
    # as datasets' arrow builder: the IPC stream format (save_to_disk, Dataset.to_arrow) first, else the file format
    with pa.memory_map(str(file)) as source:
        try:
            reader = pa.ipc.open_stream(source)
            return reader.schema, sum(batch.num_rows for batch in reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            return reader.schema, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def schema_difference(reference: pa.Schema, other: pa.Schema) -> str:
    """'' if the schemas have the same columns and types, else what differs (missing, extra, types)."""
    want = {f.name: _comparable(f.type) for f in reference}
    have = {f.name: _comparable(f.type) for f in other}
    parts = []
    missing = [name for name in want if name not in have]
    extra = [name for name in have if name not in want]
    types = [f"{name} is {have[name]}, not {want[name]}" for name in want if name in have and have[name] != want[name]]
    for title, names in (("missing columns", missing), ("extra columns", extra), ("different types", types)):
        if names:
            more = f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
            parts.append(f"{title}: {', '.join(names[:MAX_NAMES])}{more}")
    return "; ".join(parts)


def _comparable(kind: pa.DataType) -> pa.DataType:
    """Types that hold the same values compare equal (large_* offsets, timestamp units): different writers pick either."""
    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_large_binary(kind):
        return pa.binary()
    if pa.types.is_large_list(kind):
        return pa.list_(_comparable(kind.value_type))
    if pa.types.is_list(kind):
        return pa.list_(_comparable(kind.value_type))
    if pa.types.is_timestamp(kind):
        return pa.timestamp("ns", kind.tz)
    return kind
