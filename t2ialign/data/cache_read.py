"""Reading a pre-encoded cache: ``CachedPairs`` (map-style) and ``collate_cached_pairs``.

The on-disk format is described in ``t2ialign.data.cache``. Shards are memory-mapped with
``torch.from_file`` (private, read-only use; no file descriptor is kept open, so thousands of
shards are fine) and their tensors are zero-copy views of the mapping; ``dataset[i]`` slices
views and gathers the two text rows, so per-item cost is a few microseconds plus the copy the
collate function makes anyway.
"""
from __future__ import annotations

import bisect
import json
import os
import struct
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from t2ialign.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPEC = "build.json"
NULL_TEXT = "null_text.safetensors"
SHARD_PATTERN = "shard-{:06d}.safetensors"
META_KEY = "t2ialign"  # the one safetensors metadata key (a JSON string: several keys serialise in random order)

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors_header(path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header, 8 + length


def shard_metadata(path) -> dict:
    header, _ = read_safetensors_header(path)
    return json.loads((header.get("__metadata__") or {}).get(META_KEY, "{}"))


def mmap_safetensors(path) -> dict:
    """name -> tensor view of a memory-mapped safetensors file (pages load on first touch)."""
    header, data_start = read_safetensors_header(path)
    size = os.path.getsize(path)
    buffer = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = buffer[data_start + begin : data_start + end]
        dtype = ST_DTYPES[info["dtype"]]
        tensors[name] = (raw.view(dtype) if raw.numel() else torch.empty(0, dtype=dtype)).view(info["shape"])
    return tensors


def read_manifest(cache_dir) -> dict:
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.is_file():
        if (cache_dir / SPEC).is_file():
            raise DataError(
                f"data.cache_dir: {cache_dir} holds an unfinished cache (no {MANIFEST}); rerun "
                "`t2ialign cache CONFIG` with the same config to finish it (completed shards are kept)"
            )
        raise DataError(f"data.cache_dir: {cache_dir} is not a t2ialign cache (no {MANIFEST}); build one with `t2ialign cache CONFIG`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: cache format {manifest.get('format')} is not {FORMAT_VERSION}; rebuild the cache")
    return manifest


class CachedPairs(torch.utils.data.Dataset):
    """Map-style dataset over a ``t2ialign cache`` directory; ``dataset[i]`` or ``dataset[(i, epoch)]``.

    Each item (one preference pair, winner first; variant ``epoch % manifest["variants"]``)::

        latent_mean   (2, C, h, w)  VAE posterior mean (unscaled), storage dtype
        latent_std    (2, C, h, w)  VAE posterior std (when the cache stores it)
        prompt_embeds (2, 77, D)    [winner, loser] conditioning: the pair's prompt twice, or with
                                    ``per_image_captions`` the images' own captions (DCPO)
        pooled_prompt_embeds (2, D2), time_ids (2, 6)   (SDXL)
        index         int, the position in this dataset

    Tensors are views of the read-only shard mapping (no copy until ``collate_cached_pairs``); clone
    one before modifying it in place.
    ``per_image_captions`` follows the objective (``ObjectiveSpec.per_image_captions``); a cache
    built from a dataset without per-image captions stores the prompt for them, as the image path
    falls back to it for other objectives, so ``per_image_captions=True`` refuses a cache whose
    manifest counts such pairs (DCPO would silently train them as DPO).
    """

    def __init__(self, cache_dir, per_image_captions: bool = False):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        self.per_image_captions = bool(per_image_captions)
        without = int(self.manifest.get("pairs_without_image_captions", 0))  # caches from before the count: 0
        if self.per_image_captions and without:
            raise DataError(
                f"data.cache_dir: {self.cache_dir} stores the prompt instead of per-image captions for {without} of its "
                f"{self.manifest['num_pairs']} pairs (the dataset lacked data.image_caption_columns, or they were empty), "
                "so DCPO would train them as DPO; rebuild the cache with objective.name=dcpo (a dataset without the columns "
                "is then an error, an empty caption a bad row), or train an objective that uses the pair's prompt"
            )
        self.variants = int(self.manifest["variants"])
        self.scaling_factor = float(self.manifest["scaling_factor"])
        self.shift_factor = float(self.manifest.get("shift_factor") or 0.0)  # SD3 / FLUX VAEs (caches before: none)
        self.shard_files = [self.cache_dir / s["file"] for s in self.manifest["shards"]]
        counts = [int(s["pairs"]) for s in self.manifest["shards"]]
        self._starts = [0]
        for count in counts:
            self._starts.append(self._starts[-1] + count)
        self._nonempty = [k for k, count in enumerate(counts) if count]
        self._shards: dict = {}
        null = mmap_safetensors(self.cache_dir / self.manifest["null_text"])
        self.null_text = {k: v.clone() for k, v in null.items()}  # (1, 77, D) and (1, D2): the embedding of ""

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self):  # DataLoader workers (spawn) re-map the shards themselves
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state

    def _shard(self, k: int) -> tuple:
        """(tensors, text rows per pair as Python lists: [prompt, prompt] or [caption_w, caption_l])."""
        shard = self._shards.get(k)
        if shard is None:
            tensors = mmap_safetensors(self.shard_files[k])
            if self.per_image_captions:
                texts = tensors["caption_index"].tolist()
            else:
                texts = [[p, p] for p in tensors["prompt_index"].tolist()]
            shard = self._shards[k] = (tensors, texts)
        return shard

    def locate(self, index: int) -> tuple[int, int]:
        """Global pair index -> (shard number, row in the shard)."""
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def __getitem__(self, item) -> dict:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        index, epoch = int(index), int(epoch or 0)
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} is out of range for a cache of {len(self)} pairs")
        k, row = self.locate(index)
        t, texts = self._shard(k)
        variant = epoch % self.variants
        first, second = texts[row]
        item = {
            "latent_mean": t["latent_mean"][row, variant],
            "prompt_embeds": _two_rows(t["text_embeds"], first, second),
            "index": index,
            "scaling_factor": self.scaling_factor,
        }
        if "latent_std" in t:
            item["latent_std"] = t["latent_std"][row, variant]
        if "text_pooled" in t:
            item["pooled_prompt_embeds"] = _two_rows(t["text_pooled"], first, second)
        if "time_ids" in t:
            item["time_ids"] = t["time_ids"][row, variant]
        return item

    @property
    def collate_fn(self):
        """``collate_cached_pairs`` with this cache's scaling factor and empty-prompt embedding."""
        return partial(collate_cached_pairs, scaling_factor=self.scaling_factor, null_text=self.null_text,
                       shift_factor=self.shift_factor)


def _two_rows(table: torch.Tensor, first: int, second: int) -> torch.Tensor:
    """(2, ...) rows of a text table; the same row twice is a zero-copy view (collate copies once)."""
    if first == second:
        return table[first].unsqueeze(0).expand(2, *table.shape[1:])
    return _stack([table[first], table[second]])


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _stack(tensors: list) -> torch.Tensor:
    """``torch.stack`` as one single-threaded numpy copy (any dtype, bf16 included, viewed as same-size ints).

    torch's copy kernels go multi-threaded above 32k elements; for these memcpy-sized copies that only adds
    OpenMP spin-waits, which on a busy machine made the read path ~10x slower (scripts/bench_cache.py)."""
    dtype = tensors[0].dtype
    as_int = _SAME_SIZE_INT[tensors[0].element_size()]
    return torch.from_numpy(np.stack([t.view(as_int).numpy() for t in tensors])).view(dtype)


def _winners_then_losers(rows: list, key: str) -> torch.Tensor:
    """One copy: [r0[0], r1[0], ..., r0[1], r1[1], ...]."""
    return _stack([r[key][0] for r in rows] + [r[key][1] for r in rows])


def collate_cached_pairs(rows: list, scaling_factor: Optional[float] = None, null_text: Optional[dict] = None,
                         shift_factor: float = 0.0) -> dict:
    """Items -> the batch ``training.step.preference_step`` reads, every per-image field winners first.

    With a posterior std: ``latent_mean``, ``latent_std`` (2B, C, h, w) and ``latent_scaling_factor``
    (the step draws ``(mean + std * eps) * scaling_factor`` from its generator, exactly as
    ``vae.encode(x).latent_dist.sample(generator)`` does on the image path). Without one: ``latents``
    (the scaled mean). Always ``prompt_embeds`` (2B, 77, D); SDXL: ``pooled_prompt_embeds`` (2B, D2),
    ``time_ids`` (2B, 6). ``null_prompt_embeds`` / ``null_pooled_prompt_embeds`` (the embedding of "")
    let the step apply prompt dropout with the same generator draws as the image path. SD3 / FLUX VAEs have a
    ``shift_factor``: latents are ``(z - shift) * scale``; it travels as ``latent_shift_factor``.
    """
    batch = {"prompt_embeds": _winners_then_losers(rows, "prompt_embeds")}
    for key in ("pooled_prompt_embeds", "time_ids"):
        if key in rows[0]:
            batch[key] = _winners_then_losers(rows, key)
    mean = _winners_then_losers(rows, "latent_mean")
    scale = float(rows[0]["scaling_factor"] if scaling_factor is None else scaling_factor)
    if "latent_std" in rows[0]:
        batch.update(latent_mean=mean, latent_std=_winners_then_losers(rows, "latent_std"), latent_scaling_factor=scale)
        if shift_factor:
            batch["latent_shift_factor"] = float(shift_factor)
    else:
        batch["latents"] = (mean.float() - shift_factor) * scale if shift_factor else mean.float() * scale
    if null_text is not None:
        batch["null_prompt_embeds"] = null_text["prompt_embeds"]
        if "pooled_prompt_embeds" in null_text:
            batch["null_pooled_prompt_embeds"] = null_text["pooled_prompt_embeds"]
    batch["indices"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    return batch
