"""SIGTERM / SIGINT: the run finishes its optimizer step, checkpoints, exits 128 + signal, and resumes exactly.

The end-to-end tests signal real ``t2ialign train`` subprocesses (one process, and two under torchrun) at a
seeded random moment after the first logged step, then resume with ``resume=latest`` and compare the
metrics and final weights with an uninterrupted run (tests/helpers/runs.py). Run directories and locks:
tests/test_run_dir.py.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.runs import ENV, REPO, assert_same_trajectory, assert_same_weights, cli, metrics, ok, write_config

from t2ialign.training.signals import StopRequest, TrainingInterrupted

SIGNALS_PY = REPO / "t2ialign/training/signals.py"
SEED = 20240607

# loads signals.py alone (no torch), installs the handlers, and signals itself twice with the given window
REPEAT = """
import importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("signals", sys.argv[1])
signals = importlib.util.module_from_spec(spec); spec.loader.exec_module(signals)
signum, window = getattr(signal, sys.argv[2]), float(sys.argv[3])
with signals.StopRequest(repeat_window=window) as stop:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)
    os.kill(os.getpid(), signum)
    time.sleep(0.05)
    print("still running; stop requested by", stop.signum, flush=True)
"""


# ---------------------------------------------------------------- the handlers


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal handlers need the main thread")
def test_a_signal_sets_the_flag_and_the_previous_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest(repeat_window=60) as stop:
        assert stop.signum == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat within the window: the same request, no exit
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("name, window, code", [("SIGTERM", 0.0, 143), ("SIGINT", 0.0, 130), ("SIGTERM", 60.0, 0)])
def test_a_repeated_signal_exits_at_once_unless_it_is_a_duplicate_delivery(name, window, code):
    proc = subprocess.run([sys.executable, "-c", REPEAT, str(SIGNALS_PY), name, str(window)], env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    if code:
        assert f"received {name} again: exiting now, without a checkpoint" in proc.stderr
        assert "still running" not in proc.stdout
    else:
        assert f"stop requested by {int(signal.SIGTERM)}" in proc.stdout


def test_the_interruption_carries_the_conventional_exit_code():
    stopped = TrainingInterrupted(signal.SIGTERM, 7, Path("run/checkpoint-00000007"))
    assert stopped.exit_code == 143 and str(stopped) == "received SIGTERM at step 7: checkpoint written to run/checkpoint-00000007"
    assert TrainingInterrupted(signal.SIGINT, 0, None).exit_code == 130


# ---------------------------------------------------------------- end to end, one process


STEPS = dict(max_steps=12, checkpoint_every=5, keep_last_checkpoints=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_sdxl_dir, pickapic_parquet):
    root = tmp_path_factory.mktemp("uninterrupted")
    ok(cli("train", str(write_config(root / "config.yaml", tiny_sdxl_dir, pickapic_parquet, root / "run", **STEPS))))
    return root / "run"


def start(cmd, log: Path, **popen) -> subprocess.Popen:
    # output to a file: a pipe nobody reads while the run trains could fill up and block it
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT, **popen)


def signal_at_random_moment(proc: subprocess.Popen, run_dir: Path, send, seed: int) -> None:
    """After a seeded random number (1-3) of logged steps and a random fraction of a step more, ``send()``."""
    rng = random.Random(seed)
    logged, delay = rng.randint(1, 3), rng.uniform(0.0, 0.15)
    deadline = time.monotonic() + 300
    log = run_dir / "metrics.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= logged:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be signalled"
    time.sleep(delay)
    send()


def stopped_at(log: Path, name: str) -> tuple[int, Path]:
    text = log.read_text()
    found = re.findall(rf"received {name} at step (\d+): checkpoint written to (\S+)", text)
    assert len(found) == 1, text[-6000:]
    assert "again: exiting now" not in text, text[-6000:]
    return int(found[0][0]), Path(found[0][1])


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_and_exits_128_plus_signal_and_the_resume_is_exact(name, uninterrupted, tmp_path,
                                                                                tiny_sdxl_dir, pickapic_parquet):
    config = write_config(tmp_path / "config.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "run", **STEPS)
    run_dir, signum = tmp_path / "run", getattr(signal, name)
    proc = start([sys.executable, "-m", "t2ialign", "train", str(config)], tmp_path / "train.log")
    signal_at_random_moment(proc, run_dir, lambda: proc.send_signal(signum), SEED + signum)
    assert proc.wait(timeout=300) == 128 + signum, (tmp_path / "train.log").read_text()[-6000:]

    step, checkpoint = stopped_at(tmp_path / "train.log", name)
    assert step < STEPS["max_steps"] and checkpoint == run_dir / f"checkpoint-{step:08d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))
    assert not (run_dir / "final").exists() and not (run_dir / ".t2ialign.lock").exists()
    if signum == signal.SIGINT:
        return  # the resume is the same as after SIGTERM

    proc = ok(cli("train", str(config), "--set", "resume=latest"))
    assert f"resumed from {checkpoint} at step {step}" in proc.stderr
    assert_same_trajectory(metrics(uninterrupted), metrics(run_dir))
    assert_same_weights(uninterrupted, run_dir)


# ---------------------------------------------------------------- end to end, two processes


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(config: Path, *extra) -> list[str]:
    # torchrun + ACCELERATE_USE_CPU gives gloo DDP on CPU (accelerate's own launcher starts one process there)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "-m", "t2ialign", "train", str(config), *extra]


ONE_RANK = """
import os, signal
from accelerate import Accelerator
from t2ialign.training.signals import StopRequest, agreed_signal
accelerator = Accelerator(cpu=True)
with StopRequest() as stop:
    if accelerator.process_index == 1:  # only this rank is signalled
        os.kill(os.getpid(), signal.SIGTERM)
    before = agreed_signal(accelerator, StopRequest())
    print(f"rank {accelerator.process_index}: {before} then {agreed_signal(accelerator, stop)}", flush=True)
"""


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "one_rank.py"
    script.write_text(ONE_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script)]
    proc = ok(subprocess.run(cmd, cwd=REPO, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300))
    assert sorted(re.findall(r"rank \d: \d+ then \d+", proc.stdout)) == ["rank 0: 0 then 15", "rank 1: 0 then 15"], proc.stdout


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_both_ranks_at_one_step_and_the_resume_is_exact(tmp_path, tiny_sdxl_dir,
                                                                                           pickapic_parquet):
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    common = dict(STEPS, max_steps=8, train_batch_size=1)
    ref_cfg = write_config(tmp_path / "ref.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "ref", **common)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "run", **common)
    run_dir = tmp_path / "run"
    ok(subprocess.run(torchrun(ref_cfg), cwd=REPO, env=env, capture_output=True, text=True, timeout=600))

    # as a scheduler does: SIGTERM to every process of the job (torchrun forwards it again to its workers)
    log = tmp_path / "train.log"
    proc = subprocess.Popen(torchrun(cfg), cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    signal_at_random_moment(proc, run_dir, lambda: os.killpg(proc.pid, signal.SIGTERM), SEED)
    proc.wait(timeout=300)
    step, checkpoint = stopped_at(log, "SIGTERM")
    assert {p.name for p in checkpoint.glob("rng_state_*.safetensors")} == {"rng_state_0.safetensors", "rng_state_1.safetensors"}
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))

    ok(subprocess.run(torchrun(cfg, "--set", "resume=latest"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600))
    assert_same_trajectory(metrics(tmp_path / "ref"), metrics(run_dir))
    assert_same_weights(tmp_path / "ref", run_dir)
