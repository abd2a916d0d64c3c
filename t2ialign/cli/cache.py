"""``t2ialign cache CONFIG [--set key=value ...]``"""
from __future__ import annotations

import argparse

HELP = """Encode a preference dataset once (VAE latents, prompt embeddings, SDXL time_ids) into data.cache_dir,
so that training loads neither the VAE nor the text encoders. Use the training config itself:
  t2ialign cache my.yaml --set data.cache_dir=cache/pickapic
  t2ialign train my.yaml --set data.cache_dir=cache/pickapic
Stream Pick-a-Pic instead of downloading it whole: --set data.streaming=true --set data.max_rows=100000
Interrupted? Run the same command again: finished shards are kept. Several GPUs:
  accelerate launch --config_file configs/accelerate/ddp.yaml -m t2ialign cache my.yaml
Options (data.*): cache_variants (augmentation draws per pair: epoch e reads variant e % N), cache_dtype
(fp16 | bf16 | fp32; fp32 reproduces image-path training exactly), cache_latent_std, cache_shard_size,
cache_batch_size; num_workers decodes images in parallel (map-style datasets).
SDXL time_ids are stored measured (original size, crop offset, target size), so one cache serves both
data.time_ids settings: training applies data.time_ids (measured | fixed) when it reads them."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache", help="pre-encode latents and text embeddings for faster training", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML training config (model.*, data.*; data.cache_dir is the output)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for sections (repeatable), e.g. --set data.max_rows=1000")
    parser.add_argument("--max-shards", dest="max_shards", type=int, default=None,
                        help="write at most N new shards per process, then stop (rerun to continue)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from t2ialign.config import load_train_config
    from t2ialign.data.cache import build_cache

    config = load_train_config(args.config, args.overrides)
    result = build_cache(config, max_new_shards=args.max_shards)
    status = f"complete: {result.num_pairs} pairs" if result.complete else "incomplete: run the command again to continue"
    print(
        f"cache {result.cache_dir}: process {result.process_index}/{result.num_processes} wrote {result.shards_written} shards ({result.shards_skipped} already done), "
        f"{result.images_per_second:.1f} images/s; {status}"
    )
    print(result.bad_rows)  # the summary train logs: undecodable / tiny rows too, not only the load filters
    return 0
