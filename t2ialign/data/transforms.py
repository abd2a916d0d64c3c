"""Pair transforms: resize, crop, flip, normalise, and the SDXL micro-conditioning they imply.

Order and conventions (diffusers ``train_text_to_image_sdxl.py`` after PR #6547):
  1. ``original_size = (h, w)`` of the decoded image, before anything else;
  2. resize the shortest side to ``resolution`` (``transforms.Resize(resolution, BILINEAR)``, as the
     Diffusion-DPO scripts do);
  3. flip horizontally (optional, p = 0.5) BEFORE cropping, so the crop offset is measured in the
     image the model actually sees; (the earlier diffusers code flipped after cropping and set
     ``left = cropped_width - left``, which PR #6547 fixed);
  4. crop ``resolution x resolution``: centre (``top = round((h - R) / 2)``, as ``CenterCrop``) or
     random; ``crop_top_left = (top, left)`` in the resized (and flipped) image;
  5. to tensor, normalise to [-1, 1].
SDXL ``time_ids`` are then ``[orig_h, orig_w, top, left, R, R]`` (docs/ALGORITHMS.md section 0.5).

Both images of a pair share ONE flip decision, and ONE crop offset when their resized sizes are
equal (the Diffusion-DPO SDXL behaviour); images of different sizes get their own random offset.

Randomness is a pure function of (seed, epoch, index): a resumed run, or a DataLoader worker,
sees the same augmentation for the same row in the same epoch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF


@dataclass
class TransformedPair:
    pixel_values: torch.Tensor  # (2, 3, R, R) in [-1, 1], in the order the images were given
    original_sizes: torch.Tensor  # (2, 2) long: (height, width) before resizing
    crop_top_left: torch.Tensor  # (2, 2) long: (top, left) of the crop in the resized, flipped image
    flipped: bool


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one (seed, epoch, row) triple."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PairTransform:
    """Transforms the two images of a preference pair together (see the module docstring)."""

    def __init__(self, resolution: int, random_crop: bool = False, random_flip: bool = True, seed: int = 0):
        self.resolution = int(resolution)
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.resize = transforms.Resize(self.resolution, interpolation=transforms.InterpolationMode.BILINEAR)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def set_epoch(self, epoch: int) -> None:
        """Use a fresh augmentation draw per epoch (call it in each DataLoader worker's copy too,
        or pass the epoch to ``__call__``)."""
        self.epoch = int(epoch)

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        epoch = self.epoch if epoch is None else epoch
        return torch.Generator().manual_seed(augmentation_seed(self.seed, epoch, index))

    def __call__(self, first: Image.Image, second: Image.Image, index: int, epoch: int | None = None) -> TransformedPair:
        generator = self.generator(index, epoch)
        flipped = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        originals = [(image.height, image.width) for image in (first, second)]
        resized = [self.resize(image) for image in (first, second)]
        if flipped:
            resized = [TF.hflip(image) for image in resized]
        offsets = self._crop_offsets(resized, generator)
        pixels = [
            self.to_tensor(TF.crop(image, top, left, self.resolution, self.resolution))
            for image, (top, left) in zip(resized, offsets)
        ]
        return TransformedPair(
            pixel_values=torch.stack(pixels),
            original_sizes=torch.tensor(originals, dtype=torch.long),
            crop_top_left=torch.tensor(offsets, dtype=torch.long),
            flipped=flipped,
        )

    def _crop_offsets(self, images: list, generator: torch.Generator) -> list:
        first = self._crop_offset(images[0], generator)
        if images[1].size == images[0].size:
            return [first, first]  # same size: same crop window for both images
        return [first, self._crop_offset(images[1], generator)]

    def _crop_offset(self, image: Image.Image, generator: torch.Generator) -> tuple:
        spare_h = image.height - self.resolution
        spare_w = image.width - self.resolution
        if not self.random_crop:
            return (int(round(spare_h / 2.0)), int(round(spare_w / 2.0)))
        top = int(torch.randint(0, spare_h + 1, (), generator=generator))
        left = int(torch.randint(0, spare_w + 1, (), generator=generator))
        return (top, left)
