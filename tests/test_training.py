"""End-to-end training through the real CLI (subprocesses) on the tiny SDXL fixture and a generated parquet."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.configs import with_overrides
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, pipeline_dir, parquet, reference_dtype="fp32", **extra) -> Path:
    config = {
        "model": {"pretrained": str(pipeline_dir), **({"reference_dtype": reference_dtype} if reference_dtype else {})},
        "data": {"dataset": str(parquet), "resolution": 32, "prompt_dropout": 0.2},
        "objective": {"name": "dpo"},
        "optim": {"learning_rate": 1e-4, "warmup_steps": 1},
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "checkpoint_every": 2,
        "log_every": 1,
        "report_to": "tensorboard",
        "progress_bar": False,
    }
    with_overrides(config, extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "t2ialign", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_one(pipe) -> torch.Tensor:
    out = pipe(prompt="a red circle", num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return torch.as_tensor(out.images)


@pytest.mark.slow
def test_full_finetune_through_cli_writes_checkpoints_and_a_loadable_unet(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    config = tiny_config(tmp_path, tiny_sdxl_dir, pickapic_parquet)
    run_cli("train", str(config))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000004"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert abs(records[0]["loss"] - 0.693147) < 1e-3  # policy == reference on the first micro-batches
    assert all(0.0 <= r["implicit_acc"] <= 1.0 for r in records)
    assert list((run / "logs").rglob("events.out.tfevents*")), "tensorboard events missing"

    unet = UNet2DConditionModel.from_pretrained(run / "final" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    changed = any(not torch.equal(a, b) for a, b in zip(unet.state_dict().values(), base.state_dict().values()))
    assert changed, "training did not change the UNet"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, unet=unet)
    images = sample_one(pipe)
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


@pytest.mark.slow
def test_lora_through_cli_exports_weights_that_load_lora_weights_reads(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    from diffusers import StableDiffusionXLPipeline

    config = tiny_config(tmp_path, tiny_sdxl_dir, pickapic_parquet, lora__enabled=True, lora__rank=4, max_steps=2)
    run_cli("train", str(config), "--set", "optim.learning_rate=1e-2")
    lora_dir = tmp_path / "run" / "final" / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    before = sample_one(pipe)
    pipe.load_lora_weights(str(lora_dir))
    after = sample_one(pipe)
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after), "the trained LoRA did not change the samples"


@pytest.mark.slow
def test_two_process_accelerate_launch_keeps_replicas_identical(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    """gloo DDP with 2 processes: replicas agree, and the offloaded optimizer gives the same weights bitwise."""
    digests = {}
    for offload in (False, True):
        run_dir = tmp_path / f"offload_{offload}"
        run_dir.mkdir()
        config = tiny_config(run_dir, tiny_sdxl_dir, pickapic_parquet, max_steps=2, train_batch_size=1, checkpoint_every=0,
                             report_to="none", optim__offload=offload)
        out = run_dir / "digest.json"
        # accelerate's own launcher starts one process on CPU; torchrun + ACCELERATE_USE_CPU gives gloo DDP
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "tests/helpers/train_tiny.py"), str(config), str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-6000:]
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
        assert ranks[0]["step"] == ranks[1]["step"] == 2
        assert ranks[0]["digest"] == ranks[1]["digest"], f"offload={offload}: the processes ended with different parameters"
        assert (run_dir / "run" / "final" / "unet").is_dir()
        digests[offload] = ranks[0]["digest"]
    assert digests[True] == digests[False], "the offloaded optimizer changed the update"


def test_bad_config_fails_before_loading_with_a_named_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"optim": {"lerning_rate": 1e-5}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2ialign", "train", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.lerning_rate" in proc.stderr and "did you mean 'learning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_time_ids_value_is_a_one_line_config_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"data": {"time_ids": "fixd"}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2ialign", "train", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: data.time_ids: 'fixd' is not allowed (did you mean 'fixed'?); allowed: measured, fixed")


@pytest.mark.slow
def test_dcpo_without_per_image_captions_fails_in_one_line_and_dpo_still_trains(tmp_path, tiny_sdxl_dir):
    """DCPO on a dataset without caption_0/caption_1 used to train on the pair prompt, i.e. as DPO, without a word."""
    from t2ialign.data import write_pickapic_parquet

    parquet = write_pickapic_parquet(tmp_path / "single.parquet", 8, seed=6, with_dual_captions=False)
    config = tiny_config(tmp_path, tiny_sdxl_dir, parquet, max_steps=1, gradient_accumulation_steps=1,
                         checkpoint_every=0, report_to="none", objective__name="dcpo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2ialign", "train", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.image_caption_columns: DCPO conditions each image on its own caption, but the "
                           "dataset has no column 'caption_0', 'caption_1'; available columns: are_different,"), last
    assert "data.image_caption_columns=COLUMN_0,COLUMN_1" in last and "README.md's \"DCPO captions\"" in last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    run_cli("train", str(config), "--set", "objective.name=dpo")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and math.isfinite(records[0]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("objective", ["mapo", "dcpo", "inpo", "sft"])
def test_every_objective_trains_through_the_cli(tmp_path, tiny_sdxl_dir, pickapic_parquet, objective, lora):
    reference_free = objective in ("mapo", "sft")
    config = tiny_config(tmp_path, tiny_sdxl_dir, pickapic_parquet, reference_dtype=None if reference_free else "fp32",
                         max_steps=2, gradient_accumulation_steps=1, checkpoint_every=0, report_to="none",
                         lora__enabled=lora, lora__rank=4, objective__name=objective)
    run_cli("train", str(config))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    manifest = json.loads((run / "final" / "export.json").read_text())
    assert manifest["objective"] == objective and manifest["kind"] == ("lora" if lora else "unet")
