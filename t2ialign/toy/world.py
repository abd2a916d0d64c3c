"""The toy text-to-image world: procedurally drawn shapes, their captions, and a captioner.

Every image holds one shape (circle, square or triangle) of one of six hues, small or large, at one of
nine grid positions, on a plain grey background. The caption names those four attributes; the rest
of the variation is left uncaptioned on purpose (how vivid the shape's colour is, the background
shade, a little jitter in size and position), so a model trained on the world produces varied samples
for one prompt and preference functions have something to choose between.

Images are float tensors ``(N, 3, H, W)`` in ``[0, 1]``. ``describe`` is the world's "captioner": it
measures the dominant shape of any image (a generated one too) and writes it with the same template,
which gives DCPO its per-image captions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

# bump when rendering or captions change: it is part of the cache key of the pretrained toy model
WORLD_VERSION = 1
RESOLUTION = 32

# six evenly spaced hues (degrees); the captioner names a colour by its nearest hue
HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "purple": 300.0}
COLOURS = list(HUES)
SHAPES = ["circle", "square", "triangle"]
SIZES = ["small", "large"]
# half-extent in pixels at 32x32; the gap between the ranges keeps "small" and "large" separable
SIZE_RANGES = {"small": (3.5, 5.0), "large": (7.0, 8.5)}
ROWS = ["top", "middle", "bottom"]
COLUMNS = ["left", "centre", "right"]
POSITIONS = [
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
]
GRID_CENTRES = (9.0, 16.0, 23.0)  # pixel centre of each grid row/column at 32x32
POSITION_JITTER = 1.5
VIVIDNESS_RANGE = (0.25, 1.0)  # share of the pure hue mixed into a light grey
WASHOUT_GREY = 0.6
BACKGROUND_RANGE = (0.0, 0.3)
SUPERSAMPLE = 4  # anti-aliasing: render at 4x and average down
FOREGROUND_THRESHOLD = 0.15  # max channel distance from the background that counts as shape

CAPTION_TEMPLATE = "a {size} {colour} {shape} at the {position}"
BLANK_CAPTION = "a blank grey image"
_CAPTION_RE = re.compile(
    r"an? (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) at the (?P<position>[\w ]+?)\s*$"
)


@dataclass
class Attributes:
    """What one image shows. The first four are captioned; the rest are nuisance variation."""

    colour: str
    shape: str
    size: str
    position: str
    radius: float = 8.0  # half-extent in pixels at 32x32
    centre_x: float = 16.0
    centre_y: float = 16.0
    vividness: float = 1.0
    background: float = 0.15


def caption_of(colour: str, shape: str, size: str, position: str) -> str:
    return CAPTION_TEMPLATE.format(colour=colour, shape=shape, size=size, position=position)


def caption(attrs: Attributes) -> str:
    return caption_of(attrs.colour, attrs.shape, attrs.size, attrs.position)


def parse_caption(text: str) -> Optional[dict]:
    """``{"colour", "shape", "size", "position"}`` of a template caption, or None if it is not one."""
    match = _CAPTION_RE.match(text.strip().lower())
    if not match:
        return None
    parsed = match.groupdict()
    valid = (
        parsed["size"] in SIZES and parsed["colour"] in COLOURS
        and parsed["shape"] in SHAPES and parsed["position"] in POSITIONS
    )
    return parsed if valid else None


def all_captions() -> list[str]:
    """Every caption the world can produce (6 colours x 3 shapes x 2 sizes x 9 positions = 324)."""
    return [caption_of(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, options: Sequence[str]) -> str:
    return options[int(torch.randint(len(options), (), generator=generator))]


def attributes_for(generator: torch.Generator, colour: str, shape: str, size: str, position: str) -> Attributes:
    """Captioned attributes as given, nuisance variation drawn from ``generator``."""
    row, column = divmod(POSITIONS.index(position), 3)
    return Attributes(
        colour=colour, shape=shape, size=size, position=position,
        radius=_uniform(generator, *SIZE_RANGES[size]),
        centre_x=GRID_CENTRES[column] + _uniform(generator, -POSITION_JITTER, POSITION_JITTER),
        centre_y=GRID_CENTRES[row] + _uniform(generator, -POSITION_JITTER, POSITION_JITTER),
        vividness=_uniform(generator, *VIVIDNESS_RANGE),
        background=_uniform(generator, *BACKGROUND_RANGE),
    )


def sample_attributes(num: int, generator: Optional[torch.Generator] = None, seed: int = 0) -> list[Attributes]:
    """``num`` random scenes; deterministic for a seed (or for the state of ``generator``)."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    scenes = []
    for _ in range(num):
        chosen = [_choice(generator, options) for options in (COLOURS, SHAPES, SIZES, POSITIONS)]
        scenes.append(attributes_for(generator, *chosen))
    return scenes


def sample_captions(num: int, seed: int = 0) -> list[str]:
    return [caption(a) for a in sample_attributes(num, seed=seed)]


def hue_to_rgb(hue_degrees: float) -> Tensor:
    """Fully saturated RGB (max channel 0.95) for a hue, the HSV way."""
    h = (hue_degrees % 360.0) / 60.0
    x = 1.0 - abs(h % 2.0 - 1.0)
    sector = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h) % 6]
    return torch.tensor(sector, dtype=torch.float32) * 0.95


def shape_colour(colour: str, vividness: float) -> Tensor:
    """The pure hue mixed into a light grey: vividness 1 is the pure colour, 0 is the grey."""
    return vividness * hue_to_rgb(HUES[colour]) + (1.0 - vividness) * WASHOUT_GREY


def _scene_tensor(scenes: Sequence[Attributes], name: str) -> Tensor:
    return torch.tensor([getattr(a, name) for a in scenes], dtype=torch.float32)[:, None, None]


def _coverage(scenes: Sequence[Attributes], resolution: int) -> Tensor:
    """Fraction of each pixel each shape covers, ``(N, H, W)``, by supersampling (vectorised)."""
    fine = resolution * SUPERSAMPLE
    scale = resolution / RESOLUTION  # attributes are in 32x32 pixel units
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    y, x = coords[None, :, None], coords[None, None, :]
    cx, cy, r = (_scene_tensor(scenes, n) * scale for n in ("centre_x", "centre_y", "radius"))
    dx, dy = (x - cx).abs(), y - cy
    depth = (dy + r) / (2 * r)  # 0 at the triangle's apex, 1 at its base
    inside_by_shape = {
        "circle": dx**2 + dy**2 <= r**2,
        "square": (dx <= r) & (dy.abs() <= r),
        "triangle": (depth >= 0) & (depth <= 1) & (dx <= r * depth),
    }
    unknown = {a.shape for a in scenes} - set(SHAPES)
    if unknown:
        raise ValueError(f"unknown shape(s) {sorted(unknown)}; expected one of {SHAPES}")
    inside = torch.zeros(len(scenes), fine, fine, dtype=torch.bool)
    for shape, region in inside_by_shape.items():
        chosen = torch.tensor([a.shape == shape for a in scenes])[:, None, None]
        inside |= chosen & region
    return torch.nn.functional.avg_pool2d(inside.float()[:, None], SUPERSAMPLE)[:, 0]


def render_batch(scenes: Sequence[Attributes], resolution: int = RESOLUTION) -> Tensor:
    """Images ``(N, 3, H, W)`` in ``[0, 1]``."""
    coverage = _coverage(scenes, resolution)[:, None]
    background = _scene_tensor(scenes, "background")[:, None].expand(-1, 3, 1, 1)
    foreground = torch.stack([shape_colour(a.colour, a.vividness) for a in scenes])[:, :, None, None]
    return coverage * foreground + (1.0 - coverage) * background


def render(attrs: Attributes, resolution: int = RESOLUTION) -> Tensor:
    """One image ``(3, H, W)`` in ``[0, 1]``."""
    return render_batch([attrs], resolution)[0]


def sample_images(num: int, seed: int = 0, resolution: int = RESOLUTION) -> tuple[Tensor, list[str]]:
    """``num`` random world images and their captions."""
    scenes = sample_attributes(num, seed=seed)
    return render_batch(scenes, resolution), [caption(a) for a in scenes]


# ---------------------------------------------------------------------------------------------
# Measuring images: shared by the captioner and the preference functions


@dataclass
class Measurements:
    """Per-image measurements of the dominant shape, each a tensor of shape ``(N,)`` unless noted."""

    background: Tensor  # (N, 3) median border colour
    coverage: Tensor  # (N, H, W) in [0, 1]: how much of each pixel is shape (soft, sub-pixel)
    area: Tensor  # fraction of the image that is shape
    shape_colour: Tensor  # (N, 3) colour of the shape's core pixels
    chroma: Tensor  # max - min channel of shape_colour: how vivid the shape is
    hue: Tensor  # degrees, of shape_colour
    centre_x: Tensor  # in 32x32 pixel units
    centre_y: Tensor
    half_extent: Tensor  # half of the larger of widest row / tallest column, 32x32 pixel units
    fill: Tensor  # area / (widest row x tallest column): 1 square, ~0.79 circle, ~0.5 triangle


def _border_median(images: Tensor) -> Tensor:
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )
    return border.median(dim=-1).values  # (N, 3)


def _hue_degrees(rgb: Tensor) -> Tensor:
    r, g, b = rgb.unbind(-1)
    top, bottom = rgb.max(-1).values, rgb.min(-1).values
    delta = (top - bottom).clamp_min(1e-6)
    hue = torch.where(
        top == r, ((g - b) / delta) % 6.0, torch.where(top == g, (b - r) / delta + 2.0, (r - g) / delta + 4.0)
    )
    return hue * 60.0


def _core_colour(images: Tensor, background: Tensor) -> Tensor:
    """Mean colour of the pixels most unlike the background: the shape without its blended edge."""
    distance = (images - background[:, :, None, None]).abs().amax(dim=1)
    peak = distance.flatten(1).amax(-1)
    core = (distance > 0.5 * peak[:, None, None]) & (peak[:, None, None] > FOREGROUND_THRESHOLD)
    count = core.flatten(1).sum(-1).float()
    colour = (images * core[:, None]).flatten(2).sum(-1) / count.clamp_min(1.0)[:, None]
    return torch.where(count[:, None] > 0, colour, background)


def _soft_coverage(images: Tensor, background: Tensor, colour: Tensor) -> Tensor:
    """Each pixel as a blend of background and shape colour: the blend weight, clamped to [0, 1]."""
    direction = colour - background  # (N, 3)
    length_sq = direction.pow(2).sum(-1).clamp_min(1e-6)
    offset = images - background[:, :, None, None]
    weight = (offset * direction[:, :, None, None]).sum(1) / length_sq[:, None, None]
    visible = direction.abs().amax(-1) > FOREGROUND_THRESHOLD  # no shape: nothing covered
    return weight.clamp(0, 1) * visible[:, None, None]


@torch.no_grad()
def measure(images: Tensor) -> Measurements:
    """Find the shape in each image ``(N, 3, H, W)`` and measure it (vectorised, any resolution).

    Extents come from coverage sums (widest row, tallest column), which are sub-pixel accurate for
    anti-aliased shapes where a thresholded bounding box is off by a pixel on small shapes.
    """
    images = images.float().clamp(0, 1)
    size = images.shape[-1]
    background = _border_median(images)
    colour = _core_colour(images, background)
    coverage = _soft_coverage(images, background, colour)
    total = coverage.flatten(1).sum(-1)
    index = torch.arange(size, dtype=torch.float32) + 0.5
    centre_x = (coverage.sum(-2) * index).sum(-1) / total.clamp_min(1e-6)
    # every shape spans its full height in the column through its centre (the triangle's apex too)
    column = centre_x.long().clamp(0, size - 1)
    through_centre = coverage[torch.arange(len(images)), :, column]  # (N, H)
    centre_y = (through_centre * index).sum(-1) / through_centre.sum(-1).clamp_min(1e-6)
    width, height = coverage.sum(-1).amax(-1), coverage.sum(-2).amax(-1)
    to_32 = RESOLUTION / size
    return Measurements(
        background=background,
        coverage=coverage,
        area=total / (size * size),
        shape_colour=colour,
        chroma=colour.amax(-1) - colour.amin(-1),
        hue=_hue_degrees(colour),
        centre_x=centre_x * to_32,
        centre_y=centre_y * to_32,
        half_extent=torch.maximum(width, height) / 2 * to_32,
        fill=total / (width * height).clamp_min(1e-6),
    )


def _nearest_colour(hue: float) -> str:
    distance = {name: abs((hue - h + 180.0) % 360.0 - 180.0) for name, h in HUES.items()}
    return min(distance, key=distance.get)


def _grid_index(coordinate: float) -> int:
    edges = [(GRID_CENTRES[0] + GRID_CENTRES[1]) / 2, (GRID_CENTRES[1] + GRID_CENTRES[2]) / 2]
    return sum(coordinate >= e for e in edges)


def _classify_shape(fill: float) -> str:
    # squares fill their extent, circles ~pi/4, triangles ~1/2 (measured 0.99+, 0.76-0.84, 0.53-0.69)
    if fill > 0.9:
        return "square"
    return "circle" if fill > 0.72 else "triangle"


def detect_attributes(images: Tensor) -> list[Optional[dict]]:
    """Captioned attributes of each image as the captioner sees them (None where no shape is found)."""
    m = measure(images)
    small_large_edge = (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2  # 6 px
    found = []
    for i in range(images.shape[0]):
        if m.area[i] * RESOLUTION * RESOLUTION < 4.0:  # under ~4 pixels at 32x32: nothing there
            found.append(None)
            continue
        row, column = _grid_index(float(m.centre_y[i])), _grid_index(float(m.centre_x[i]))
        found.append({
            "colour": _nearest_colour(float(m.hue[i])),
            "shape": _classify_shape(float(m.fill[i])),
            "size": "small" if float(m.half_extent[i]) < small_large_edge else "large",
            "position": POSITIONS[3 * row + column],
        })
    return found


def describe(images: Tensor) -> list[str]:
    """The world's captioner: a template caption of what each image actually shows."""
    return [caption_of(**a) if a else BLANK_CAPTION for a in detect_attributes(images)]


def attribute_agreement(images: Tensor, captions: Sequence[str]) -> Tensor:
    """Per image, the share of the caption's four attributes the image shows: ``(N,)`` in [0, 1]."""
    detected = detect_attributes(images)
    scores = []
    for seen, text in zip(detected, captions):
        wanted = parse_caption(text)
        if seen is None or wanted is None:
            scores.append(0.0)
            continue
        scores.append(sum(seen[k] == wanted[k] for k in wanted) / len(wanted))
    return torch.tensor(scores)


def colour_distance_degrees(hue: Tensor, colours: Sequence[str]) -> Tensor:
    """Angular distance between measured hues and named colours, degrees in [0, 180]."""
    wanted = torch.tensor([HUES[c] for c in colours])
    return ((hue - wanted + 180.0) % 360.0 - 180.0).abs()
