"""``t2ialign cache``: pre-encoded latents / text, and training from them (tiny real models, real files)."""
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def cache_settings(tiny_sdxl_dir, parquet, cache_dir, **data) -> dict:
    return {
        "model": {"pretrained": str(tiny_sdxl_dir)},
        "data": {"dataset": str(parquet), "resolution": 32, "cache_dir": str(cache_dir), "cache_dtype": "fp32",
                 "cache_shard_size": 5, "cache_batch_size": 2, **data},
        "output_dir": str(Path(cache_dir).parent / "unused_run"), "report_to": "none", "progress_bar": False,
    }


def build(settings, **kwargs):
    from t2ialign.config import load_train_config
    from t2ialign.data.cache import build_cache

    return build_cache(load_train_config(data=settings), progress=False, **kwargs)


def files_of(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def pairs_by_content(cache_dir, per_image_captions=False) -> list:
    """Every pair of a cache as comparable tensors, in index order."""
    from t2ialign.data.cache import CachedPairs

    dataset = CachedPairs(cache_dir, per_image_captions=per_image_captions)
    return [{k: v for k, v in dataset[i].items() if torch.is_tensor(v)} for i in range(len(dataset))]


def assert_same_pairs(a: list, b: list):
    assert len(a) == len(b)
    for left, right in zip(a, b):
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, tiny_sdxl_dir, pickapic_parquet):
    """An uninterrupted, single-process build: 12 pairs in shards of 5 (5, 5, 2)."""
    cache_dir = tmp_path_factory.mktemp("reference") / "cache"
    result = build(cache_settings(tiny_sdxl_dir, pickapic_parquet, cache_dir))
    assert result.complete and result.num_pairs == 12 and result.shards_written == 3
    return cache_dir


def test_cached_pairs_layout_and_caption_choice(reference_cache):
    from t2ialign.data.cache import CachedPairs, read_manifest
    from t2ialign.data.cache_read import mmap_safetensors

    manifest = read_manifest(reference_cache)
    assert [s["pairs"] for s in manifest["shards"]] == [5, 5, 2] and manifest["scaling_factor"] > 0
    prompt, own = CachedPairs(reference_cache), CachedPairs(reference_cache, per_image_captions=True)
    assert len(prompt) == 12
    item = prompt[(7, 3)]  # (index, epoch) keys from the trainer's sampler; one variant: every epoch reads it
    assert item["latent_mean"].shape == item["latent_std"].shape == (2, 4, 16, 16)
    assert item["prompt_embeds"].shape == (2, 77, 64) and item["pooled_prompt_embeds"].shape == (2, 32)
    assert item["time_ids"].shape == (2, 6) and item["time_ids"][0, 4:].tolist() == [32.0, 32.0]
    assert torch.equal(item["prompt_embeds"][0], item["prompt_embeds"][1])  # the pair's prompt for both images
    assert torch.equal(prompt[7]["latent_mean"], item["latent_mean"])
    shard = mmap_safetensors(reference_cache / "shard-000001.safetensors")
    # the fixture's per-image captions: the winner's is the prompt, the loser's describes the loser
    assert torch.equal(shard["caption_index"][:, 0], shard["prompt_index"])
    assert (shard["caption_index"][:, 1] != shard["prompt_index"]).all()
    assert shard["text_embeds"].shape[0] == 10  # 5 prompts + 5 loser captions, each text stored once
    dcpo = own[7]["prompt_embeds"]
    assert torch.equal(dcpo[0], item["prompt_embeds"][0]) and not torch.equal(dcpo[1], item["prompt_embeds"][1])
    with pytest.raises(IndexError):
        prompt[12]

    rows = [prompt[(i, 0)] for i in (3, 9, 4)]
    batch = prompt.collate_fn(rows)
    assert batch["latent_mean"].shape == (6, 4, 16, 16) and batch["prompt_embeds"].shape == (6, 77, 64)
    for b, row in enumerate(rows):  # winners first: rows 0..B-1 winners, B..2B-1 losers
        for key in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "time_ids"):
            assert torch.equal(batch[key][b], row[key][0]) and torch.equal(batch[key][3 + b], row[key][1])
    assert batch["latent_scaling_factor"] == manifest["scaling_factor"]
    assert batch["null_prompt_embeds"].shape == (1, 77, 64) and batch["indices"].tolist() == [3, 9, 4]


def _count_live(classes) -> int:
    gc.collect()
    return sum(issubclass(type(o), classes) for o in gc.get_objects())  # type(): no __class__ lookups on proxies


@pytest.mark.parametrize("objective,dropout", [("dpo", 0.0), ("dcpo", 0.5)])
def test_training_from_cache_equals_training_from_images(tmp_path, tiny_sdxl_dir, pickapic_parquet, reference_cache,
                                                         objective, dropout):
    """Same seeds -> the same metrics (bit for bit here; asserted to 1e-6). DCPO conditions each image on its own
    caption; prompt dropout draws from the step's generator on both paths. The cache run never builds a VAE
    or a text encoder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    import t2ialign.training.loop as loop
    from t2ialign.config import load_train_config

    frozen = (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection)
    metrics, alive = {}, {}
    original = loop._run_steps
    for name, cache_dir in (("images", None), ("cache", str(reference_cache))):
        config = load_train_config(data={
            "model": {"pretrained": str(tiny_sdxl_dir), "reference_dtype": "fp32"},
            "data": {"dataset": str(pickapic_parquet), "resolution": 32, "prompt_dropout": dropout, "cache_dir": cache_dir},
            "objective": {"name": objective}, "optim": {"learning_rate": 1e-4}, "output_dir": str(tmp_path / name),
            "max_steps": 3, "train_batch_size": 2, "log_every": 1, "checkpoint_every": 0, "report_to": "none",
            "progress_bar": False,
        })
        before, seen = _count_live(frozen), []

        def counting_run_steps(*args, **kwargs):
            seen.append(_count_live(frozen))
            return original(*args, **kwargs)

        loop._run_steps = counting_run_steps
        try:
            loop.train(config)
        finally:
            loop._run_steps = original
        alive[name] = seen[0] - before
        metrics[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert alive["images"] >= 3, "the counter must see the image run's VAE and two text encoders"
    assert alive["cache"] == 0, "a cache run instantiated a VAE or a text encoder"
    assert [m["step"] for m in metrics["cache"]] == [1, 2, 3]
    for from_images, from_cache in zip(metrics["images"], metrics["cache"]):
        assert from_images.keys() == from_cache.keys()
        for key, value in from_images.items():
            assert abs(value - from_cache[key]) <= 1e-6, (from_images["step"], key, value, from_cache[key])


def test_interrupted_build_resumes_to_identical_files(tmp_path, tiny_sdxl_dir, pickapic_parquet, reference_cache):
    from t2ialign.config import ConfigError
    from t2ialign.data.cache import CachedPairs
    from t2ialign.errors import DataError

    cache_dir = tmp_path / "cache"
    settings = cache_settings(tiny_sdxl_dir, pickapic_parquet, cache_dir)
    first = build(settings, max_new_shards=1)  # stops like a killed job: one shard done, no manifest
    assert not first.complete and first.shards_written == 1
    assert sorted(p.name for p in cache_dir.glob("shard-*")) == ["shard-000000.safetensors"]
    with pytest.raises(DataError, match="unfinished"):
        CachedPairs(cache_dir)
    (cache_dir / ".shard-000001.safetensors.tmp-4242").write_bytes(b"half a shard")  # a torn write
    with pytest.raises(ConfigError, match="data.resolution"):  # resuming with other contents is refused
        changed = cache_settings(tiny_sdxl_dir, pickapic_parquet, cache_dir)
        changed["data"]["resolution"] = 16
        build(changed)
    second = build(settings)
    assert second.complete and second.shards_skipped == 1 and second.shards_written == 2
    assert files_of(cache_dir) == files_of(reference_cache)  # byte-identical, torn file gone


def test_streaming_build_matches_map_style_and_takes_max_rows(tmp_path, tiny_sdxl_dir, pickapic_parquet, reference_cache):
    streamed = build(cache_settings(tiny_sdxl_dir, pickapic_parquet, tmp_path / "stream", streaming=True))
    assert streamed.complete and streamed.num_pairs == 12
    # a clean file streams the same rows in the same order: the same pairs (same augmentation seeds)
    assert_same_pairs(pairs_by_content(tmp_path / "stream", True), pairs_by_content(reference_cache, True))
    subset = build(cache_settings(tiny_sdxl_dir, pickapic_parquet, tmp_path / "subset", streaming=True, max_rows=4,
                                  cache_shard_size=3))
    assert subset.complete and subset.num_pairs == 4 and subset.shards_written == 2


def _run(cmd, env_extra=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cli_two_process_build_writes_the_same_pairs(tmp_path, tiny_sdxl_dir, pickapic_parquet, reference_cache):
    """``python -m t2ialign cache cfg.yaml`` in two torchrun processes (gloo on CPU) == the 1-process build."""
    settings = cache_settings(tiny_sdxl_dir, pickapic_parquet, tmp_path / "unset")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(settings))
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                 "-m", "t2ialign", "cache", str(config), "--set", f"data.cache_dir={tmp_path / 'two'}"],
                env_extra={"ACCELERATE_USE_CPU": "1"}, timeout=600)
    # the deterministic split: shards 0 and 2 on rank 0, shard 1 on rank 1
    assert "process 0/2 wrote 2 shards" in proc.stdout and "process 1/2 wrote 1 shards" in proc.stdout, proc.stdout
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["num_pairs"] == 12
    assert_same_pairs(pairs_by_content(tmp_path / "two", True), pairs_by_content(reference_cache, True))
    assert_same_pairs(pairs_by_content(tmp_path / "two"), pairs_by_content(reference_cache))


# ---------------------------------------------------------------- SDXL time_ids modes (data.time_ids)


def test_cache_and_image_paths_give_the_same_time_ids_for_each_mode(tmp_path, tiny_sdxl_dir):
    """The cache stores measured time_ids; the step turns them into either data.time_ids setting exactly as it
    does the image path's sizes and crops (non-square images, random crop and flip, two variants)."""
    from t2ialign.config import load_train_config
    from t2ialign.data import build_preference_pairs, collate_pairs, write_pickapic_parquet
    from t2ialign.data.cache import CachedPairs
    from t2ialign.training.step import _time_ids

    parquet = write_pickapic_parquet(tmp_path / "odd.parquet", 6, seed=8, image_size=[(96, 64), (64, 80), (72, 40)])
    settings = cache_settings(tiny_sdxl_dir, parquet, tmp_path / "cache", random_crop=True, cache_variants=2)
    assert build(settings).complete
    cached = CachedPairs(tmp_path / "cache")
    assert cached.manifest["time_ids"] == "measured" and "time_ids" not in cached.manifest["spec"]["data"]
    pairs = build_preference_pairs(load_train_config(data=settings).data, seed=0)
    keys = [(i, epoch) for i in range(len(pairs)) for epoch in (0, 1)]
    from_images = collate_pairs([pairs[k] for k in keys])
    from_cache = cached.collate_fn([cached[k] for k in keys])
    for mode in ("measured", "fixed"):
        image_ids, cache_ids = _time_ids(from_images, 32, mode), _time_ids(from_cache, 32, mode)
        assert image_ids.shape == cache_ids.shape == (2 * len(keys), 6)
        assert torch.equal(image_ids, cache_ids), mode
    assert torch.equal(_time_ids(from_cache, 32, "fixed"), torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * (2 * len(keys))))
    measured = _time_ids(from_cache, 32, "measured")
    assert {tuple(r) for r in measured[:, :2].tolist()} == {(64.0, 96.0), (80.0, 64.0), (40.0, 72.0)}
    assert len({tuple(r) for r in measured[:, 2:4].tolist()}) > 2  # random crops: the offsets really vary


def test_fixed_time_ids_train_alike_from_cache_and_images_and_unlike_measured(tmp_path, tiny_sdxl_dir, pickapic_parquet,
                                                                              reference_cache):
    """One cache serves both settings: data.time_ids=fixed from the cache equals fixed from the images, and the
    setting reaches the UNet (the loss differs from measured on the same data and noise)."""
    import t2ialign.training.loop as loop
    from t2ialign.config import load_train_config

    losses = {}
    for name, cache_dir, mode in (("images_fixed", None, "fixed"), ("cache_fixed", str(reference_cache), "fixed"),
                                  ("cache_measured", str(reference_cache), "measured")):
        loop.train(load_train_config(data={
            "model": {"pretrained": str(tiny_sdxl_dir), "reference_dtype": "fp32"},
            "data": {"dataset": str(pickapic_parquet), "resolution": 32, "cache_dir": cache_dir, "time_ids": mode},
            "optim": {"learning_rate": 1e-3}, "output_dir": str(tmp_path / name), "max_steps": 2, "train_batch_size": 2,
            "log_every": 1, "checkpoint_every": 0, "report_to": "none", "progress_bar": False,
        }))
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["model_err_w"] for r in records]
    assert len(losses["cache_fixed"]) == 2
    assert all(abs(a - b) <= 1e-6 for a, b in zip(losses["images_fixed"], losses["cache_fixed"])), losses
    assert any(abs(a - b) > 1e-6 for a, b in zip(losses["cache_fixed"], losses["cache_measured"])), losses


# ---------------------------------------------------------------- DCPO needs per-image captions


def test_dcpo_cache_build_without_caption_columns_fails_in_one_line_before_loading(tmp_path, tiny_sdxl_dir):
    from t2ialign.data import write_pickapic_parquet

    parquet = write_pickapic_parquet(tmp_path / "single.parquet", 4, with_dual_captions=False)
    settings = {**cache_settings(tiny_sdxl_dir, parquet, tmp_path / "cache"), "objective": {"name": "dcpo"}}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2ialign", "cache", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.image_caption_columns: DCPO conditions each image on its own caption"), last
    assert "'caption_0', 'caption_1'" in last and "available columns: are_different" in last and "DCPO captions" in last
    assert not list((tmp_path / "cache").glob("shard-*"))


def test_dcpo_refuses_a_cache_that_stored_the_prompt_for_image_captions(tmp_path, tiny_sdxl_dir):
    """A DPO-built cache whose pairs lack (some) per-image captions cannot silently train DCPO; a DCPO build of the
    same data skips those rows as bad rows instead."""
    from t2ialign.data import write_pickapic_parquet
    from t2ialign.data.cache import CachedPairs
    from t2ialign.errors import DataError

    single = write_pickapic_parquet(tmp_path / "single.parquet", 4, with_dual_captions=False)
    holes = write_pickapic_parquet(tmp_path / "holes.parquet", 6, seed=3, empty_image_captions=[1, 4])
    for parquet, without in ((single, 4), (holes, 2)):
        cache_dir = tmp_path / f"dpo_{parquet.stem}"
        assert build(cache_settings(tiny_sdxl_dir, parquet, cache_dir)).complete
        assert CachedPairs(cache_dir).manifest["pairs_without_image_captions"] == without
        with pytest.raises(DataError, match=rf"stores the prompt instead of per-image captions for {without} of its"):
            CachedPairs(cache_dir, per_image_captions=True)
    dcpo_dir = tmp_path / "dcpo_holes"
    result = build({**cache_settings(tiny_sdxl_dir, holes, dcpo_dir), "objective": {"name": "dcpo"}})
    assert result.complete and result.num_pairs == 4
    dataset = CachedPairs(dcpo_dir, per_image_captions=True)
    assert dataset.manifest["pairs_without_image_captions"] == 0
    assert dataset.manifest["data_report"]["load"]["skipped"] == {"empty_image_caption": 2}
    assert json.loads((dcpo_dir / "build.json").read_text())["require_image_captions"] is True
