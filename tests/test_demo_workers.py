"""`t2ialign demo --workers N`: tasks in worker processes give the bytes one process gives."""
import pytest
import torch

from t2ialign.toy import world
from t2ialign.toy.demo_tasks import TaskPool, pair_images, reuse_folder
from t2ialign.toy.pairs import load_toy_pipeline, prompt_batches, sample_toy_images
from t2ialign.toy.preferences import DEFAULT_PREFERENCE, get_preference

PROMPTS = world.sample_captions(6, seed=0)
STEPS = 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from t2ialign.toy import shipped
    from t2ialign.toy.pretrain import PretrainConfig

    return shipped.materialise(tmp_path_factory.mktemp("base") / "pipeline", PretrainConfig())


def test_pair_batches_sampled_apart_concatenate_to_one_run(base):
    pipeline = load_toy_pipeline(base)
    kwargs = dict(seed=3, images_per_prompt=2, num_inference_steps=STEPS, batch_size=4)
    together = sample_toy_images(pipeline, PROMPTS, **kwargs)
    assert len(prompt_batches(len(PROMPTS), 2, 4)) == 3
    apart = torch.cat([sample_toy_images(pipeline, PROMPTS, batches=[i], **kwargs) for i in (2, 0, 1)])
    assert torch.equal(torch.cat([apart[4:], apart[:4]]), together) and together.is_contiguous()


def test_worker_processes_give_the_images_and_rewards_of_one_process(base):
    reward = get_preference(DEFAULT_PREFERENCE)
    results = {}
    for workers in (1, 2):
        with TaskPool(workers) as pool:
            images = pair_images(pool, base, PROMPTS, 0, STEPS, 4.0)
        results[workers] = (images, reward(images[0::2], PROMPTS))  # bit-equal rewards: the same memory layout too
    assert torch.equal(results[1][0], results[2][0]) and torch.equal(results[1][1], results[2][1])


def test_a_reused_sample_folder_is_complete_for_the_sampler(tmp_path):
    import json

    from t2ialign.evaluation.sampling import _done_files

    source = tmp_path / "base"
    (source / "images").mkdir(parents=True)
    rows = [{"file": f"images/{i:05d}_0.png", "prompt_index": i} for i in range(3)]
    for row in rows:
        (source / row["file"]).write_bytes(b"png")
    (source / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    reuse_folder(source, tmp_path / "rlg" / "w0", num_prompts=2)  # the sweep's prompts: the first two
    assert _done_files(tmp_path / "rlg" / "w0") == {"images/00000_0.png", "images/00001_0.png"}
    reuse_folder(source, tmp_path / "rlg" / "w1")
    assert len(_done_files(tmp_path / "rlg" / "w1")) == 3


def test_the_objectives_without_flips_share_one_latent_cache_with_dcpo_captions(tmp_path):
    from t2ialign.toy.demo import OBJECTIVE_RECIPES, DemoSettings, latent_cache_config, train_config, uses_latent_cache

    assert {o for o in OBJECTIVE_RECIPES if uses_latent_cache(o)} == {"mapo", "dcpo", "inpo", "sft"}  # dpo flips
    cache = tmp_path / "pairs" / "latents"
    raw = latent_cache_config(DemoSettings(), tmp_path / "base", tmp_path / "pairs" / "train.parquet", cache)
    assert raw["objective"]["name"] == "dcpo"  # its build stores the per-image captions DCPO reads
    assert raw["data"]["cache_dtype"] == "fp32" and not raw["data"]["random_flip"]  # the image path, bit for bit
    run = train_config(DemoSettings(), tmp_path / "base", tmp_path / "pairs" / "train.parquet", "sft", tmp_path, 150, cache)
    assert run["data"]["cache_dir"] == str(cache) and run["max_steps"] == 150


@pytest.mark.slow
def test_demo_train_yaml_retrains_the_chunked_run_to_the_same_weights(base, tmp_path):
    """The demo trains in curve chunks (each resuming the last); the `demo_train.yaml` it leaves in the run
    folder, run in one go by `t2ialign train` in a fresh process, gives the same LoRA weights bit for bit."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from t2ialign.toy.demo import DemoSettings, align_with_curve, held_out_prompts
    from t2ialign.toy.pairs import build_preference_pairs

    pairs = build_preference_pairs(base, tmp_path / "pairs", num_pairs=16, num_inference_steps=STEPS)
    settings = DemoSettings(output_dir=str(tmp_path), train_steps=6, curve_points=2, curve_prompts=2,
                            train_batch_size=4, num_eval_prompts=2, sample_steps=STEPS, rlg_scales=[])
    align_with_curve(settings, base, pairs, "dpo", held_out_prompts(2, seed=0), get_preference(DEFAULT_PREFERENCE), tmp_path)
    run = tmp_path / "runs" / "dpo"
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["dpo-step3", "dpo-step6"]
    rerun = tmp_path / "rerun"
    done = subprocess.run([sys.executable, "-m", "t2ialign", "train", str(run / "demo_train.yaml"),
                           "--set", f"output_dir={rerun}", "--set", "progress_bar=false"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    name = "lora/pytorch_lora_weights.safetensors"
    chunked, whole = load_file(str(run / "final" / name)), load_file(str(rerun / "final" / name))
    assert chunked.keys() == whole.keys() and all(torch.equal(chunked[k], whole[k]) for k in chunked)
    assert any(v.abs().sum() > 0 for k, v in whole.items() if "lora_B" in k or "lora.up" in k)  # it trained
