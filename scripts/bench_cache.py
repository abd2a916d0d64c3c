#!/usr/bin/env python
"""Throughput of ``t2ialign cache``: building (images/s) and reading (pairs/s) through the real code paths.

  python scripts/bench_cache.py                       # CPU: build with the tiny models, read SDXL-sized shards
  python scripts/bench_cache.py --device cuda         # build with SDXL-sized VAE / text encoders (random weights)
  python scripts/bench_cache.py --read-pairs 2048 --json

Build: ``build_cache`` over a synthetic Pick-a-Pic parquet (decode, resize/crop, VAE encode, text encode, atomic
shard writes), tiny models at 32 px on CPU by default; with ``--sdxl`` (default on CUDA) the real SDXL VAE and
both text encoders' architectures with random weights at ``--build-resolution`` (1024 by default there).

Read: shards in the cache format holding SDXL 1024 px tensors (latent mean + std 2x4x128x128, prompt embeds
2x77x2048, pooled 2x1280, time_ids 2x6, one text row per pair: random values), read through ``CachedPairs`` +
``DataLoader`` + ``collate_fn`` with the trainer's ``ResumableBatchSampler`` (shuffled pairs). "warm" reads from
the page cache; "cold" first evicts the shard files with posix_fadvise(DONTNEED), i.e. reads from disk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from t2ialign.data.cache_shards import write_safetensors_atomic  # noqa: E402
from t2ialign.data.cache_read import FORMAT_VERSION, MANIFEST, NULL_TEXT, SHARD_PATTERN  # noqa: E402

SDXL_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
SDXL_TEXT_1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


# ---------------------------------------------------------------- build


def sdxl_sized_pipeline(directory: Path) -> Path:
    """The tiny pipeline (tokenizers, scheduler) with SDXL-sized VAE and text encoders, random weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from t2ialign.models.tiny import build_tiny_sdxl_pipeline

    build_tiny_sdxl_pipeline(directory)
    for name, model in (
        ("vae", AutoencoderKL(**SDXL_VAE)),
        ("text_encoder", CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_1))),
        ("text_encoder_2", CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))),
    ):
        shutil.rmtree(directory / name)
        model.save_pretrained(directory / name)
    return directory


def bench_build(args, work: Path) -> dict:
    from t2ialign.config import load_train_config
    from t2ialign.data.cache import build_cache
    from t2ialign.data.synthetic import write_pickapic_parquet
    from t2ialign.models.tiny import build_tiny_sdxl_pipeline

    size = args.build_resolution
    pipeline = sdxl_sized_pipeline(work / "pipe") if args.sdxl else build_tiny_sdxl_pipeline(work / "pipe")
    parquet = write_pickapic_parquet(work / "train.parquet", num_rows=args.build_pairs, image_size=(size, size), seed=0)
    settings = {
        "model": {"pretrained": str(pipeline)},
        "data": {"dataset": str(parquet), "resolution": size, "cache_dir": str(work / "built"), "cache_dtype": args.dtype,
                 "cache_batch_size": args.build_batch, "cache_shard_size": 64, "num_workers": args.workers},
        "mixed_precision": "bf16" if args.device == "cuda" else "no", "report_to": "none", "progress_bar": False,
    }
    result = build_cache(load_train_config(data=settings), progress=False)
    return {"what": "build", "models": "sdxl-sized" if args.sdxl else "tiny", "resolution": size, "pairs": result.num_pairs,
            "images": result.images_encoded, "seconds": round(result.seconds, 2),
            "images_per_s": round(result.images_per_second, 1)}


# ---------------------------------------------------------------- read


def write_sdxl_sized_cache(directory: Path, pairs: int, shard_size: int, dtype: torch.dtype) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards = []
    for k, start in enumerate(range(0, pairs, shard_size)):
        n = min(shard_size, pairs - start)
        rand = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
        tensors = {
            "latent_mean": rand(n, 1, 2, 4, 128, 128), "latent_std": rand(n, 1, 2, 4, 128, 128).abs(),
            "text_embeds": rand(n, 77, 2048), "text_pooled": rand(n, 1280),
            "time_ids": torch.tensor([1024.0, 1024, 0, 0, 1024, 1024]).expand(n, 1, 2, 6).contiguous(),
            "prompt_index": torch.arange(n), "caption_index": torch.arange(n).repeat_interleave(2).view(n, 2),
            "index": torch.arange(start, start + n), "source_row": torch.arange(start, start + n),
        }
        write_safetensors_atomic(directory / SHARD_PATTERN.format(k), tensors,
                                 {"format": FORMAT_VERSION, "shard": k, "pairs": n, "texts": [], "bad_rows": []})
        shards.append({"file": SHARD_PATTERN.format(k), "pairs": n})
    write_safetensors_atomic(directory / NULL_TEXT, {"prompt_embeds": torch.zeros(1, 77, 2048, dtype=dtype),
                                                     "pooled_prompt_embeds": torch.zeros(1, 1280, dtype=dtype)}, {})
    manifest = {"format": FORMAT_VERSION, "num_pairs": pairs, "num_shards": len(shards), "shards": shards, "variants": 1,
                "is_sdxl": True, "resolution": 1024, "latent_shape": [4, 128, 128], "scaling_factor": 0.13025,
                "dtype": str(dtype), "latent_std": True, "text_shape": [77, 2048], "null_text": NULL_TEXT,
                "spec": {"model": {"pretrained": "synthetic"}}}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def evict(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def bench_read(directory: Path, batch_size: int, workers: int, cold: bool, max_seconds: float) -> dict:
    from t2ialign.data.cache import CachedPairs
    from t2ialign.training.batches import ResumableBatchSampler, make_loader

    if cold:
        evict(directory)
    dataset = CachedPairs(directory)
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=0)
    loader = iter(make_loader(dataset, dataset.collate_fn, sampler, workers))
    steps = len(dataset) // batch_size
    next(loader)  # worker start-up is not throughput
    start, cpu_start, done = time.perf_counter(), time.process_time(), 1
    for _ in range(steps - 1):
        batch = next(loader)
        assert batch["latent_mean"].shape[0] == 2 * batch_size
        done += 1
        if time.perf_counter() - start > max_seconds:
            break
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    pairs = (done - 1) * batch_size
    row = {"what": "read", "cache": "cold (disk)" if cold else "warm (page cache)", "workers": workers,
           "batch": batch_size, "pairs": pairs, "seconds": round(seconds, 2), "pairs_per_s": round(pairs / seconds, 1)}
    if workers == 0:  # all the work is in this process: pairs per CPU-second = the rate on an otherwise idle core
        row["pairs_per_cpu_s"] = round(pairs / max(cpu, 1e-9), 1)
    return row


def bench_getitem(directory: Path, count: int = 2000) -> dict:
    from t2ialign.data.cache import CachedPairs

    dataset = CachedPairs(directory)
    indices = torch.randperm(len(dataset))[:count].tolist()
    for i in indices[:50]:
        dataset[(i, 0)]
    start = time.perf_counter()
    for i in indices:
        dataset[(i, 0)]
    return {"what": "getitem", "microseconds_per_item": round((time.perf_counter() - start) / len(indices) * 1e6, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sdxl", action=argparse.BooleanOptionalAction, default=None,
                        help="build with SDXL-sized VAE/text encoders (default: on CUDA)")
    parser.add_argument("--build-pairs", type=int, default=None, help="pairs to build (default 64 tiny, 128 sdxl)")
    parser.add_argument("--build-resolution", type=int, default=None, help="default 32 (tiny) or 1024 (sdxl)")
    parser.add_argument("--build-batch", type=int, default=8, help="data.cache_batch_size")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers for the build's image decoding")
    parser.add_argument("--read-pairs", type=int, default=1024, help="pairs in the SDXL-sized read benchmark cache")
    parser.add_argument("--read-batch", type=int, default=4)
    parser.add_argument("--read-seconds", type=float, default=20.0, help="stop each read measurement after this long")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory, removed)")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-read", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of this process for the read runs (default: torch's; workers use 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.sdxl = args.device == "cuda" if args.sdxl is None else args.sdxl
    args.build_pairs = args.build_pairs or (128 if args.sdxl else 64)
    args.build_resolution = args.build_resolution or (1024 if args.sdxl else 32)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        if not args.skip_build:
            rows.append(bench_build(args, work))
        if not args.skip_read:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
            read_dir = work / "sdxl_sized"
            write_sdxl_sized_cache(read_dir, args.read_pairs, 256, dtype)
            size = sum(p.stat().st_size for p in read_dir.iterdir())
            rows.append({"what": "read-cache", "pairs": args.read_pairs, "bytes_per_pair": size // args.read_pairs})
            if args.threads:
                torch.set_num_threads(args.threads)
            rows.append(bench_getitem(read_dir))
            for workers in (0, 2):
                for cold in (False, True):
                    rows.append(bench_read(read_dir, args.read_batch, workers, cold, args.read_seconds))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    info = {"device": args.device, "cpus": os.cpu_count(), "read_threads": torch.get_num_threads(),
            "load_average": [round(x, 1) for x in os.getloadavg()], "torch": torch.__version__}
    if args.json:
        print(json.dumps({"machine": info, "results": rows}))
    else:
        print(f"machine: {info}")
        for row in rows:
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
