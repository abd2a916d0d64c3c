"""The offline toy world: see the whole alignment method work on a laptop CPU, and test it end to end.

- ``world``: 32x32 images of one coloured shape, template captions, and a captioner for any image.
- ``preferences``: programmatic "human" labellers (``get_preference(name)``), Bradley-Terry label noise, ties.
- ``pretrain``: a tiny SDXL-structured pipeline trained on the world in minutes and cached
  (``get_toy_pipeline()`` returns its directory).
- ``shipped``: that base for the default settings, shipped as fp16 weights and written out in seconds.
- ``pairs``: two base samples per prompt, labelled, written in the Pick-a-Pic v2 schema
  (``build_preference_pairs(out_dir, ...)``).

Submodules load lazily, so ``import t2ialign.toy`` does not import diffusers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "sample_images": "world",
    "describe": "world",
    "detect_attributes": "world",
    "parse_caption": "world",
    "sample_captions": "world",
    "Preference": "preferences",
    "get_preference": "preferences",
    "preference_names": "preferences",
    "label_pairs": "preferences",
    "sample_labels": "preferences",
    "DEFAULT_PREFERENCE": "preferences",
    "PretrainConfig": "pretrain",
    "pretrain_toy_pipeline": "pretrain",
    "get_toy_pipeline": "pretrain",
    "build_preference_pairs": "pairs",
    "load_toy_pipeline": "pairs",
    "sample_toy_images": "pairs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
