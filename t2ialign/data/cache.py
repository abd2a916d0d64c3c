"""Pre-encoded training data: ``t2ialign cache CONFIG`` writes it, training reads it (``data.cache_dir``).

Running the VAE and both SDXL text encoders over Pick-a-Pic once, instead of in every training
step, removes ~1.3 GB of frozen weights and most of the per-step encode time from training. The
cache stores exactly what the image path computes, so a run from the cache equals a run from the
images (tested to 1e-6 with ``data.cache_dtype: fp32``):

* **Latents.** The VAE posterior's mean AND std (``latent_dist.mean`` / ``.std``, unscaled). The
  training step draws ``(mean + std * eps) * scaling_factor`` with ``eps`` from its micro-step
  generator, the same draw, in the same order, as ``vae.encode(x).latent_dist.sample(generator)``
  on the image path. ``data.cache_latent_std: false`` halves latent storage; training then uses the
  posterior mean (the SDXL VAE's std is small, but the run is no longer identical to the image path).
* **Augmentation.** ``data.cache_variants = N`` stores N augmentation draws per pair: variant ``v`` is
  what the image pipeline produces in epoch ``v`` (``PairTransform(seed=config.seed)``, same flip
  and crop, same SDXL ``time_ids``), and training epoch ``e`` reads variant ``e % N``. So epochs
  ``< N`` are identical to the image path; with N = 1 every epoch sees epoch 0's flip/crop (fine
  for short runs; use N = 2-4 for multi-epoch runs with random_flip, or random_flip: false).
* **Text.** Each shard holds a table of the distinct texts among its pairs' prompts and per-image
  captions (Pick-a-Pic repeats prompts a lot) and, per pair, ``prompt_index`` and ``caption_index``
  (winner, loser) into it. ``CachedPairs(per_image_captions=True)`` (DCPO) returns the images' own
  captions, otherwise the prompt twice; a dataset without per-image captions stores the prompt for
  them, as the image path falls back to it for other objectives. The manifest counts such pairs
  (``pairs_without_image_captions``) and DCPO refuses a cache that has any; a build with
  ``objective.name: dcpo`` requires the caption columns and skips rows with an empty one, as the
  image path does. ``null_text.safetensors`` holds the embedding of ""
  once; prompt dropout happens in the training step with the same generator draw as the image path
  (both images of a pair lose their text together).
* **SDXL micro-conditioning.** ``time_ids`` (2, 6) per pair and variant, float32, always the measured
  ``[orig_h, orig_w, crop_top, crop_left, R, R]`` (manifest ``"time_ids": "measured"``). They hold every
  image's size and crop, so one cache serves both ``data.time_ids`` settings: the training step passes the
  stored rows through ``sdxl_time_ids(config.data.time_ids, ...)``, the function the image path calls
  (``fixed`` gives ``[R, R, 0, 0, R, R]``); ``data.time_ids`` is therefore not part of ``build.json``.

Code: cache_build.py (the build), cache_shards.py (encoders, shard files), cache_read.py (CachedPairs).

Layout of ``cache_dir``::

    build.json                 the contents-deciding config (a resumed build must match it)
    shard-000000.safetensors   pairs [0, S): latent_mean / latent_std (n, V, 2, C, h, w),
                               time_ids (n, V, 2, 6), prompt_index (n,), caption_index (n, 2),
                               text_embeds (U, 77, D), text_pooled (U, D2), index (n,), source_row (n,)
                               + metadata (texts, bad-row events)
    null_text.safetensors      prompt_embeds (1, 77, D), pooled_prompt_embeds (1, D2)
    manifest.json              written last: shards, pair counts, shapes, scaling factor

Build: shard ``k`` holds dataset positions ``[k*S, (k+1)*S)`` (streams: stream rows, minus bad rows);
process ``r`` of ``W`` builds the shards with ``k % W == r``; each shard is written to a temporary
name, fsynced and renamed, so after an interruption a rerun keeps every finished shard and builds the
rest (shards are byte-identical to an uninterrupted build). Rank 0 writes ``manifest.json`` once all
shards exist; training refuses a cache without it. ``data.streaming: true`` streams the dataset (with
``data.max_rows``, a reproducible subset) so Pick-a-Pic can be cached without downloading it whole;
every process then reads the stream, but decodes and encodes only its own shards.
"""
from t2ialign.data.cache_build import CacheBuildResult, build_cache, cache_spec
from t2ialign.data.cache_read import CachedPairs, collate_cached_pairs, read_manifest

__all__ = ["CacheBuildResult", "CachedPairs", "build_cache", "cache_spec", "collate_cached_pairs", "read_manifest"]
