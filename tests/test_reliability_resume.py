"""Issue 8 — reliability of training runs: crash-safe resume, atomic checkpoints, safe formats, non-finite steps.

Training runs go through the real CLI (or the Python API through tests/helpers) in subprocesses on the
tiny SDXL fixture. Crashes are real SIGKILLs, placed with the test hook ``T2IALIGN_TEST_KILL``
(``micro_step:<m>``: before micro-step m; ``save:<step>``: half-way through writing that checkpoint;
see t2ialign/training/checkpoint.py). The bad-step run trains on data carrying malformed rows of every kind.
Malformed configs, YAML, dataset rows and model sources: tests/test_reliability_inputs.py.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import (REPO, assert_only_safe_files, assert_same_trajectory, assert_same_weights, checkpoints, cli,
                          killed, metrics, ok, run, write_config)

from t2ialign.errors import UserFacingError


# ---------------------------------------------------------------- resume after SIGKILL (single process)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_sdxl_dir, pickapic_parquet):
    """The uninterrupted run: 4 optimizer steps x 2 micro-batches, a checkpoint every step, keep the last 2."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "config.yaml", tiny_sdxl_dir, pickapic_parquet, root / "run")
    ok(cli("train", str(config)))
    return root / "run"


@pytest.mark.slow
def test_sigkill_mid_accumulation_resumes_on_the_identical_trajectory(reference_run, tmp_path, tiny_sdxl_dir, pickapic_parquet):
    config = write_config(tmp_path / "config.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "run")
    run_dir = tmp_path / "run"

    # SIGKILL before micro-step 7: the second micro-batch of optimizer step 4 (gradients half accumulated)
    killed(cli("train", str(config), kill="micro_step:7"))
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    assert checkpoints(run_dir) == ["checkpoint-00000002", "checkpoint-00000003"]
    state = json.loads((run_dir / "checkpoint-00000003/trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["micro_step"] == 6  # on an optimizer-step boundary

    proc = ok(cli("train", str(config), "--set", "resume=latest"))
    assert "checkpoint-00000003 at step 3 (micro-step 6)" in proc.stderr
    assert_same_trajectory(metrics(reference_run), metrics(run_dir))
    assert_same_weights(reference_run, run_dir)
    assert checkpoints(run_dir) == ["checkpoint-00000003", "checkpoint-00000004"]  # keep_last_checkpoints=2
    for name in ("model.safetensors", "optimizer.safetensors"):  # the re-done checkpoint equals the uninterrupted one
        assert (run_dir / "checkpoint-00000004" / name).read_bytes() == (reference_run / "checkpoint-00000004" / name).read_bytes()


@pytest.mark.slow
def test_keep_last_checkpoints_and_safe_formats(reference_run):
    # 4 saves (every step), keep_last_checkpoints=2: only the two newest remain
    assert checkpoints(reference_run) == ["checkpoint-00000003", "checkpoint-00000004"]
    ckpt = reference_run / "checkpoint-00000004"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.yaml", "lr_scheduler.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng_state_0.json", "rng_state_0.safetensors", "trainer_state.json"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["micro_step"] == 8 and state["format"] == "t2ialign-safetensors-v1"
    assert_only_safe_files(reference_run)


def test_the_package_never_unpickles():
    """Every torch.load passes weights_only=True; nothing imports pickle or writes with torch.save."""
    offenders = []
    for file in (REPO / "t2ialign").rglob("*.py"):
        text = file.read_text()
        for match in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{file}: {match.group(0)}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M) or "torch.save(" in text:
            offenders.append(f"{file}: pickle / torch.save")
    assert not offenders, offenders


# ---------------------------------------------------------------- checkpoint directory states (no training)


def test_resume_latest_ignores_and_removes_incomplete_checkpoints(tmp_path):
    from t2ialign.training.checkpoint import STATE_FILE, list_checkpoints, remove_incomplete, resolve_resume, truncate_metrics

    complete = tmp_path / "checkpoint-00000002"
    complete.mkdir()
    (complete / STATE_FILE).write_text("{}")
    half = tmp_path / "checkpoint-00000004.tmp"  # a save that crashed (even one that got as far as the state file)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    (half / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-00000006").mkdir()  # no trainer_state.json: not a checkpoint
    (tmp_path / "checkpoint-00000001.deleting").mkdir()  # a prune that crashed

    assert resolve_resume(tmp_path, "latest") == complete
    assert list_checkpoints(tmp_path) == [complete]
    assert sorted(p.name for p in remove_incomplete(tmp_path)) == ["checkpoint-00000001.deleting", "checkpoint-00000004.tmp"]
    assert not half.exists() and complete.exists()
    with pytest.raises(UserFacingError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-00000006"))

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    assert truncate_metrics(log, 2) == 2  # step 3 and the torn last line
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_optimizer_and_rng_state_round_trip_through_safetensors_and_json(tmp_path):
    import random

    import numpy as np
    import torch

    from t2ialign.training.checkpoint import load_state_dict, rng_state, save_state_dict, set_rng_state

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        optimizer.step()
    save_state_dict(optimizer.state_dict(), tmp_path, "optimizer")
    restored = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=5.0)
    restored.load_state_dict(load_state_dict(tmp_path, "optimizer"))
    a, b = optimizer.state_dict(), restored.state_dict()
    assert a["param_groups"] == b["param_groups"] and b["param_groups"][0]["betas"] == (0.9, 0.99)
    for index in a["state"]:
        for key, value in a["state"][index].items():
            assert torch.equal(value, b["state"][index][key])

    save_state_dict(rng_state(), tmp_path, "rng")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(load_state_dict(tmp_path, "rng"))
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])
    assert_only_safe_files(tmp_path)


# ---------------------------------------------------------------- resume after SIGKILL (2 processes)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_processes(config: Path, out: Path, *extra, kill=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests/helpers/train_tiny.py"), str(config), str(out), *extra]
    return run(cmd, kill=kill, extra_env={"ACCELERATE_USE_CPU": "1"})


@pytest.mark.slow
def test_two_process_run_killed_during_a_save_resumes_on_the_identical_trajectory(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    common = dict(train_batch_size=1, checkpoint_every=2)
    ref_cfg = write_config(tmp_path / "ref.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "ref", **common)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "run", **common)
    run_dir = tmp_path / "run"
    ok(two_processes(ref_cfg, tmp_path / "ref.json"))

    # SIGKILL half-way through writing checkpoint 4 (weights written, the rest not); steps 3 and 4 are already logged
    killed(two_processes(cfg, tmp_path / "run.json", kill="save:4"))
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    assert checkpoints(run_dir) == ["checkpoint-00000002", "checkpoint-00000004.tmp"]
    assert (run_dir / "checkpoint-00000004.tmp/model.safetensors").is_file()
    assert not (run_dir / "checkpoint-00000004.tmp/trainer_state.json").exists()
    assert {p.name for p in (run_dir / "checkpoint-00000002").glob("rng_state_*.safetensors")} == {
        "rng_state_0.safetensors", "rng_state_1.safetensors"}

    # resume: the last complete checkpoint is 2; the .tmp is removed; the log's steps 3-4 are dropped, then redone
    proc = ok(two_processes(cfg, tmp_path / "run.json", "--set", "resume=latest"))
    assert "removed incomplete checkpoint directory" in proc.stderr and not list(run_dir.glob("*.tmp"))
    assert checkpoints(run_dir) == ["checkpoint-00000002", "checkpoint-00000004"]
    assert_same_trajectory(metrics(tmp_path / "ref"), metrics(run_dir))
    assert_same_weights(tmp_path / "ref", run_dir)
    digests = [json.loads(Path(f"{tmp_path}/{name}.json.rank{r}").read_text())["digest"] for name in ("ref", "run") for r in (0, 1)]
    assert len(set(digests)) == 1, "replicas or runs ended with different parameters"


# ---------------------------------------------------------------- non-finite loss / gradients


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_sdxl_dir):
    from t2ialign.data import BAD_ROW_KINDS, write_pickapic_parquet

    # the data carries one malformed row of every kind: training skips/converts them and goes on
    parquet = write_pickapic_parquet(tmp_path / "bad.parquet", 30, seed=3, bad_rows={k: 1 for k in BAD_ROW_KINDS})
    config = write_config(tmp_path / "config.yaml", tiny_sdxl_dir, parquet, tmp_path / "run",
                          objective__name="flaky_dpo", model__reference_dtype="fp32", max_steps=8,
                          gradient_accumulation_steps=1, max_bad_steps=2, keep_last_checkpoints=10, data__min_image_size=16)
    # micro-step (= optimizer step - 1) -> defect: step 2 NaN gradients with a finite loss, step 4 an infinite
    # loss with finite gradients, step 5 a NaN loss -> 2 consecutive bad steps = max_bad_steps: stop after step 5
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"1": "nan_grad", "3": "inf_loss", "4": "nan_loss"}))
    proc = run([sys.executable, str(REPO / "tests/helpers/flaky_objective_train.py"), str(config), str(plan)])

    assert proc.returncode == 2, proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopping at step 5: 2 consecutive optimizer steps had non-finite loss or gradients")
    assert "max_bad_steps=2" in last and "non-finite loss (nan) at step 5" in last
    assert "step 2: non-finite gradient norm (nan); update skipped" in proc.stderr
    assert "step 4: non-finite loss (inf); update skipped" in proc.stderr

    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["bad_steps"] for r in records] == [0, 1, 1, 2, 3]
    assert [r["skipped_steps"] for r in records] == [0, 1, 0, 1, 1]
    import math

    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)  # the log never holds nan/inf
    assert "loss" not in records[1] and math.isfinite(records[2]["loss"])  # step 3 trains on intact weights

    # a skipped step leaves the weights and the optimizer untouched; a good one changes them
    def blob(step, name="model.safetensors"):
        return (tmp_path / f"run/checkpoint-{step:08d}" / name).read_bytes()

    assert blob(1) == blob(2) and blob(3) == blob(4) and blob(2) != blob(3)
    assert blob(3, "optimizer.safetensors") == blob(4, "optimizer.safetensors")
    assert json.loads((tmp_path / "run/checkpoint-00000004/trainer_state.json").read_text())["bad_steps_consecutive"] == 1
