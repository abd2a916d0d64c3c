"""Prompt sets for evaluation: ``load_prompt_set(name_or_path, limit=None) -> list[PromptRecord]``.

Names (case-insensitive):

* ``parti`` / ``partiprompts`` - the 1,632 PartiPrompts (vendored, Apache-2.0); ``category`` = Category,
  ``meta["challenge"]`` = Challenge.
* ``geneval`` - the 553 GenEval prompts (vendored, MIT); ``category`` = ``tag``, ``meta`` = the row.
* ``hpsv2`` (all four styles, 3,200 prompts) or ``hpsv2:anime|concept-art|paintings|photo`` - the HPSv2
  benchmark, hub dataset ``zhwang/HPDv2`` ``benchmark/<style>.json``; ``category`` = style.
* ``pickapic:test_unique`` / ``pickapic:validation_unique`` (also ``pickapic_test_unique``) - Pick-a-Pic v2
  unique captions, hub dataset ``yuvalkirstain/pickapic_v2_no_images`` (column ``caption``).
* a path: ``.txt`` (one prompt per line, blank lines skipped), ``.tsv``/``.csv`` (column ``Prompt`` or
  ``prompt``, optional ``Category``/``category``), ``.jsonl`` (key ``prompt``, optional ``category`` or
  ``tag``), ``.json`` (a list of strings or of objects with ``prompt``).

``limit`` keeps the first N prompts (file order), so runs with the same limit use the same prompts.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from t2ialign.errors import DataError, UserFacingError
from t2ialign.hub import fix_hint, local_only, offline_note

HPDV2_REPO = "zhwang/HPDv2"
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
PICKAPIC_REPO = "yuvalkirstain/pickapic_v2_no_images"
PICKAPIC_SPLITS = ("test_unique", "validation_unique")


@dataclass
class PromptRecord:
    prompt: str
    category: str | None = None
    index: int = 0
    source: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _vendored(name: str) -> str:
    return str(resources.files("t2ialign") / "prompts" / name)


def _records(prompts, source, categories=None, metas=None) -> list[PromptRecord]:
    out = []
    for i, p in enumerate(prompts):
        out.append(PromptRecord(prompt=str(p).strip(), category=(categories[i] if categories else None), index=i, source=source,
                                meta=(metas[i] if metas else {})))
    return out


def _read_text(path) -> str:
    """The file as text; DataError for a binary or non-UTF-8 file (what a wrong --prompts path usually is)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise DataError(f"prompts file {path}: cannot read it ({exc.strerror or exc}); pass a readable file or a "
                        "prompt-set name (parti, geneval, hpsv2, pickapic:test_unique)") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark would otherwise stick to the first prompt / header
    except UnicodeDecodeError as exc:
        raise DataError(f"prompts file {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        f"{FORMATS}; re-save it as UTF-8 text") from None
    if "\x00" in text:
        raise DataError(f"prompts file {path}: a binary file (it contains NUL bytes), not prompts; {FORMATS}")
    return text


FORMATS = "prompts are .txt (one prompt per line), .tsv/.csv (a Prompt column), .jsonl or .json files in UTF-8"


def _read_table(path, delimiter) -> list[PromptRecord]:
    rows = list(csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter))
    if not rows:
        raise DataError(f"{path}: no rows")
    key = next((k for k in ("Prompt", "prompt", "caption", "text") if k in rows[0]), None)
    if key is None:
        raise DataError(f"{path}: no 'Prompt' or 'prompt' column (columns: {', '.join(rows[0])})")
    ckey = next((k for k in ("Category", "category", "tag") if k in rows[0]), None)
    metas = [{k.lower(): v for k, v in r.items() if k not in (key, ckey) and v not in (None, "")} for r in rows]
    return _records([r[key] for r in rows], os.path.basename(path), [r[ckey] for r in rows] if ckey else None, metas)


def _read_jsonl(path) -> list[PromptRecord]:
    rows = []
    for ln, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{ln}: not JSON ({exc.msg})") from None
    return _from_objects(rows, path)


def _from_objects(rows, path) -> list[PromptRecord]:
    if rows and all(isinstance(r, str) for r in rows):
        return _records(rows, os.path.basename(path))
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "prompt" not in r:
            raise DataError(f"{path}: row {i + 1} has no 'prompt' key")
    cats = [r.get("category", r.get("tag")) for r in rows]
    metas = [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    return _records([r["prompt"] for r in rows], os.path.basename(path), cats if any(c is not None for c in cats) else None, metas)


def _read_txt(path) -> list[PromptRecord]:
    prompts = [ln.strip() for ln in _read_text(path).splitlines() if ln.strip()]
    return _records(prompts, os.path.basename(path))


def _read_json(path) -> list[PromptRecord]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); {FORMATS}") from None
    if isinstance(data, dict) and "prompts" in data:
        data = data["prompts"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of prompts (strings or objects with 'prompt'), or {{\"prompts\": [...]}}")
    return _from_objects(data, path)


def load_prompt_file(path: str) -> list[PromptRecord]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".tsv":
        return _read_table(path, "\t")
    if ext == ".csv":
        return _read_table(path, ",")
    if ext == ".jsonl":
        return _read_jsonl(path)
    if ext == ".json":
        return _read_json(path)
    return _read_txt(path)


def load_hpsv2_benchmark(styles=HPDV2_STYLES) -> list[PromptRecord]:
    """HPSv2 benchmark prompts from the hub (``zhwang/HPDv2`` ``benchmark/<style>.json``)."""
    from huggingface_hub import hf_hub_download

    out = []
    for style in styles:
        if style not in HPDV2_STYLES:
            raise UserFacingError(f"unknown HPSv2 benchmark style {style!r}; one of {', '.join(HPDV2_STYLES)}")
        filename = f"benchmark/{style}.json"
        try:
            path = hf_hub_download(HPDV2_REPO, filename, repo_type="dataset", local_files_only=local_only())
        except Exception as exc:
            raise DataError(
                f"HPSv2 benchmark prompts: {offline_note()}could not get {filename} from hub dataset {HPDV2_REPO} "
                f"({type(exc).__name__}). {fix_hint(HPDV2_REPO, f'pass --prompts DIR/{filename}', filename, 'dataset')}"
            ) from None
        with open(path, encoding="utf-8") as fh:
            prompts = json.load(fh)
        out += [PromptRecord(p, style, 0, f"hpsv2:{style}") for p in prompts]
    for i, r in enumerate(out):
        r.index = i
    return out


def load_pickapic_unique(split: str = "test_unique") -> list[PromptRecord]:
    """Pick-a-Pic v2 unique captions (``test_unique`` / ``validation_unique``), only that split's parquet."""
    if split not in PICKAPIC_SPLITS:
        raise UserFacingError(f"unknown Pick-a-Pic split {split!r}; one of {', '.join(PICKAPIC_SPLITS)}")
    try:
        paths = _pickapic_split_files(split)
    except Exception as exc:
        command = fix_hint(PICKAPIC_REPO, "export its 'caption' column to a .txt file and pass --prompts FILE",
                           f"--include 'data/{split}-*'", "dataset")
        raise DataError(
            f"Pick-a-Pic prompts: {offline_note()}could not get split {split} of hub dataset {PICKAPIC_REPO} "
            f"({type(exc).__name__}). {command}") from None
    import pyarrow.parquet as pq

    captions = []
    for p in paths:
        captions += pq.read_table(p, columns=["caption"]).column("caption").to_pylist()
    unique = list(dict.fromkeys(c for c in captions if c))
    return _records(unique, f"pickapic:{split}")


def _pickapic_split_files(split: str) -> list[str]:
    """The split's parquet files from the hub, or from the cache when offline (no file listing needed)."""
    from huggingface_hub import snapshot_download

    root = snapshot_download(PICKAPIC_REPO, repo_type="dataset", local_files_only=local_only(),
                             allow_patterns=[f"{split}-*.parquet", f"*/{split}-*.parquet"])
    paths = sorted(str(f) for f in Path(root).rglob(f"{split}-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no {split}-*.parquet")
    return paths


def load_prompt_set(name_or_path: str, limit: int | None = None) -> list[PromptRecord]:
    """Records of a named prompt set or a file; see the module docstring."""
    key = name_or_path.strip()
    low = key.lower()
    if os.path.exists(key):
        recs = load_prompt_file(key)
    elif low in ("parti", "partiprompts", "parti-prompts", "parti_prompts"):
        recs = _read_table(_vendored("PartiPrompts.tsv"), "\t")
        for r in recs:
            r.source = "partiprompts"
    elif low == "geneval":
        recs = _read_jsonl(_vendored("geneval_evaluation_metadata.jsonl"))
        for r in recs:
            r.source = "geneval"
    elif low in ("hpsv2", "hpdv2", "hps") or low.startswith(("hpsv2:", "hpdv2:")):
        style = low.split(":", 1)[1] if ":" in low else None
        recs = load_hpsv2_benchmark((style,) if style else HPDV2_STYLES)
    elif low.startswith("pickapic"):
        split = low.split(":", 1)[1] if ":" in low else low[len("pickapic"):].lstrip("_-") or "test_unique"
        recs = load_pickapic_unique(split)
    else:
        raise UserFacingError(
            f"prompt set {name_or_path!r} is neither a file nor a known set; use parti, geneval, hpsv2[:style], "
            "pickapic:test_unique, pickapic:validation_unique or a .txt/.tsv/.csv/.jsonl/.json path")
    if not recs:
        raise DataError(f"prompt set {name_or_path!r} is empty")
    if limit is not None:
        recs = recs[: int(limit)]
    return recs
