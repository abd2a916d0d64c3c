"""Image preprocessing of the preference scorers, exactly as their official code does it.

Two recipes (see docs/SCORERS.md):

* ``clip_preprocess`` - CLIP / PickScore / aesthetic / ImageReward: PIL bicubic resize of the SHORTEST
  side to 224 (the long side is ``int(224 * long / short)``, as transformers and torchvision compute it),
  center crop 224, ``/255``, OpenAI mean/std. The crop offset differs between transformers' processors
  (``(h - 224) // 2``, ``crop="floor"``; PickScore, CLIP score) and torchvision's ``CenterCrop``
  (``int(round((h - 224) / 2))``, ``crop="round"``; OpenAI ``clip.load`` used by the aesthetic
  predictor, ImageReward); the difference is one pixel for some aspect ratios.
* ``hps_preprocess`` - HPS v2 / v2.1 (``ResizeMaxSize`` of the HPSv2 open_clip fork): RGB -> ToTensor ->
  resize the TENSOR so the LONGEST side is 224 (bicubic, ``round(dim * scale)``), pad symmetrically with 0
  to 224x224, OpenAI mean/std. torchvision >= 0.17 anti-aliases tensor resizes by default; the HPSv2 code
  of 2023 ran on torchvision < 0.17 (no anti-aliasing). ``antialias`` is recorded in each scorer's
  ``describe()``; the default (True) is what the official code computes with a current torchvision.

Colour modes: every recipe converts with ``PIL.Image.convert("RGB")`` (grayscale is replicated; the
alpha channel of RGBA is DROPPED, as OpenAI CLIP, ImageReward, HPSv2 and transformers < 4.4x do).
transformers 5 composites RGBA onto white instead; for opaque images the two agree.

``clip_preprocess_device`` resizes on the accelerator (``torch.nn.functional.interpolate`` bicubic with
anti-aliasing, rounded to uint8 like PIL): not bit-identical to PIL (measured on 512/1024 px images:
max |delta| 0.015 after normalisation = about 1/255, mean 0.002); the exact CPU path is the default.
For scale: anti-aliasing on vs off in the HPS tensor resize changes pixels by up to 0.12 (mean 0.012).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil(image) -> Image.Image:
    """A PIL image from a PIL image, a uint8 array/tensor (HWC or CHW) or a float array/tensor in [0, 1].

    Float inputs outside [0, 1] are refused: feeding 0-255 floats (or [0,1] floats to code that divides
    by 255 again) is the commonest silent error in CLIP-score code.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            lo, hi = float(arr.min()), float(arr.max())
            if lo < -1e-6 or hi > 1.0 + 1e-6:
                raise ValueError(
                    f"float image with values in [{lo:.3g}, {hi:.3g}]; pass floats in [0, 1] or uint8 0-255"
                )
            arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _normalize(x: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 3, 1, 1) if x.ndim == 4 else torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(m.shape)
    return (x - m) / s


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_w, new_h) with the shortest side ``size``; long side ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_offsets(width: int, height: int, size: int, crop: str = "floor") -> tuple[int, int]:
    if crop == "floor":
        return (width - size) // 2, (height - size) // 2
    if crop == "round":
        return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    raise ValueError(f"crop must be 'floor' or 'round', got {crop!r}")


def clip_pil_resize_crop(image, size: int = 224, crop: str = "floor", convert_first: bool = True) -> Image.Image:
    """The PIL half of the CLIP recipe: RGB, bicubic shortest side -> size, center crop."""
    image = to_pil(image)
    if convert_first:
        image = to_rgb(image)
    w, h = image.size
    nw, nh = shortest_side_size(w, h, size)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = center_crop_offsets(nw, nh, size, crop)
    image = image.crop((left, top, left + size, top + size))
    return to_rgb(image)


def pil_to_float_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] (torchvision ``ToTensor``)."""
    arr = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def clip_preprocess(images: Sequence, size: int = 224, crop: str = "floor", convert_first: bool = True) -> torch.Tensor:
    """(N, 3, size, size) float32 pixel values of the CLIP recipe (exact, CPU/PIL)."""
    batch = [pil_to_float_tensor(clip_pil_resize_crop(im, size, crop, convert_first)) for im in images]
    return _normalize(torch.stack(batch))


def _uint8_tensor(image, device) -> torch.Tensor:
    arr = np.asarray(to_rgb(to_pil(image)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device, non_blocking=True)


def clip_preprocess_device(images: Sequence, size: int = 224, crop: str = "floor", device="cpu") -> torch.Tensor:
    """The CLIP recipe with the resize done by torch on ``device`` (approximate, see module docstring)."""
    out = []
    for im in images:
        x = _uint8_tensor(im, device).float().unsqueeze(0)
        h, w = x.shape[-2:]
        nw, nh = shortest_side_size(w, h, size)
        if (nw, nh) != (w, h):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        left, top = center_crop_offsets(nw, nh, size, crop)
        x = x[..., top : top + size, left : left + size].clamp_(0, 255).round_()
        out.append(x[0] / 255.0)
    return _normalize(torch.stack(out))


def hps_resize_pad(x: torch.Tensor, size: int = 224, antialias: bool = True, fill: float = 0.0) -> torch.Tensor:
    """``ResizeMaxSize`` of the HPSv2 open_clip fork on a (3, H, W) float tensor in [0, 1].

    The official code skips resize and pad when the longest side already equals ``size``; a non-square
    image of that size would then come out non-square (and fail in the ViT), so such an image is padded.
    """
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = F.interpolate(x.unsqueeze(0), size=(nh, nw), mode="bicubic", antialias=antialias, align_corners=False)[0]
    else:
        nh, nw = h, w
    if (nh, nw) != (size, size):
        pad_h, pad_w = size - nh, size - nw
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return x


def hps_preprocess(images: Sequence, size: int = 224, antialias: bool = True, device="cpu") -> torch.Tensor:
    """(N, 3, size, size) pixel values of the HPS v2 recipe (the resize is a tensor op on ``device``)."""
    out = [hps_resize_pad(_uint8_tensor(im, device).float().div_(255.0), size, antialias) for im in images]
    return _normalize(torch.stack(out))
