"""Validation during training (t2ialign.training.validation) and the over-optimisation alarm, on the toy world.

Measured on the shipped toy base (LoRA DPO, 128 pairs, batch 8, lr 5e-3, 16 held-out prompts, seeds fixed):
pairs labelled by ``brightness`` raise brightness (0.215 -> 0.234 by step 60) while the held-out vividness falls
(0.530 at step 10 -> 0.483 at step 60) and fidelity too (0.64 -> 0.55); pairs labelled by ``vividness`` raise it
(0.528 -> 0.552, largest dip from its best 0.012). The alarm below (vividness more than 0.025 under its best while
the loss fell over 2 validations) fires in the first run only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from t2ialign.config import ConfigError, load_train_config
from t2ialign.training import train
from t2ialign.training.validation import check_alarm

STEPS_PER_PAIR_IMAGE = 10


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy base, 128 pairs sampled once and labelled by brightness and by vividness, and held-out prompts."""
    from t2ialign.toy import pairs, pretrain, world

    torch.set_num_threads(1)
    base = pretrain.get_toy_pipeline()
    out = tmp_path_factory.mktemp("validation")
    prompts = world.sample_captions(128, seed=0)
    images = pairs.sample_toy_images(pairs.load_toy_pipeline(base), prompts, seed=0, images_per_prompt=2,
                                     num_inference_steps=STEPS_PER_PAIR_IMAGE)
    labelled = {name: pairs.build_preference_pairs(base, out / f"pairs-{name}", preference=name, prompts=prompts, seed=0,
                                                   num_inference_steps=STEPS_PER_PAIR_IMAGE, images=images)
                for name in ("brightness", "vividness")}
    held_out = world.sample_captions(16, seed=10_000)  # the demo's held-out range: no pair prompt
    return base, labelled, held_out, out


def _config(toy, preference: str, run: str, max_steps: int, validation: dict | None, **extra) -> dict:
    base, labelled, held_out, out = toy
    config = {
        "model": {"pretrained": str(base)},
        "data": {"dataset": str(labelled[preference]), "resolution": 32, "random_flip": False, "prompt_dropout": 0.0},
        "objective": {"name": "dpo", "beta": 2000.0}, "optim": {"learning_rate": 5e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "lora": {"enabled": True, "rank": 8}, "output_dir": str(out / run), "seed": 0, "max_steps": max_steps,
        "train_batch_size": 8, "checkpoint_every": 0, "log_every": 5, "report_to": "tensorboard", "progress_bar": False,
        **extra,
    }
    if validation is not None:
        config["validation"] = {"prompts": held_out, "num_inference_steps": 10, "guidance_scale": 4.0, "batch_size": 16,
                                **validation}
    return config


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _training(records: list[dict]) -> list[dict]:
    return [r for r in records if not r.get("validation") and "alarm" not in r]


ALARM = {"scorer": "toy.vividness", "train_metric": "loss", "window": 2, "threshold": 0.025}


def test_validation_logs_images_and_scores_without_changing_the_training_run(toy, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # max_time_share: any validation exceeds a millionth of the run's time, so the cost warning is due (no timing here)
    validation = {"every": 4, "scorers": ["toy.vividness", "toy.fidelity"], "preference_split": "train", "max_pairs": 16,
                  "max_time_share": 1e-6}
    with caplog.at_level(logging.WARNING, logger="t2ialign.training.validation"):
        with_val = train(load_train_config(data=_config(toy, "vividness", "with-val", 12, validation)))
    # said once, not at every validation, and it changes nothing else (the comparison below)
    assert len([r for r in caplog.records if "validation.max_time_share" in r.getMessage()]) == 1
    without = train(load_train_config(data=_config(toy, "vividness", "without-val", 12, None)))

    records = _records(with_val.output_dir)
    # the training records (loss, lr, implicit_acc, ...) are those of the run without validation, bit for bit
    assert _training(records) == _records(without.output_dir)
    for name, value in with_val.model.state_dict().items():
        assert torch.equal(value, without.model.state_dict()[name]), name
    assert with_val.model.training and not any(  # the policy is handed back in train mode, its modules as before
        m.training != n.training for m, n in zip(with_val.model.modules(), without.model.modules()))

    val = [r for r in records if r.get("validation")]
    assert [r["step"] for r in val] == [0, 4, 8, 12]  # the base at step 0, then every 4 optimizer steps
    for r in val:
        assert {"val/toy.vividness", "val/toy.fidelity", "val/implicit_acc", "val/seconds"} <= set(r)
        assert 0 <= r["val/toy.vividness"] <= 1 and r["val/seconds"] > 0
        step_dir = with_val.output_dir / "validation" / f"step-{r['step']:08d}"
        assert len(list((step_dir / "images").glob("*.png"))) == 16 and (step_dir / "scores.jsonl").is_file()
    assert val[0]["val/implicit_acc"] == 0.5  # the base is its own reference: every margin is 0, a tie

    events = EventAccumulator(str(with_val.output_dir / "logs" / "t2ialign"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"val/toy.vividness", "val/toy.fidelity", "val/implicit_acc", "val/seconds", "loss"} <= set(tags["scalars"])
    logged = {e.step: e.value for e in events.Scalars("val/toy.vividness")}
    assert logged == pytest.approx({r["step"]: r["val/toy.vividness"] for r in val})
    image_tags = [t for t in tags["images"] if t.startswith("val/images")]
    assert image_tags, tags["images"]
    image_steps = {e.step for tag in image_tags for e in events.Images(tag)}
    assert image_steps == {0, 4, 8, 12}


def test_resumed_run_keeps_the_validation_history(toy):
    validation = {"every": 4, "scorers": ["toy.vividness"], "alarm": ALARM}
    whole = train(load_train_config(data=_config(toy, "brightness", "whole", 12, validation)))
    first = _config(toy, "brightness", "resumed", 8, validation, checkpoint_every=8)
    train(load_train_config(data=first))
    resumed = train(load_train_config(data={**first, "max_steps": 12, "resume": "latest"}))

    def comparable(records):  # (the first chunk logs training metrics at its last step, 8: compare validation only)
        return [{k: v for k, v in r.items() if k != "val/seconds"} for r in records if r.get("validation") or "alarm" in r]

    assert comparable(_records(resumed.output_dir)) == comparable(_records(whole.output_dir))
    state = json.loads((resumed.output_dir / "checkpoint-00000008" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["validation"]["history"]] == [0, 4, 8]


def test_over_optimisation_alarm_fires_when_a_held_out_score_falls_and_stops_the_run(toy, caplog):
    validation = {"every": 10, "scorers": ["toy.vividness", "toy.fidelity"], "alarm": {**ALARM, "stop": True}}
    with caplog.at_level(logging.WARNING, logger="t2ialign.training.validation"):
        result = train(load_train_config(data=_config(toy, "brightness", "brightness", 80, validation)))
    alarms = [r for r in _records(result.output_dir) if "alarm" in r]
    assert len(alarms) == 1 and result.alarm == alarms[0]["alarm"]
    alarm = alarms[0]["alarm"]
    assert alarm["scorer"] == "val/toy.vividness" and alarm["now"] < alarm["best"] - 0.025 and alarm["train_to"] < alarm["train_from"]
    assert "over-optimisation: loss fell from" in caplog.text and "while val/toy.vividness fell from" in caplog.text
    # stopped there: a checkpoint and an export of that step, no further training
    assert result.final_step == alarm["step"] < 80
    assert (result.output_dir / f"checkpoint-{alarm['step']:08d}").is_dir() and (result.export_dir / "export.json").is_file()
    assert max(r["step"] for r in _records(result.output_dir)) == alarm["step"]


def test_alarm_stays_silent_when_training_and_validation_agree(toy):
    validation = {"every": 10, "scorers": ["toy.vividness"], "alarm": ALARM}
    result = train(load_train_config(data=_config(toy, "vividness", "vividness", 60, validation, report_to="none")))
    records = _records(result.output_dir)
    assert result.alarm is None and not [r for r in records if "alarm" in r]
    scores = [r["val/toy.vividness"] for r in records if r.get("validation")]
    assert len(scores) == 7 and scores[-1] > scores[0]  # the held-out score it is trained for went up


def test_check_alarm_rule():
    from t2ialign.config.train import AlarmConfig

    def entry(step, loss, score):
        return {"step": step, "scores": {"val/s": score}, "train": {} if loss is None else {"loss": loss}}

    history = [entry(0, None, 0.50), entry(10, 0.7, 0.52), entry(20, 0.6, 0.51), entry(30, 0.5, 0.45)]
    alarm = check_alarm(history, AlarmConfig(window=2, threshold=0.05), "val/s")
    assert alarm["best_step"] == 10 and alarm["train_since_step"] == 10 and alarm["message"].startswith(
        "over-optimisation: loss fell from 0.7 to 0.5")
    assert check_alarm(history, AlarmConfig(window=2, threshold=0.1), "val/s") is None  # fell less than the threshold
    assert check_alarm(history, AlarmConfig(window=3, threshold=0.05), "val/s") is None  # not enough validations yet
    rising = [entry(0, None, 0.5), entry(10, 0.5, 0.5), entry(20, 0.6, 0.4)]
    assert check_alarm(rising, AlarmConfig(window=1), "val/s") is None  # the loss rose: not over-optimisation
    acc = [{"step": s, "scores": {"val/s": v}, "train": {"implicit_acc": a}} for s, v, a in ((10, 0.5, 0.6), (20, 0.4, 0.8))]
    assert "implicit_acc rose from 0.6 to 0.8" in check_alarm(acc, AlarmConfig(window=1, train_metric="implicit_acc"), "val/s")["message"]


def test_validation_config_errors():
    def load(**validation):
        return load_train_config(data={"validation": validation})

    assert load().validation.every == 0
    assert load(every=5, prompts="partiprompts", scorers="pickscore,hpsv21").validation.scorers == ["pickscore", "hpsv21"]
    with pytest.raises(ConfigError, match="nothing to validate"):
        load(every=5)
    with pytest.raises(ConfigError, match="validation.prompts"):
        load(every=5, prompts=3)
    with pytest.raises(ConfigError, match="alarm.scorer"):
        load(every=5, prompts=["a cat"], scorers=["pickscore"], alarm={"scorer": "hpsv21"})
    with pytest.raises(ConfigError, match="validation.alarm.threshold"):
        load(every=5, prompts=["a cat"], scorers=["pickscore"], alarm={"threshold": -1})
    with pytest.raises(ConfigError, match="validation.max_time_share"):
        load(every=5, prompts=["a cat"], max_time_share=0)


@pytest.mark.slow
def test_two_processes_split_the_validation_prompts_and_give_one_process_images(toy, tmp_path):
    """Under DDP each rank samples its share of the prompts (per-image seeds: the same images wherever they are
    drawn); the main process gathers one complete, duplicate-free validation whose base images and scores
    equal a one-process run's."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    validation = {"every": 2, "scorers": ["toy.vividness"], "num_inference_steps": 4}
    runs = {}
    for processes in (1, 2):
        config = _config(toy, "vividness", f"ddp-{processes}-{tmp_path.name}", 2, validation, train_batch_size=4,
                         report_to="none")
        path = tmp_path / f"config-{processes}.yaml"
        path.write_text(yaml.safe_dump(config))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
               str(repo / "tests/helpers/train_tiny.py"), str(path), str(tmp_path / f"digest-{processes}.json")]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]
        runs[processes] = Path(config["output_dir"])
    base = {n: runs[n] / "validation" / "step-00000000" for n in runs}
    files = {n: sorted(p.name for p in (base[n] / "images").glob("*.png")) for n in runs}
    assert files[1] == files[2] and len(files[1]) == 16
    assert all((base[1] / "images" / f).read_bytes() == (base[2] / "images" / f).read_bytes() for f in files[1])
    val = {n: [r for r in _records(runs[n]) if r.get("validation")] for n in runs}
    assert [r["step"] for r in val[2]] == [0, 2]
    assert val[2][0]["val/toy.vividness"] == pytest.approx(val[1][0]["val/toy.vividness"], abs=1e-7)
    assert len((base[2] / "scores.jsonl").read_text().splitlines()) == 16
