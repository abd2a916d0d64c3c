"""Run helpers shared by the reliability, config and offload tests: configs, CLI subprocesses, run checks.

Training runs go through the real CLI (``cli``) or a helper script (``run``) in subprocesses, with the test
hook ``T2IALIGN_TEST_KILL`` for real SIGKILLs (see t2ialign/training/checkpoint.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers.configs import with_overrides

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("T2IALIGN_TEST_KILL", None)


def write_config(path: Path, pipeline_dir, parquet, output_dir, **extra) -> Path:
    config = {
        "model": {"pretrained": str(pipeline_dir), "reference_dtype": "fp32"},
        "data": {"dataset": str(parquet), "resolution": 32, "prompt_dropout": 0.2},
        "objective": {"name": "dpo"},
        "optim": {"learning_rate": 1e-4, "warmup_steps": 1},
        "output_dir": str(output_dir),
        "max_steps": 4,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "checkpoint_every": 1,
        "keep_last_checkpoints": 2,
        "log_every": 1,
        "report_to": "none",
        "progress_bar": False,
    }
    with_overrides(config, extra)
    path.write_text(yaml.safe_dump(config))
    return path


def run(cmd, *, kill: str | None = None, extra_env=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**ENV, **(extra_env or {})}
    if kill:
        env["T2IALIGN_TEST_KILL"] = kill
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "t2ialign", *args], **kwargs)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def killed(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    # a direct child killed by SIGKILL reports -9; torchrun reports its failed worker with exit code 1
    assert proc.returncode in (-9, 1), f"expected a SIGKILL, got exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "T2IALIGN_TEST_KILL" in proc.stderr, proc.stderr[-4000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint-*"))


def assert_same_trajectory(reference: list[dict], resumed: list[dict]):
    assert [r["step"] for r in resumed] == [r["step"] for r in reference], "steps differ (duplicates or gaps?)"
    for a, b in zip(reference, resumed):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
            else:
                assert a[key] == b[key], (a["step"], key)


def assert_same_weights(dir_a: Path, dir_b: Path):
    from safetensors.torch import load_file

    file = "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(dir_a / "final/unet" / file)), load_file(str(dir_b / "final/unet" / file))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"final UNet weights differ by up to {worst}"


PICKLE_OR_ZIP = (b"\x80", b"PK\x03\x04")


def assert_only_safe_files(run_dir: Path):
    """Everything written is safetensors / JSON / JSONL / YAML, and nothing is a pickle or torch.save zip."""
    for file in run_dir.rglob("*"):
        if file.is_file():
            assert file.suffix in {".safetensors", ".json", ".jsonl", ".yaml"}, f"unexpected file {file}"
            assert not file.read_bytes()[:4].startswith(PICKLE_OR_ZIP), f"{file} looks like a pickle / torch.save file"



def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]

