"""Issue 8 — reliability: crash-safe resume, atomic checkpoints, non-finite steps, validation, safe formats.

Training runs go through the real CLI (or the Python API through tests/helpers) in subprocesses on the
tiny SDXL fixture. Crashes are real SIGKILLs, placed with the test hook ``T2IALIGN_TEST_KILL``
(``micro_step:<m>``: before micro-step m; ``save:<step>``: half-way through writing that checkpoint;
see t2ialign/training/checkpoint.py).

Dataset rows: malformed rows of every kind (``write_pickapic_parquet(bad_rows=...)``) are covered by
tests/test_data.py (counted under their source rows, strict mode naming the row and cause, full
batches); here a hypothesis test draws random mixes of them, and the bad-step run trains on them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.configs import with_overrides
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2ialign.config import ConfigError, load_train_config
from t2ialign.preflight import check_model_source
from t2ialign.errors import DataError, ModelNotFoundError, UserFacingError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("T2IALIGN_TEST_KILL", None)


# ---------------------------------------------------------------- helpers

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
    assert names == ["lr_scheduler.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
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


# ---------------------------------------------------------------- configuration: one message naming the key


BASE = {
    "model": {"pretrained": "/models/sdxl"},
    "data": {"dataset": "/data/pickapic.parquet", "resolution": 64},
    "objective": {"name": "dpo"},
    "output_dir": "/tmp/run",
}


def with_(**changes) -> dict:
    raw = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        node = raw
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return raw


CASES = [
    # unknown keys, with a did-you-mean
    (with_(optim__lerning_rate=1e-5), ["optim.lerning_rate", "did you mean 'learning_rate'"]),
    (with_(max_step=10), ["max_step", "did you mean 'max_steps'"]),
    (with_(lora__rnak=4), ["lora.rnak", "did you mean 'rank'"]),
    ({**BASE, 7: 1}, ["unknown config key '7'"]),
    # wrong types
    (with_(max_steps="ten"), ["max_steps", "expected an integer"]),
    (with_(max_steps=2.5), ["max_steps", "expected an integer"]),
    (with_(optim__learning_rate="fast"), ["optim.learning_rate", "expected a number"]),
    (with_(lora__enabled="maybe"), ["lora.enabled", "true or false"]),
    (with_(data__image_columns={"a": 1}), ["data.image_columns", "expected a list"]),
    (with_(data__image_columns=[1, 2]), ["data.image_columns", "list of non-empty strings"]),
    (with_(model=5), ["model", "expected a mapping"]),
    (with_(objective__params=[1]), ["objective.params", "expected a mapping"]),
    (with_(seed=None), ["seed", "null is not allowed"]),
    # values out of range
    (with_(optim__learning_rate=float("nan")), ["optim.learning_rate", "finite"]),
    (with_(optim__max_grad_norm=float("inf")), ["optim.max_grad_norm", "finite"]),
    (with_(lora__rank=0), ["lora.rank", "must be positive"]),
    (with_(lora__rank=-4), ["lora.rank", "must be positive"]),
    (with_(data__resolution=30), ["data.resolution", "multiple of 8"]),
    (with_(data__prompt_dropout=1.0), ["data.prompt_dropout", "[0, 1)"]),
    (with_(optim__adam_beta2=1.0), ["optim.adam_beta2", "[0, 1)"]),
    (with_(keep_last_checkpoints=0), ["keep_last_checkpoints", "at least 1"]),
    (with_(max_bad_steps=0), ["max_bad_steps", "at least 1"]),
    (with_(checkpoint_every=-1), ["checkpoint_every", ">= 0"]),
    (with_(seed=-1), ["seed", "2**32"]),
    (with_(data__label_columns=["label_0"]), ["data.label_columns", "exactly two"]),
    (with_(lora__enabled=True, lora__target_modules=[]), ["lora.target_modules", "at least one"]),
    # choices
    (with_(mixed_precision="fp8"), ["mixed_precision", "allowed: no, fp16, bf16"]),
    (with_(optim__optimizer="adam"), ["optim.optimizer", "did you mean 'adamw'", "allowed: adamw, adamw8bit, adafactor"]),
    (with_(objective__name="dpoo"), ["objective.name", "did you mean 'dpo'", "available:"]),
    # impossible combinations
    (with_(objective__name="mapo", model__reference_dtype="bf16"), ["model.reference_dtype", "'mapo' is reference-free", "dpo"]),
    (with_(objective__name="sft", objective__beta=10), ["objective.beta", "'sft' has no beta"]),
    (with_(objective__beta=-5), ["objective.beta", "must be positive"]),
    (with_(objective__name="mapo", objective__params={"snr_valeu": 1}), ["objective.params.snr_valeu", "did you mean 'snr_value'", "allowed:"]),
    (with_(objective__name="mapo", objective__params={"snr_value": "high"}), ["objective.params.snr_value", "finite number"]),
]


@pytest.mark.parametrize("raw, expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_malformed_configs_give_one_message_naming_the_key(raw, expected):
    with pytest.raises(ConfigError) as error:
        load_train_config(data=raw)
    message = str(error.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_malformed_yaml_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    for override, key in [("max_steps", "--set expects key=value"), ("max_steps=[", "--set max_steps"),
                          ("model.pretrained.x=1", "'pretrained' is not a section"), ("optim.lr=1", "optim.lr")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_train_config(good, [override])


KEYS = ["model", "model.pretrained", "model.reference_dtype", "model.attention", "model.variant", "data", "data.resolution",
        "data.image_columns", "data.prompt_dropout", "data.max_rows", "lora", "lora.enabled", "lora.rank", "lora.alpha",
        "lora.dropout", "lora.target_modules", "objective", "objective.name", "objective.beta", "objective.params",
        "optim", "optim.learning_rate", "optim.optimizer", "optim.adam_beta1", "optim.warmup_steps", "optim.lr_scheduler",
        "max_steps", "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "checkpoint_every",
        "keep_last_checkpoints", "resume", "seed", "max_bad_steps", "report_to", "progress_bar", "bogus", "optim.bogus"]
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["dpo", "mapo", "sft", "inpo", "bf16", "fp16", "adamw", "true", "1e-5", "8", ""]),
    st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.floats(), st.text(max_size=4)), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), JUNK, min_size=1, max_size=4))
def test_fuzzed_configs_either_validate_or_name_a_changed_key(changes):
    raw = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        node, parts = raw, dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    try:
        config = load_train_config(data=raw)
    except ConfigError as exc:  # any other exception fails the test: nothing escapes unexplained
        message = str(exc)
        assert "\n" not in message and message
        assert any(key in message for key in changes), f"{message!r} names none of {sorted(changes)}"
    else:
        assert config.max_steps > 0 and config.lora.rank > 0


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_fuzzed_yaml_text_never_escapes(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "replace"))
    try:
        load_train_config(path)
    except ConfigError as exc:
        assert str(exc)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["truncated_jpeg", "undecodable", "cmyk", "palette", "grayscale", "rgba",
                                        "tiny_image", "empty_caption", "tie"]), st.integers(1, 2), min_size=1, max_size=5),
       st.booleans())
def test_fuzzed_bad_rows_are_skipped_or_named(tmp_path_factory, bad_rows, strict):
    """Random mixes of malformed rows: non-strict reading never raises; strict mode raises a DataError naming the row."""
    from t2ialign.config import DataConfig
    from t2ialign.data import build_preference_pairs, write_pickapic_parquet

    path = write_pickapic_parquet(tmp_path_factory.mktemp("rows") / "rows.parquet", 16, seed=5, bad_rows=bad_rows)
    config = DataConfig(dataset=str(path), resolution=16, min_image_size=16, strict=strict)
    try:
        pairs = build_preference_pairs(config)
        samples = [pairs[i] for i in range(len(pairs))]
    except DataError as exc:
        assert strict, f"non-strict reading raised {exc}"
        assert re.search(r"row \d+ \(source row \d+\): \w+", str(exc)), str(exc)  # the row and the cause
    else:
        assert all(s["pixel_values"].shape[-1] == 16 for s in samples)
        if not strict:
            assert pairs.report.summary()


# ---------------------------------------------------------------- model checks before loading


def scheduler_only_copy(tiny_sdxl_dir, target: Path, **scheduler_changes) -> Path:
    """model_index.json + scheduler config only (no weights at all): a check that passes must not have loaded any."""
    (target / "scheduler").mkdir(parents=True)
    shutil.copy(Path(tiny_sdxl_dir) / "model_index.json", target / "model_index.json")
    config = json.loads((Path(tiny_sdxl_dir) / "scheduler/scheduler_config.json").read_text())
    (target / "scheduler/scheduler_config.json").write_text(json.dumps({**config, **scheduler_changes}))
    return target


def test_inversion_objective_with_a_v_prediction_model_is_rejected_before_loading(tmp_path, tiny_sdxl_dir):
    vpred = scheduler_only_copy(tiny_sdxl_dir, tmp_path / "vpred", prediction_type="v_prediction")
    config = load_train_config(data=with_(model__pretrained=str(vpred), objective__name="inpo"))
    with pytest.raises(ConfigError) as error:
        check_model_source(config)
    message = str(error.value)
    assert "objective.name" in message and "'inpo'" in message and "v_prediction" in message
    assert "allowed prediction_type for 'inpo': epsilon" in message and "dpo" in message
    check_model_source(load_train_config(data=with_(model__pretrained=str(vpred), objective__name="dpo")))  # fine

    sample = scheduler_only_copy(tiny_sdxl_dir, tmp_path / "sample", prediction_type="sample")
    with pytest.raises(ConfigError, match="prediction_type 'sample'; allowed: epsilon, v_prediction"):
        check_model_source(load_train_config(data=with_(model__pretrained=str(sample))))
    flow = scheduler_only_copy(tiny_sdxl_dir, tmp_path / "flow", _class_name="FlowMatchEulerDiscreteScheduler")
    with pytest.raises(ConfigError, match="flow matching"):
        check_model_source(load_train_config(data=with_(model__pretrained=str(flow))))


def test_model_source_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model.pretrained: directory .*missing does not exist"):
        check_model_source(load_train_config(data=with_(model__pretrained=str(tmp_path / "missing"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a diffusers pipeline directory"):
        check_model_source(load_train_config(data=with_(model__pretrained=str(tmp_path / "empty"))))
    config = load_train_config(data=with_(model__pretrained="nobody/no-such-sdxl", model__local_files_only=True))
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache.*model.local_files_only=true.*huggingface-cli download"):
        check_model_source(config)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def test_cli_entry_point_gives_one_line_for_missing_files_and_an_incompatible_scheduler(
    tmp_path, tiny_sdxl_dir, pickapic_parquet, capsys
):
    """In-process through t2ialign.cli.main (exit code and stderr as a user sees them; an escaping exception fails)."""
    from t2ialign.cli import main

    def train_with(pretrained, **extra):
        config = write_config(tmp_path / "config.yaml", pretrained, pickapic_parquet, tmp_path / "run", **extra)
        code = main(["train", str(config)])
        err = capsys.readouterr().err
        assert code == 2, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err
        return errors[0]

    line = train_with(tmp_path / "no_such_dir")
    assert "model.pretrained: directory" in line and "no_such_dir does not exist" in line and "hub id" in line
    vpred = scheduler_only_copy(tiny_sdxl_dir, tmp_path / "vpred", prediction_type="v_prediction")
    line = train_with(vpred, objective__name="inpo")
    assert line.startswith("error: objective.name: 'inpo' runs DDIM inversion") and "allowed prediction_type" in line
    line = train_with(vpred, objective__name="mapo")  # reference_dtype is set by write_config: mapo has no reference
    assert line.startswith("error: model.reference_dtype: objective 'mapo' is reference-free")

    # configs and scheduler are there, the UNet weights are not: the loader's message, still one line
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sdxl_dir, partial)
    for weights in (partial / "unet").glob("*.safetensors"):
        weights.unlink()
    line = train_with(partial)
    assert "UNet" in line and str(partial) in line and "Fix:" in line


@pytest.mark.slow
def test_cli_offline_hub_id_is_one_line_in_a_real_process(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    def train_with(pretrained, **extra):
        config = write_config(tmp_path / "config.yaml", pretrained, pickapic_parquet, tmp_path / "run", **extra)
        return cli("train", str(config), extra_env={"HF_HOME": str(tmp_path / "hf")})

    line = one_line_error(train_with("nobody/no-such-sdxl-model"))  # HF_HUB_OFFLINE=1, empty cache
    assert "'nobody/no-such-sdxl-model'" in line and "HF_HUB_OFFLINE=1" in line
    assert "huggingface-cli download nobody/no-such-sdxl-model --local-dir DIR" in line and "model.pretrained=DIR" in line

