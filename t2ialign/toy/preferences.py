"""Programmatic "human" preferences over toy-world images, and noisy labels that look like real ones.

A preference is a reward ``reward(images, captions) -> (N,)`` for images ``(N, 3, H, W)`` in [0, 1]:
higher is preferred. Each declares ``scale``, the typical spread of its reward between two samples of
one prompt from the base toy model; label noise and tie margins are given in units of that scale, so
``--label-noise 1`` means the same amount of disagreement whichever preference is chosen.

Labels follow Pick-a-Pic: ``label_0 = 1`` when image 0 is preferred, ``0`` when image 1 is, ``0.5``
for a tie. With ``temperature > 0`` a labeller prefers image 0 with Bradley-Terry probability
``sigmoid((r0 - r1) / (temperature * scale))``, so close calls are coin flips and clear ones are not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from t2ialign.errors import UserFacingError
from t2ialign.toy import world

RewardFn = Callable[[Tensor, Sequence[str]], Tensor]
DEFAULT_PREFERENCE = "vividness"


@dataclass(frozen=True)
class Preference:
    name: str
    description: str
    reward: RewardFn
    scale: float  # typical |r0 - r1| between two base samples of one prompt: the unit of noise / ties

    def __call__(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        return self.reward(images, captions).float()


def vividness(images: Tensor, captions: Sequence[str]) -> Tensor:
    """How saturated the shape's colour is (max - min channel of its core colour), in [0, 1]."""
    return world.measure(images).chroma


def brightness(images: Tensor, captions: Sequence[str]) -> Tensor:
    """Mean luminance (Rec. 601) of the whole image, in [0, 1]."""
    r, g, b = images.float().clamp(0, 1).unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).flatten(1).mean(-1)


def fidelity(images: Tensor, captions: Sequence[str]) -> Tensor:
    """Share of the caption's colour, shape, size and position that the captioner finds (0, .25, ... 1).

    Coarse on purpose, like a person ticking boxes: equal scores make natural ties.
    """
    return world.attribute_agreement(images, captions)


def centring(images: Tensor, captions: Sequence[str]) -> Tensor:
    """1 for a shape in the exact centre, falling linearly to 0 at a corner (ignores the caption)."""
    m = world.measure(images)
    half = world.RESOLUTION / 2
    distance = torch.sqrt((m.centre_x - half) ** 2 + (m.centre_y - half) ** 2)
    return (1 - distance / (half * 2**0.5)).clamp(0, 1) * (m.area > 0)


def size(images: Tensor, captions: Sequence[str]) -> Tensor:
    """Share of the image the shape covers, in [0, 1]: bigger is better."""
    return world.measure(images).area


PREFERENCES = {
    p.name: p
    for p in (
        Preference("vividness", "a vivid, saturated shape colour beats a washed-out one (the default: a strong, "
                   "smooth signal the base model varies on)", vividness, scale=0.2),
        Preference("brightness", "a brighter image (mostly the background shade) beats a darker one", brightness, scale=0.08),
        Preference("fidelity", "the image that shows more of the caption's colour/shape/size/position wins; "
                   "equal scores are ties", fidelity, scale=0.25),
        Preference("centring", "a shape nearer the image centre beats one further out, whatever the caption says",
                   centring, scale=0.05),
        Preference("size", "a bigger shape beats a smaller one", size, scale=0.03),
    )
}


def preference_names() -> list[str]:
    return list(PREFERENCES)


def get_preference(name: str) -> Preference:
    """The named preference; an unknown name is a one-line error listing the known ones."""
    try:
        return PREFERENCES[name]
    except KeyError:
        raise UserFacingError(
            f"unknown toy preference '{name}'; choose one of: {', '.join(PREFERENCES)}"
        ) from None


def sample_labels(
    rewards_0: Tensor,
    rewards_1: Tensor,
    *,
    temperature: float = 0.0,
    tie_margin: float = 0.0,
    scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``label_0`` per pair (``label_1 = 1 - label_0``): 1, 0, or 0.5 for a tie.

    A pair is a tie when ``|r0 - r1| <= tie_margin * scale`` (exactly equal rewards always tie).
    Otherwise ``temperature == 0`` labels by the larger reward, and ``temperature > 0`` samples
    image 0 with probability ``sigmoid((r0 - r1) / (temperature * scale))`` (Bradley-Terry).
    """
    if temperature < 0 or tie_margin < 0:
        raise ValueError(f"temperature and tie_margin must be >= 0, got {temperature} and {tie_margin}")
    difference = rewards_0.float() - rewards_1.float()
    if temperature == 0:
        first_wins = difference > 0
    else:
        probability = torch.sigmoid(difference / (temperature * scale))
        first_wins = torch.rand(difference.shape, generator=generator) < probability
    labels = first_wins.float()
    tie = difference.abs() <= tie_margin * scale
    return torch.where(tie, torch.full_like(labels, 0.5), labels)


def label_pairs(
    preference: Preference,
    images_0: Tensor,
    images_1: Tensor,
    captions: Sequence[str],
    *,
    temperature: float = 0.0,
    tie_margin: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rewards of both images and ``label_0`` for each pair, as a labeller with this preference would."""
    rewards_0, rewards_1 = preference(images_0, captions), preference(images_1, captions)
    labels = sample_labels(
        rewards_0, rewards_1, temperature=temperature, tie_margin=tie_margin, scale=preference.scale, generator=generator
    )
    return rewards_0, rewards_1, labels
