"""Per-shard work of ``t2ialign cache``: the frozen encoders, a shard's accumulator, atomic shard files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from t2ialign.config import TrainConfig
from t2ialign.data.cache_read import FORMAT_VERSION, META_KEY, read_safetensors_header

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FROZEN_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIN_TEXT_BATCH = 8


class CacheEncoder:
    """The frozen VAE and text encoders, in the precision the trainer would run them at."""

    def __init__(self, config: TrainConfig, device):
        from t2ialign.models.loading import load_components

        self.device = torch.device(device)
        self.components = load_components(
            config.model.pretrained, revision=config.model.revision, variant=config.model.variant,
            vae=config.model.vae, dtype=torch.float32, device=self.device, load_unet=False,
            local_files_only=config.model.local_files_only,
        )
        frozen = FROZEN_DTYPES[config.mixed_precision]
        if frozen not in (torch.float16, torch.float32):  # as load_training_components (the SDXL VAE overflows in fp16)
            self.components.vae.to(dtype=frozen)
        for encoder in self.components.text_encoders:
            if frozen != torch.float32:
                encoder.to(dtype=frozen)
        self.mixed_precision = config.mixed_precision
        self.resolution = config.data.resolution
        self.is_sdxl = self.components.is_sdxl
        self.family = self.components.family
        # SDXL and the flow models (SD3 / FLUX) condition on a pooled embedding as well
        self.has_pooled = self.is_sdxl or self.components.is_flow
        self.max_sequence_length = config.flow.max_sequence_length
        vae = self.components.vae
        self.shift_factor, self.scaling_factor = self.components.latent_shift_and_scale
        factor = self.components.vae_scale_factor
        self.latent_shape = (self.components.latent_channels, self.resolution // factor, self.resolution // factor)
        self.null_text = self.encode_texts([""])

    def _autocast(self):  # training encodes inside accelerator.autocast(); mirror it
        enabled = self.mixed_precision != "no"
        dtype = FROZEN_DTYPES[self.mixed_precision] if enabled else torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, R, R) in [-1, 1] -> posterior mean and std (N, C, h, w), unscaled."""
        vae = self.components.vae
        with self._autocast():
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean, dist.std

    def _encode(self, texts: list):
        if self.components.is_flow:
            from t2ialign.models.flow_text import encode_flow_prompts

            return encode_flow_prompts(self.components, texts, self.max_sequence_length)
        from t2ialign.models.text_encoding import encode_prompts

        return encode_prompts(self.components, texts)

    @torch.no_grad()
    def encode_texts(self, texts: list, batch_size: int = 32) -> dict:
        parts = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            # CPU BLAS rounds the pooled projection differently (~1e-7) for fewer than 4 rows; a training batch has
            # 2 x batch rows, so tiny chunks are padded to keep cached and image-path embeddings bit-identical
            padded = chunk + [""] * max(0, MIN_TEXT_BATCH - len(chunk))
            with self._autocast():
                parts.append(self._encode(padded)[: len(chunk)])
        out = {"prompt_embeds": torch.cat([p.prompt_embeds for p in parts])}
        if self.has_pooled:
            out["pooled_prompt_embeds"] = torch.cat([p.pooled_prompt_embeds for p in parts])
        return out


class ShardBuilder:
    """Accumulates one shard's pairs, encoding images every ``batch_pairs`` pairs and texts at the end."""

    def __init__(self, shard: int, encoder: CacheEncoder, variants: int, batch_pairs: int, dtype: torch.dtype, keep_std: bool):
        self.shard, self.encoder, self.variants = shard, encoder, variants
        self.batch_pairs, self.dtype, self.keep_std = batch_pairs, dtype, keep_std
        self.pending: list = []
        self.means: list = []
        self.stds: list = []
        self.time_ids: list = []
        self.texts: dict = {}  # text -> row of this shard's text table (captions repeat a lot in Pick-a-Pic)
        self.prompt_rows: list = []
        self.caption_rows: list = []
        self.indices: list = []
        self.source_rows: list = []
        self.events: list = []
        self.images = 0
        self.without_captions = 0  # pairs whose per-image captions fell back to the prompt

    def _text_row(self, text: str) -> int:
        return self.texts.setdefault(text, len(self.texts))

    def add(self, samples: list, source_row: int, events: list = ()) -> None:
        """``samples``: the pair's ``variants`` transformed samples (PreferencePairs items), variant order."""
        first = samples[0]
        self.prompt_rows.append(self._text_row(first["caption"]))
        self.caption_rows.append([self._text_row(first["caption_w"]), self._text_row(first["caption_l"])])
        self.without_captions += not first.get("own_captions", True)
        self.indices.append(int(first["index"]))
        self.source_rows.append(int(source_row))
        self.events.extend([int(r), str(why)] for r, why in events)
        if self.encoder.is_sdxl:
            from t2ialign.models.text_encoding import sdxl_time_ids

            # always "measured": they hold the sizes and crops, so training applies either data.time_ids to them
            resolution = self.encoder.resolution
            self.time_ids.append(torch.stack([sdxl_time_ids("measured", s["original_sizes"], s["crop_top_left"], resolution)
                                              for s in samples]))
        self.pending.append(samples)
        if len(self.pending) >= self.batch_pairs:
            self._encode_pending()

    def _encode_pending(self) -> None:
        if not self.pending:
            return
        pixels = torch.cat([s["pixel_values"] for samples in self.pending for s in samples])  # pair, variant, [w, l]
        mean, std = self.encoder.encode_images(pixels)
        shape = (len(self.pending), self.variants, 2, *mean.shape[1:])
        self.means.append(mean.reshape(shape).to("cpu", self.dtype))
        if self.keep_std:
            self.stds.append(std.reshape(shape).to("cpu", self.dtype))
        self.images += pixels.shape[0]
        self.pending = []

    def tensors(self) -> dict:
        self._encode_pending()
        n, variants, latent = len(self.indices), self.variants, self.encoder.latent_shape
        empty = torch.zeros((0, variants, 2, *latent), dtype=self.dtype)
        out = {
            "latent_mean": torch.cat(self.means) if self.means else empty,
            "prompt_index": torch.tensor(self.prompt_rows, dtype=torch.int64).reshape(n),
            "caption_index": torch.tensor(self.caption_rows, dtype=torch.int64).reshape(n, 2),
            "index": torch.tensor(self.indices, dtype=torch.int64).reshape(n),
            "source_row": torch.tensor(self.source_rows, dtype=torch.int64).reshape(n),
        }
        if self.keep_std:
            out["latent_std"] = torch.cat(self.stds) if self.stds else empty
        null = self.encoder.null_text
        texts = self.encoder.encode_texts(list(self.texts)) if self.texts else {k: v[:0] for k, v in null.items()}
        out["text_embeds"] = texts["prompt_embeds"].to("cpu", self.dtype)
        if self.encoder.has_pooled:
            out["text_pooled"] = texts["pooled_prompt_embeds"].to("cpu", self.dtype)
        if self.encoder.is_sdxl:
            out["time_ids"] = torch.stack(self.time_ids) if self.time_ids else torch.zeros((0, variants, 2, 6))
        return {k: v.contiguous() for k, v in out.items()}

    def metadata(self) -> dict:
        return {"format": FORMAT_VERSION, "shard": self.shard, "pairs": len(self.indices), "texts": list(self.texts),
                "bad_rows": self.events, "pairs_without_image_captions": self.without_captions}


def write_safetensors_atomic(path: Path, tensors: dict, metadata: dict) -> None:
    """Write to a temporary name, fsync, then rename: a shard file either exists whole or not at all.
    A failed write (disk full, read-only) removes the temporary file and raises one line (OutputError)."""
    from safetensors.torch import save_file

    from t2ialign.data.files import reported_write

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    kept = "the shards written before are intact, and a rerun keeps them and continues"
    with reported_write(path, kept, cleanup=tmp):
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(metadata, sort_keys=True)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def shard_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        read_safetensors_header(path)
        return True
    except (OSError, ValueError, UnicodeDecodeError):
        return False
