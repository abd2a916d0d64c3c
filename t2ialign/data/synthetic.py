"""Small Pick-a-Pic v2-schema parquet files drawn on the fly, for tests, demos and the CLI.

Nothing can be downloaded in tests, so this writes real files in the real schema (see
``docs/DATA.md``): JPEG bytes in ``jpg_0``/``jpg_1``, float labels, model names, uids, plus the
DCPO per-image captions ``caption_0``/``caption_1``. The images are simple coloured shapes; the
preferred image matches its caption's colours, so the preference is learnable by a toy model.

Every bad-row kind the loader must survive can be injected (``bad_rows={"cmyk": 2, ...}``). Which
rows received which defect is stored in the parquet's schema metadata; read it back with
:func:`read_injected_rows`.
"""
from __future__ import annotations

import io
import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# kinds accepted in ``bad_rows``; the loader's reason for each is in badrows.INJECTED_KIND_TO_REASON
BAD_ROW_KINDS = (
    "truncated_jpeg",  # JPEG bytes cut short: the header opens, decoding fails
    "undecodable",  # bytes that are no image at all
    "cmyk",  # CMYK JPEG (converted to RGB, not skipped)
    "palette",  # mode "P" PNG (converted)
    "grayscale",  # mode "L" JPEG (converted)
    "rgba",  # RGBA PNG with transparency (composited on white, converted)
    "tiny_image",  # 8x8 JPEG: skipped when data.min_image_size > 8
    "empty_caption",
    "tie",  # label 0.5 / 0.5
    "invalid_labels",  # label_0 + label_1 != 1 (1.0 / 1.0)
    "duplicate",  # exact copy of an earlier clean row
)
METADATA_KEY = b"t2ialign_injected_rows"
TINY_SIZE = 8
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
MODELS = ("sdxl-base-1.0", "sd-2.1", "dreamlike-photoreal-2.0")

Size = tuple  # (width, height), as PIL spells sizes


def draw_shape_image(size: Size, shape: str, colour: tuple, background: tuple) -> Image.Image:
    """An RGB image of one filled shape on a plain background."""
    width, height = size
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    box = (width * 0.2, height * 0.2, width * 0.8, height * 0.8)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(width * 0.5, height * 0.15), (width * 0.85, height * 0.85), (width * 0.15, height * 0.85)], fill=colour)
    return image


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _defective_bytes(kind: str, image: Image.Image) -> bytes:
    """Re-encode ``image`` with the defect ``kind`` (image-level kinds only)."""
    if kind == "truncated_jpeg":
        data = encode(image)
        return data[: max(200, len(data) // 3)]  # keeps the header, so only decoding fails
    if kind == "undecodable":
        return b"this is not an image" * 8
    if kind == "cmyk":
        return encode(image.convert("CMYK"))
    if kind == "grayscale":
        return encode(image.convert("L"))
    if kind == "palette":
        return encode(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")
    if kind == "rgba":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.new("L", image.size, 128))  # half transparent: compositing must matter
        return encode(rgba, "PNG")
    if kind == "tiny_image":
        return encode(image.resize((TINY_SIZE, TINY_SIZE)))
    raise ValueError(f"not an image defect: {kind}")


def _clean_row(i: int, rng: random.Random, size: Size, start: datetime, with_dual_captions: bool) -> dict:
    colour, other, background = rng.sample(sorted(COLOURS), 3)
    shape = rng.choice(SHAPES)
    caption = f"a {colour} {shape} on a {background} background"
    good = draw_shape_image(size, shape, COLOURS[colour], COLOURS[background])
    bad = draw_shape_image(size, shape, COLOURS[other], COLOURS[background])
    first_wins = rng.random() < 0.5
    images = (good, bad) if first_wins else (bad, good)
    image_captions = (caption, f"a {other} {shape} on a {background} background")
    if not first_wins:
        image_captions = image_captions[::-1]
    uids = (f"uid-{i}-0", f"uid-{i}-1")
    row = {
        "are_different": True,
        "best_image_uid": uids[0] if first_wins else uids[1],
        "caption": caption,
        "created_at": start + timedelta(minutes=i),
        "has_label": True,
        "image_0_uid": uids[0],
        "image_0_url": f"https://example.invalid/{uids[0]}.png",
        "image_1_uid": uids[1],
        "image_1_url": f"https://example.invalid/{uids[1]}.png",
        "jpg_0": encode(images[0]),
        "jpg_1": encode(images[1]),
        "label_0": 1.0 if first_wins else 0.0,
        "label_1": 0.0 if first_wins else 1.0,
        "model_0": rng.choice(MODELS),
        "model_1": rng.choice(MODELS),
        "ranking_id": 1000 + i,
        "user_id": rng.randrange(1, 50),
        "num_example_per_prompt": 1,
    }
    if with_dual_captions:
        row["caption_0"], row["caption_1"] = image_captions
    row["_images"] = images  # PIL originals, used to inject image defects; dropped before writing
    return row


def _inject(row: dict, kind: str, which: int, rows_so_far: list) -> dict:
    if kind == "duplicate":
        return dict(rows_so_far[0])
    if kind == "empty_caption":
        row["caption"] = ""
    elif kind == "tie":
        row["label_0"] = row["label_1"] = 0.5
        row["best_image_uid"] = ""
    elif kind == "invalid_labels":
        row["label_0"] = row["label_1"] = 1.0
    else:
        row[f"jpg_{which}"] = _defective_bytes(kind, row["_images"][which])
    return row


def _plan_injections(num_rows: int, ties: int, bad_rows: Optional[dict], rng: random.Random) -> dict:
    """row index -> defect kind. Row 0 stays clean (duplicates copy it)."""
    wanted = dict(bad_rows or {})
    unknown = set(wanted) - set(BAD_ROW_KINDS)
    if unknown:
        raise ValueError(f"unknown bad row kinds {sorted(unknown)}; allowed: {', '.join(BAD_ROW_KINDS)}")
    if ties:
        wanted["tie"] = wanted.get("tie", 0) + ties
    total = sum(wanted.values())
    if total > num_rows - 1:
        raise ValueError(f"{total} injected rows do not fit in {num_rows} rows (row 0 stays clean)")
    positions = rng.sample(range(1, num_rows), total)
    plan, cursor = {}, 0
    for kind in BAD_ROW_KINDS:
        for _ in range(wanted.get(kind, 0)):
            plan[positions[cursor]] = kind
            cursor += 1
    return plan


def _sizes(image_size: Union[Size, Sequence[Size]]) -> list:
    if len(image_size) == 2 and all(isinstance(v, int) for v in image_size):
        return [tuple(image_size)]
    return [tuple(s) for s in image_size]


def make_pickapic_rows(
    num_rows: int,
    *,
    image_size: Union[Size, Sequence[Size]] = (64, 64),
    seed: int = 0,
    with_dual_captions: bool = True,
    ties: int = 0,
    bad_rows: Optional[dict] = None,
    empty_image_captions: Sequence[int] = (),
) -> tuple[list, dict]:
    """Rows as dicts plus {kind: [row indices]} of what was injected (see write_pickapic_parquet)."""
    if empty_image_captions and not with_dual_captions:
        raise ValueError("empty_image_captions needs with_dual_captions=True (the caption_0 / caption_1 columns)")
    bad_captions = sorted(set(int(r) for r in empty_image_captions))
    if any(not 0 <= r < num_rows for r in bad_captions):
        raise ValueError(f"empty_image_captions: rows must be in [0, {num_rows}), got {bad_captions}")
    rng = random.Random(seed)
    sizes = _sizes(image_size)
    plan = _plan_injections(num_rows, ties, bad_rows, rng)
    start = datetime(2023, 5, 1, 12, 0, 0)
    rows, injected = [], {}
    for i in range(num_rows):
        row = _clean_row(i, rng, sizes[i % len(sizes)], start, with_dual_captions)
        kind = plan.get(i)
        if kind is not None:
            row = _inject(row, kind, which=i % 2, rows_so_far=rows)
            injected.setdefault(kind, []).append(i)
        if i in bad_captions:  # DCPO-only defect: "" on even rows, null on odd rows, in the caption of jpg_{i % 2}
            row[f"caption_{i % 2}"] = "" if i % 2 == 0 else None
            injected.setdefault("empty_image_caption", []).append(i)
        rows.append(row)
    return rows, injected


def write_pickapic_parquet(
    path: Union[str, Path],
    num_rows: int,
    *,
    image_size: Union[Size, Sequence[Size]] = (64, 64),
    seed: int = 0,
    with_dual_captions: bool = True,
    ties: int = 0,
    bad_rows: Optional[dict] = None,
    row_group_size: int = 64,
    empty_image_captions: Sequence[int] = (),
) -> Path:
    """Write a Pick-a-Pic v2-schema parquet file of ``num_rows`` pairs and return its path.

    ``image_size``: (width, height), or a list of sizes used in turn (row i uses sizes[i % len]);
    both images of a row share a size. ``ties`` rows get labels 0.5/0.5 (real data has them).
    ``bad_rows``: {kind: count} with kinds from ``BAD_ROW_KINDS``; image defects go into jpg_0 on
    even rows and jpg_1 on odd rows. Deterministic in ``seed``.
    ``with_dual_captions=False`` leaves out the per-image caption columns (``caption_0``/``caption_1``,
    what DCPO needs); ``empty_image_captions``: rows whose per-image caption is emptied (caption_0 = ""
    on even rows, caption_1 = null on odd rows), recorded as kind ``empty_image_caption`` (a bad row
    for DCPO only, so it is not among ``BAD_ROW_KINDS``).
    """
    rows, injected = make_pickapic_rows(
        num_rows, image_size=image_size, seed=seed, with_dual_captions=with_dual_captions, ties=ties, bad_rows=bad_rows,
        empty_image_captions=empty_image_captions,
    )
    for row in rows:
        row.pop("_images", None)
    table = pa.Table.from_pylist(rows, schema=pickapic_schema(with_dual_captions))
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(injected).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def pickapic_schema(with_dual_captions: bool = True) -> pa.Schema:
    fields = [
        ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()), ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()),
        ("model_0", pa.string()), ("model_1", pa.string()),
        ("ranking_id", pa.int64()), ("user_id", pa.int64()), ("num_example_per_prompt", pa.int64()),
    ]
    if with_dual_captions:
        fields += [("caption_0", pa.string()), ("caption_1", pa.string())]
    return pa.schema(fields)


def read_injected_rows(path: Union[str, Path]) -> dict:
    """{kind: [row indices]} recorded by write_pickapic_parquet (empty for other files)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def write_pickapic_tars(directory: Union[str, Path], rows: list, *, shard_size: int = 8, prefix: str = "") -> list:
    """Write Pick-a-Pic rows (``make_pickapic_rows``) as webdataset ``.tar`` shards in the layout of the
    ``sayakpaul/pickapic_v2_webdataset`` mirror (docs/DATA.md): ``<key>.original_prompt.txt``,
    ``<key>.jpg_0.jpg``, ``<key>.jpg_1.jpg``, ``<key>.label_0.txt``, ``<key>.label_1.txt``; the key restarts at 0
    in each shard, as there. Shards are named ``<prefix>00000.tar``, ... Returns their paths."""
    import io
    import tarfile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(rows), shard_size)):
        path = directory / f"{prefix}{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, row in enumerate(rows[start:start + shard_size]):
                members = {"original_prompt.txt": row["caption"].encode(), "jpg_0.jpg": row["jpg_0"],
                           "jpg_1.jpg": row["jpg_1"], "label_0.txt": str(row["label_0"]).encode(),
                           "label_1.txt": str(row["label_1"]).encode()}
                for field, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
