"""A run's directory is its own: the run lock, no new run over an old one, the config checked on resume.

The end-to-end tests run the real CLI in subprocesses on the tiny SDXL fixture (tests/helpers/runs.py);
the others drive t2ialign.training.run_dir / config_check directly. Signals: tests/test_signals.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers.runs import (ENV, REPO, assert_same_trajectory, checkpoints, cli, metrics, ok, one_line_error,
                          write_config)

from t2ialign.config import load_train_config
from t2ialign.training.config_check import ConfigChanged, check_resume_config, config_diff, kind_of
from t2ialign.training.run_dir import (LOCK_FILE, RunDirBusy, RunDirTaken, RunLock, check_new_run, delete_previous_run,
                                       open_run_dir)

MAIN = SimpleNamespace(is_main_process=True, num_processes=1)  # what open_run_dir needs of an accelerator

# a child that takes the lock of DIR the way train() does, forks a grandchild that keeps running, then SIGKILLs itself
KILLED_HOLDER = """
import os, signal, sys, time
from t2ialign.training.run_dir import RunLock
RunLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # like a DataLoader worker: it shares the lock's open file
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1), os.dup2(null, 2)  # so that the test's pipes close when the holder dies
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def plant_stale_lock():
    """Leaves in a directory the lock file of a SIGKILLed holder, whose forked child still runs; returns its pid."""
    children = []

    def plant(directory: Path) -> int:
        Path(directory).mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-c", KILLED_HOLDER, str(directory)], env=ENV, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL and proc.stdout.strip().isdigit(), proc.stderr[-3000:]
        children.append(int(proc.stdout))
        return json.loads((Path(directory) / LOCK_FILE).read_text())["pid"]

    yield plant
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def train_config(tmp_path, **extra):
    raw = {"model": {"pretrained": "unused"}, "data": {"dataset": "unused"}, "output_dir": str(tmp_path / "run"),
           "report_to": "none", **extra}
    return load_train_config(data=raw)


# ---------------------------------------------------------------- the lock


def test_a_second_holder_is_refused_with_the_first_ones_pid_host_and_start(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunDirBusy) as refused:
        RunLock(tmp_path).acquire()  # another open file of the same process conflicts as another process would
    message = str(refused.value)
    assert f"is in use by another t2ialign run: pid {os.getpid()} on {socket.gethostname()} since " in message
    assert "wait for it to finish or stop it, or choose another output_dir" in message and "\n" not in message
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    again = RunLock(tmp_path)
    assert again.acquire() is None  # a released lock is not stale: no takeover to report
    again.release()


def test_a_sigkilled_holders_lock_is_taken_over_even_while_its_forked_child_lives(tmp_path, caplog, plant_stale_lock):
    pid = plant_stale_lock(tmp_path / "run")
    with caplog.at_level("INFO", logger="t2ialign.training.run_dir"):
        start, lock = open_run_dir(train_config(tmp_path), MAIN)
    try:
        assert start.event == "new" and lock.fd is not None
        assert f"taking over the lock of a run that is no longer running (pid {pid} on " in caplog.text
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


# ---------------------------------------------------------------- a new run over an old one


def test_new_run_over_a_run_is_refused_and_overwrite_deletes_only_the_runs_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-00000002").mkdir(parents=True)
    (run / "checkpoint-00000002/trainer_state.json").write_text("{}")
    (run / "checkpoint-00000004.tmp").mkdir()
    (run / "final").mkdir()
    for name in ("metrics.jsonl", "config.yaml", "runs.jsonl", "notes.txt"):
        (run / name).write_text(name)
    assert check_new_run(tmp_path / "empty", overwrite=False) == []
    with pytest.raises(RunDirTaken, match=r"already holds a run \(checkpoint-00000002, final/, metrics.jsonl, config.yaml\); "
                                          r"continue it with --set resume=latest, replace it with --overwrite"):
        check_new_run(run, overwrite=False)
    delete_previous_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "runs.jsonl"]  # the history and foreign files stay


def test_resume_latest_without_a_checkpoint_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        start, lock = open_run_dir(train_config(tmp_path, resume="latest"), MAIN)
    lock.release()
    assert start.event == "resume" and start.resume_from is None
    assert f"no checkpoint in {tmp_path / 'run'}: starting from step 0" in caplog.text


# ---------------------------------------------------------------- the config on resume


def test_config_differences_are_classed_state_free_or_other():
    assert [kind_of(k) for k in ("lora.rank", "objective.params", "model.pretrained", "seed", "optim.optimizer",
                                 "mixed_precision", "data.dataset")] == ["state"] * 7
    assert [kind_of(k) for k in ("max_steps", "log_every", "data.num_workers", "report_to")] == ["free"] * 4
    assert [kind_of(k) for k in ("optim.learning_rate", "train_batch_size", "data.resolution")] == ["other"] * 3
    saved = {"lora": {"enabled": False, "rank": 8}, "max_steps": 4, "output_dir": "a", "objective": {"params": {"x": 1}}}
    now = {"lora": {"enabled": False, "rank": 4}, "max_steps": 8, "output_dir": "b", "objective": {"params": {}},
           "added_in_a_later_version": 1}
    # an unused LoRA's settings, the run's location and fields one version does not know are not differences
    assert config_diff(saved, now) == {"max_steps": [4, 8], "objective.params": [{"x": 1}, {}]}


def test_resume_refuses_state_changes_even_with_allow_config_change_and_lists_them_all(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-00000002"
    ckpt.mkdir(parents=True)
    base = {"lora": {"enabled": True, "rank": 8}, "optim": {"learning_rate": 1e-4}}
    from t2ialign.config import to_dict

    (ckpt / "config.yaml").write_text(yaml.safe_dump(to_dict(train_config(tmp_path, **base))))
    changed = train_config(tmp_path, lora={"enabled": True, "rank": 4}, optim={"learning_rate": 1e-3}, max_steps=9,
                           allow_config_change=True)
    with pytest.raises(ConfigChanged) as refused:
        check_resume_config(changed, ckpt)
    assert str(refused.value).splitlines()[1:] == ["  lora.rank: 8 -> 4 (changes the model or its state)"]
    allowed = train_config(tmp_path, lora=base["lora"], optim={"learning_rate": 1e-3}, max_steps=9, allow_config_change=True)
    assert check_resume_config(allowed, ckpt) == {"max_steps": [2000, 9], "optim.learning_rate": [1e-4, 1e-3]}


# ---------------------------------------------------------------- end to end, through the CLI


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sdxl_dir, pickapic_parquet):
    """A finished LoRA run, alone: 8 steps, a checkpoint every 4."""
    root = tmp_path_factory.mktemp("alone")
    config = write_config(root / "config.yaml", tiny_sdxl_dir, pickapic_parquet, root / "run", **LORA)
    ok(cli("train", str(config)))
    return config, root / "run"


LORA = dict(max_steps=8, checkpoint_every=4, lora__enabled=True, lora__rank=4, optim__learning_rate=1e-3)


def assert_same_lora(dir_a: Path, dir_b: Path):
    from safetensors.torch import load_file

    file = "final/lora/pytorch_lora_weights.safetensors"
    a, b = load_file(str(dir_a / file)), load_file(str(dir_b / file))
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) <= 1e-6 for k in a)


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run`` and a config that trains into it (the same settings otherwise)."""
    shutil.copytree(run, tmp_path / "run")
    raw = yaml.safe_load((run.parent / "config.yaml").read_text())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "run")}))
    return config, tmp_path / "run"


def test_a_second_run_on_a_busy_directory_is_refused_and_the_first_is_unaffected(lora_run, tmp_path, tiny_sdxl_dir,
                                                                                  pickapic_parquet):
    config = write_config(tmp_path / "config.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / "run", **LORA)
    log = open(tmp_path / "first.log", "w+")  # a file, not a pipe: a full pipe would block the first run
    first = subprocess.Popen([sys.executable, "-m", "t2ialign", "train", str(config)], cwd=REPO, env=ENV,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run/metrics.jsonl").is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-run, for as long as the second one takes
        started = time.monotonic()
        second = cli("train", str(config), timeout=120)
        waited = time.monotonic() - started
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(timeout=300)
    line = one_line_error(second)
    assert f"is in use by another t2ialign run: pid {first.pid} on {socket.gethostname()} since " in line, line
    assert waited < 60
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-4000:]
    assert_same_trajectory(metrics(lora_run[1]), metrics(tmp_path / "run"))
    assert_same_lora(lora_run[1], tmp_path / "run")


def test_a_new_run_over_a_finished_one_changes_nothing_and_overwrite_replaces_it(lora_run, tmp_path, plant_stale_lock):
    config, run = copy_run(lora_run[1], tmp_path)
    before = tree_digest(run)
    line = one_line_error(cli("train", str(config)))
    assert line == (f"error: output_dir {run} already holds a run (2 checkpoints up to checkpoint-00000008, final/, "
                    "metrics.jsonl, config.yaml); continue it with --set resume=latest, replace it with --overwrite "
                    "(deletes that run), or choose another output_dir")
    assert tree_digest(run) == before

    stale = plant_stale_lock(run)  # as if the old run had been SIGKILLed: its lock is taken over too
    proc = ok(cli("train", str(config), "--overwrite", "--set", "max_steps=2", "--set", "checkpoint_every=0"))
    assert f"taking over the lock of a run that is no longer running (pid {stale} on " in proc.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2] and checkpoints(run) == []
    assert [e["event"] for e in map(json.loads, (run / "runs.jsonl").read_text().splitlines())] == ["new", "overwrite"]
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2
    assert not (run / LOCK_FILE).exists()


def test_resume_with_another_objective_rank_or_beta_is_refused_and_max_steps_may_change(lora_run, tmp_path):
    config, run = copy_run(lora_run[1], tmp_path)
    before = tree_digest(run)
    changed = ["--set", "resume=latest", "--set", "objective.name=dcpo", "--set", "lora.rank=8", "--set", "objective.beta=1000"]
    proc = cli("train", str(config), *changed)
    line = one_line_error(proc)  # no traceback: the ranks are compared before any state is loaded
    assert line.startswith(f"error: resume: the config differs from the one {run / 'checkpoint-00000008'} was trained with")
    assert proc.stderr.strip().splitlines()[-3:] == [
        "  lora.rank: 4 -> 8 (changes the model or its state)",
        "  objective.beta: null -> 1000.0 (changes the model or its state)",
        "  objective.name: dpo -> dcpo (changes the model or its state)",
    ]
    assert tree_digest(run) == before

    proc = ok(cli("train", str(config), "--set", "resume=latest", "--set", "max_steps=10"))
    assert "resume: max_steps changed since checkpoint-00000008: 8 -> 10" in proc.stderr
    assert [r["step"] for r in metrics(run)] == list(range(1, 11))
    assert metrics(run)[:8] == metrics(lora_run[1])
    history = [json.loads(line) for line in (run / "runs.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in history] == [("new", 0), ("resume", 8)]
    assert history[0]["config"]["max_steps"] == 8 and history[1]["changes"] == {"max_steps": [8, 10]}
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 10
    assert yaml.safe_load((run / "checkpoint-00000008/config.yaml").read_text())["max_steps"] == 8
