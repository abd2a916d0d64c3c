"""Bad rows: what counts as one, how images are decoded safely, and the report that counts them.

Policy (docs/DATA.md, "Bad rows", lists the defects real Pick-a-Pic data has):

=====================  ===========================================  =========================
defect                 when it is found                             default (strict: DataError)
=====================  ===========================================  =========================
empty caption          metadata pre-pass (``scan_rows``)            skipped, counted
empty per-image        metadata pre-pass, only when the objective   skipped, counted
caption (DCPO)         needs per-image captions (DCPO)
tie (0.5 / 0.5)        load filter (data.drop_ties) or pre-pass     dropped / skipped
labels not summing 1   metadata pre-pass                            skipped, counted
duplicate pair         load filter (data.drop_duplicates)           dropped, counted
truncated/undecodable  lazily, when the row is first read           skipped, replaced
tiny image             lazily (shortest side < data.min_image_size  skipped, replaced
                       or < MIN_IMAGE_SIDE = 8 px, always)
CMYK/palette/RGBA/L    lazily                                       converted to RGB, counted
caption > 77 tokens    (the text encoders truncate at 77 tokens)    kept
=====================  ===========================================  =========================

Strict mode (data.strict) turns every skip into a ``DataError`` naming the row and the problem;
mode conversions are still allowed there (they are expected, and counted), and so are config
filters (they are requested).
"""
from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

# reasons a row is skipped
EMPTY_CAPTION = "empty_caption"
EMPTY_IMAGE_CAPTION = "empty_image_caption"  # caption_0 / caption_1 empty or null, when DCPO needs them
TIE = "tie"
INVALID_LABELS = "invalid_labels"
DUPLICATE = "duplicate"
UNDECODABLE = "undecodable_image"
TINY = "tiny_image"
MISSING_IMAGE = "missing_image"
SKIP_REASONS = (EMPTY_CAPTION, EMPTY_IMAGE_CAPTION, TIE, INVALID_LABELS, DUPLICATE, UNDECODABLE, TINY, MISSING_IMAGE)
CONVERTED_PREFIX = "converted_"  # "converted_CMYK", "converted_P", ...: decoded fine after a mode change

# synthetic.BAD_ROW_KINDS -> the reason the loader reports for it
INJECTED_KIND_TO_REASON = {
    "truncated_jpeg": UNDECODABLE, "undecodable": UNDECODABLE, "tiny_image": TINY,
    "empty_caption": EMPTY_CAPTION, "empty_image_caption": EMPTY_IMAGE_CAPTION, "tie": TIE, "invalid_labels": INVALID_LABELS, "duplicate": DUPLICATE,
    "cmyk": "converted_CMYK", "palette": "converted_P", "grayscale": "converted_L", "rgba": "converted_RGBA",
}
EXAMPLES_PER_REASON = 5
# Below this many pixels per side an image is a bad row whatever data.min_image_size says: it is smaller than one
# latent pixel of every supported VAE (downsampling factor 8), so resizing it to the training resolution yields a
# flat smear, not a picture (Pick-a-Pic's broken thumbnails are 1x1 or a few pixels).
MIN_IMAGE_SIDE = 8


class BadRow(Exception):
    """One row that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class BadRowReport:
    """Counts of skipped, converted and filtered rows, with the first few row indices of each.

    ``record`` is idempotent per (row, reason), so events reported by several DataLoader workers,
    or by the same row in several epochs, are counted once.
    """

    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)  # rows removed by config filters at load time
    examples: dict = field(default_factory=dict)  # reason -> first row indices
    rows_read: set = field(default_factory=set, repr=False)  # rows whose images were decoded (or found bad)
    _seen: set = field(default_factory=set, repr=False)

    def record(self, row: int, reason: str) -> bool:
        """Count one event; False if this (row, reason) was already counted."""
        if (row, reason) in self._seen:
            return False
        self._seen.add((row, reason))
        counter = self.converted if reason.startswith(CONVERTED_PREFIX) else self.skipped
        counter[reason] += 1
        first = self.examples.setdefault(reason, [])
        if len(first) < EXAMPLES_PER_REASON:
            first.append(row)
        return True

    def record_read(self, rows) -> None:
        """Rows whose images were read: the rows the image checks cover (see ``coverage_summary``)."""
        self.rows_read.update(int(row) for row in rows)

    def record_filtered(self, reason: str, count: int) -> None:
        if count:
            self.filtered[reason] += count

    def record_events(self, events) -> None:
        """Merge (row, reason) pairs such as ``batch["bad_rows"]`` from collate_pairs."""
        for row, reason in events:
            self.record(int(row), reason)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_converted(self) -> int:
        return sum(self.converted.values())

    def summary(self) -> str:
        parts = []
        for title, counter in (("filtered", self.filtered), ("skipped", self.skipped), ("converted", self.converted)):
            if counter:
                items = ", ".join(f"{reason}={n}{self._example_text(reason)}" for reason, n in sorted(counter.items()))
                parts.append(f"{title} {sum(counter.values())} ({items})")
        return "; ".join(parts) if parts else "no bad rows"

    def coverage_summary(self, rows_total: Optional[int] = None) -> str:
        """``summary`` with the rows it covers: "bad rows: 3 of 1,024 rows read (...)". Image defects are only
        known for rows read, so when fewer than ``rows_total`` were read (a short run, a partial cache) it says so."""
        read = len(self.rows_read)
        head = f"bad rows: {self.num_skipped:,} of {read:,} rows read"
        if rows_total is not None and read < rows_total:
            head += f" (of {rows_total:,}; captions and labels of all were checked, images only of the rows read)"
        details = self.summary()
        return head if details == "no bad rows" else f"{head}: {details}"

    def _example_text(self, reason: str) -> str:
        rows = self.examples.get(reason)
        return f" rows {rows}" if rows else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "skipped": dict(self.skipped), "converted": dict(self.converted),
            "filtered": dict(self.filtered), "examples": {k: list(v) for k, v in self.examples.items()},
        }


def metadata_problem(caption: Optional[str], label_0: Any, label_1: Any,
                     image_captions: Optional[tuple] = None) -> Optional[BadRow]:
    """The problem with a row's caption/labels, or None. Cheap: no image is touched.

    ``image_captions``: the row's (caption_0, caption_1) when the objective needs per-image captions (DCPO);
    an empty or null one is then a bad row instead of falling back to the pair's prompt."""
    if caption is None or not str(caption).strip():
        return BadRow(EMPTY_CAPTION, "the caption is empty")
    for i, own in enumerate(image_captions or ()):
        if own is None or not str(own).strip():
            return BadRow(
                EMPTY_IMAGE_CAPTION,
                f"caption_{i} (the caption of image {i}, data.image_caption_columns[{i}]) is empty; DCPO conditions "
                "each image on its own caption, so the row is not trained on the pair's prompt instead",
            )
    try:
        l0, l1 = float(label_0), float(label_1)
    except (TypeError, ValueError):
        return BadRow(INVALID_LABELS, f"labels are not numbers ({label_0!r}, {label_1!r})")
    if not (math.isfinite(l0) and math.isfinite(l1)) or abs(l0 + l1 - 1.0) > 1e-6 or min(l0, l1) < 0:
        return BadRow(INVALID_LABELS, f"label_0 + label_1 must be 1, got {l0} + {l1}")
    if l0 == l1:
        return BadRow(TIE, "labels 0.5 / 0.5 name no winner (set data.drop_ties=true to drop ties at load)")
    return None


def winner_is_first(label_0: Any) -> bool:
    """label_0 == 1 means jpg_0 was preferred (labels were validated by metadata_problem)."""
    return float(label_0) > 0.5


def _raw_bytes(value: Any) -> Optional[bytes]:
    """Image column value -> encoded bytes. Accepts bytes, {"bytes", "path"} (datasets Image with
    decode=False) or None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            with open(value["path"], "rb") as handle:
                return handle.read()
        return None
    raise BadRow(UNDECODABLE, f"unsupported image value of type {type(value).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white (not dropped to black)."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, min_size: int = 0) -> tuple[Image.Image, Optional[str]]:
    """Decode one image column value to RGB.

    Returns (image, original mode if it was converted else None). Raises BadRow for missing,
    undecodable (including truncated) or too small images. PIL's ``LOAD_TRUNCATED_IMAGES`` must be
    left False (its default) for truncation to be detected.
    """
    raw = _raw_bytes(value) if not isinstance(value, Image.Image) else None
    if raw is None and not isinstance(value, Image.Image):
        raise BadRow(MISSING_IMAGE, "the image is missing (null)")
    try:
        image = value if raw is None else Image.open(io.BytesIO(raw))
        image.load()  # decoding happens here; truncated data raises OSError
        image = ImageOps.exif_transpose(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise BadRow(UNDECODABLE, f"cannot decode the image ({type(exc).__name__}: {exc})") from None
    if min(image.size) < max(min_size, MIN_IMAGE_SIDE):
        limit = f"data.min_image_size={min_size}" if min_size > MIN_IMAGE_SIDE else f"the {MIN_IMAGE_SIDE} px floor"
        raise BadRow(TINY, f"image is {image.width}x{image.height}, below {limit}")
    original_mode = image.mode
    image = to_rgb(image)
    return image, (original_mode if original_mode != "RGB" else None)
