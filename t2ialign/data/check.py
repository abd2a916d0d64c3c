"""Check a local copy of Pick-a-Pic against the published figures (``t2ialign data check PATH``).

The original hub repository is gone and copies come from mirrors (docs/DATA.md, "Where Pick-a-Pic lives
now"), often partially downloaded. ``check_copy`` reads only what it needs: for parquet the caption and label
columns (pyarrow, row group by row group, never the images); for ``.tar`` shards the small text members
(tarfile skips over the image members). It reports the schema against the Pick-a-Pic schema, per split the
pair count, ties, unique captions, and compares them with the published figures, naming each source.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from t2ialign.errors import DataError

EXPECTED_SCHEMA = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(),
                   "label_0": pa.float64(), "label_1": pa.float64()}
TEXT_FIELDS = {"original_prompt.txt": "caption", "txt": "caption", "caption.txt": "caption",
               "label_0.txt": "label_0", "label_1.txt": "label_1"}
VIEWER_EXACT = "Hub dataset viewer of yuvalkirstain/pickapic_v2_no_images"
VIEWER = VIEWER_EXACT + " (rounded)"
DPO_PAPER = "Wallace et al. 2023, Diffusion-DPO (arXiv:2311.12908), training setup"
PICKAPIC_PAPER = "Kirstain et al. 2023, Pick-a-Pic (NeurIPS), dataset splits"
ORPO_README = "diffusers examples/research_projects/diffusion_orpo/README.md ({00000..00644}.tar)"


@dataclass(frozen=True)
class Figure:
    value: int
    source: str
    slack: int = 0  # a rounded figure ("959k") matches anything it rounds from


# Pick-a-Pic v2 as published; only figures with a source (docs/DATA.md lists them)
PUBLISHED = {
    "train": {"pairs": Figure(959_000, VIEWER, 500), "pairs_without_ties": Figure(851_293, DPO_PAPER),
              "unique_prompts_without_ties": Figure(58_960, DPO_PAPER)},
    "validation": {"pairs": Figure(20_600, VIEWER, 50)},
    "test": {"pairs": Figure(20_700, VIEWER, 50)},
    "validation_unique": {"pairs": Figure(500, VIEWER_EXACT), "unique_captions": Figure(500, PICKAPIC_PAPER)},
    "test_unique": {"pairs": Figure(500, VIEWER_EXACT), "unique_captions": Figure(500, PICKAPIC_PAPER)},
}
MIRROR_SHARDS = Figure(645, ORPO_README)


@dataclass
class SplitCounts:
    pairs: int = 0
    ties: int = 0
    captions: set = field(default_factory=set)
    captions_without_ties: set = field(default_factory=set)

    def add(self, caption, label_0, label_1) -> None:
        self.pairs += 1
        self.captions.add(caption)
        if label_0 == 0.5 and label_1 == 0.5:
            self.ties += 1
        else:
            self.captions_without_ties.add(caption)

    def figures(self) -> dict:
        return {"pairs": self.pairs, "ties": self.ties, "tie_share": self.ties / self.pairs if self.pairs else 0.0,
                "pairs_without_ties": self.pairs - self.ties, "unique_captions": len(self.captions),
                "unique_prompts_without_ties": len(self.captions_without_ties)}


@dataclass
class CopyReport:
    path: str
    format: str
    splits: dict  # split -> figures (SplitCounts.figures)
    schema: dict  # column -> type name, as stored
    schema_problems: list
    problems: list  # flagged differences, one line each
    notes: list

    def lines(self) -> list:
        out = [f"{self.path}: {self.format}"]
        out.append("schema: " + ", ".join(f"{c} {t}" for c, t in self.schema.items()))
        out += [f"  schema: {p}" for p in self.schema_problems]
        for split, f in self.splits.items():
            out.append(f"{split}: {f['pairs']:,} pairs, {f['ties']:,} ties ({f['tie_share']:.1%}), "
                       f"{f['pairs_without_ties']:,} without ties, {f['unique_captions']:,} unique captions "
                       f"({f['unique_prompts_without_ties']:,} in pairs without ties)")
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  FLAG: {p}" for p in self.problems] or ["  matches the published figures it could be compared with"]
        return out

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("path", "format", "splits", "schema", "schema_problems", "problems", "notes")}


def check_copy(path, published: Optional[dict] = None) -> CopyReport:
    """Counts of a local copy (parquet file/folder or .tar shards) and their differences from ``published``."""
    from t2ialign.data.pickapic import _file_split  # the hub's split naming, as the loader reads it
    from t2ialign.data.tar_shards import tar_shards

    published = PUBLISHED if published is None else published
    root = Path(str(path)).expanduser()
    shards = tar_shards(str(path))
    if shards is not None:
        files, fmt = shards, "webdataset .tar shards"
    elif root.is_file() and root.suffix == ".parquet":
        files, fmt = [root], "parquet"
    elif root.is_dir():
        files, fmt = sorted(root.rglob("*.parquet")), "parquet"
    else:
        files, fmt = [], ""
    if not files:
        raise DataError(f"data check: {path} holds no .parquet files or .tar shards")
    base = root if root.is_dir() else Path(files[0]).parent
    by_split = defaultdict(list)
    for file in files:
        by_split[_file_split(Path(file), base) or "train"].append(Path(file))
    counts, problems, notes = {}, [], []
    if shards is not None:
        schema = _tar_schema(shards[0])
        for split, split_files in by_split.items():
            counts[split] = _count_tars(split_files, problems)
        problems += _missing_numbered(shards, r"^(?:[a-z_]+_)?(\d{5})\.tar$", "shard")
        if not any(_file_split(Path(f), base) for f in shards):
            notes.append(f"{len(shards)} shards; the full webdataset mirror has {MIRROR_SHARDS.value} ({MIRROR_SHARDS.source})")
    else:
        schema = {f.name: str(f.type) for f in pq.read_schema(files[0])}
        for split, split_files in by_split.items():
            counts[split] = _count_parquet(split_files)
        problems += _missing_numbered(files, r"-(\d{5})-of-(\d{5})", "file")
    schema_problems = _schema_problems(schema, fmt)
    splits = {split: c.figures() for split, c in sorted(counts.items())}
    problems += [p for split, f in splits.items() for p in _compare(split, f, published.get(split, {}))]
    return CopyReport(str(path), fmt, splits, schema, schema_problems, problems, notes)


def _count_parquet(files: list) -> SplitCounts:
    counts = SplitCounts()
    for file in files:
        handle = pq.ParquetFile(str(file))
        columns = [c for c in ("caption", "label_0", "label_1") if c in handle.schema_arrow.names]
        for batch in handle.iter_batches(columns=columns, batch_size=65_536):  # streaming: one batch in memory
            data = batch.to_pydict()
            n = batch.num_rows
            for caption, l0, l1 in zip(data.get("caption", [None] * n), data.get("label_0", [None] * n),
                                       data.get("label_1", [None] * n)):
                counts.add(caption, l0, l1)
    return counts


def _count_tars(files: list, problems: list) -> SplitCounts:
    counts = SplitCounts()
    for file in files:
        try:
            for fields in _tar_samples(file):
                meta = fields.get("json", {})
                counts.add(fields.get("caption", meta.get("caption")), _float(fields.get("label_0", meta.get("label_0"))),
                           _float(fields.get("label_1", meta.get("label_1"))))
        except tarfile.TarError as exc:  # a truncated download: count what is there, flag the shard
            problems.append(f"{file.name}: unreadable after {counts.pairs:,} pairs ({exc}); re-download it")
    return counts


def _tar_samples(file: Path):
    """{field: value} per key, reading only the text/json members (image members are skipped, not read)."""
    key, fields = None, {}
    with tarfile.open(file, "r:") as tar:
        for member in tar:
            if not member.isfile() or "." not in Path(member.name).name:
                continue
            name = Path(member.name)
            member_key, field_name = str(name.parent / name.name.split(".", 1)[0]), name.name.split(".", 1)[1]
            if member_key != key:
                if key is not None:
                    yield fields
                key, fields = member_key, {"_members": []}
            fields["_members"].append(field_name)
            if field_name in TEXT_FIELDS:
                fields[TEXT_FIELDS[field_name]] = tar.extractfile(member).read().decode("utf-8", "replace")
            elif field_name == "json":
                fields["json"] = json.load(io.BytesIO(tar.extractfile(member).read()))
    if key is not None:
        yield fields


def _tar_schema(file: Path) -> dict:
    for fields in _tar_samples(file):
        return {m: ("text" if m.endswith(".txt") else "json" if m == "json" else "bytes") for m in fields["_members"]}
    return {}


def _float(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _schema_problems(schema: dict, fmt: str) -> list:
    if fmt != "parquet":  # tar members are untyped; the loader maps the mirror's names (t2ialign.data.tar_shards)
        have = {"caption" if m in ("original_prompt.txt", "txt", "caption.txt") else m.rsplit(".", 1)[0] for m in schema}
        missing = [c for c in EXPECTED_SCHEMA if c not in have and "json" not in have]
        return [f"no member for {', '.join(missing)}"] if missing else []
    problems = []
    for column, kind in EXPECTED_SCHEMA.items():
        if column not in schema:
            what = "images are not included (the caption-only no_images variant?)" if column.startswith("jpg") else ""
            problems.append(f"missing column {column}" + (f": {what}" if what else ""))
        elif schema[column] not in (str(kind), str(_large(kind))):
            problems.append(f"{column} is {schema[column]}, expected {kind}")
    return problems


def _large(kind: pa.DataType) -> pa.DataType:
    return {pa.string(): pa.large_string(), pa.binary(): pa.large_binary()}.get(kind, kind)


def _compare(split: str, figures: dict, published: dict) -> list:
    problems = []
    for name, figure in published.items():
        have = figures[name]
        if abs(have - figure.value) <= figure.slack:
            continue
        shown = f"~{figure.value:,}" if figure.slack else f"{figure.value:,}"
        verdict = "your copy looks incomplete" if have < figure.value else "your copy has more than published"
        problems.append(f"{split}: {have:,} {name.replace('_', ' ')}; published {shown} ({figure.source}): {verdict}")
    return problems


def _missing_numbered(files: list, pattern: str, what: str) -> list:
    """Gaps in numbered names (``00012.tar``; ``train-00003-of-00010.parquet`` also gives the total)."""
    numbers, totals = defaultdict(set), {}
    for file in files:
        match = re.search(pattern, Path(file).name)
        if match:
            prefix = Path(file).name[:match.start(1)]
            numbers[prefix].add(int(match.group(1)))
            if match.lastindex == 2:
                totals[prefix] = int(match.group(2))
    problems = []
    for prefix, present in numbers.items():
        expected = totals.get(prefix, max(present) + 1)
        missing = sorted(set(range(expected)) - present)
        if missing:
            shown = ", ".join(f"{n:05d}" for n in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            problems.append(f"{len(missing)} {what}(s) missing from the numbering of {prefix}*: {shown}")
    return problems
