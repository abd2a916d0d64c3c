"""Smoke test of the peer comparison (scripts/compare_peer_dpo.py --tiny): one seed, no peer script.

It checks that the script runs the demo's pipeline end to end (tiny toy base, pairs, `t2ialign train` in a
subprocess, sampling, win rate over the base) and that its JSON report holds the fields the docs use; never
how well anything trained. The peer command line is checked without running the peer (not shipped here).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare_peer_dpo.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_peer_dpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_comparison_reports_win_rates(tmp_path):
    out = tmp_path / "cmp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--seeds", "0", "--out", str(out), "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((out / "compare.json").read_text())
    assert report["preference"] == "vividness" and report["peer_script"] is None
    assert report["setup"]["num_pairs"] == 32 and report["setup"]["train_steps"] == 2
    (run,) = report["runs"]
    assert run["system"] == "t2ialign" and run["kind"] == "t2ialign" and run["seed"] == 0
    assert 0.0 <= run["ci_low"] <= run["win_rate"] <= run["ci_high"] <= 1.0
    assert run["num_prompts"] == 4
    for name in ("mean_reward", "base_mean_reward", "train_wall_s", "sample_wall_s"):
        assert isinstance(run[name], float) and math.isfinite(run[name]), name
    assert run["train_wall_s"] > 0
    summary = report["summary"]["t2ialign"]
    assert summary["seeds"] == [0] and summary["win_rates"] == [run["win_rate"]]
    assert summary["mean_win_rate"] == run["win_rate"] and summary["ci95_mean_win_rate"] is None
    # the t2ialign run trained with the demo's DPO recipe and the comparison's shared settings
    config = yaml.safe_load((out / "runs" / "t2ialign" / "seed0" / "train.yaml").read_text())
    assert config["objective"] == {"name": "dpo", "beta": 2000.0}
    assert config["lora"]["rank"] == 8 and config["optim"]["learning_rate"] == 1e-3 and config["max_steps"] == 2
    assert (out / "runs" / "t2ialign" / "seed0" / "train" / "final" / "export.json").is_file()


def test_peer_command_fixes_only_the_shared_settings(tmp_path):
    script = load_script()
    inputs = {"base_dir": tmp_path / "base", "peer_data": tmp_path / "data"}
    command = script.peer_command("peer.py", inputs, script.Setup(), tmp_path / "run", 3, ["--no_hflip"])
    flags = dict(zip(command[2::2], command[3::2]))
    assert command[1] == "peer.py" and command[-1] == "--no_hflip"
    assert flags["--pretrained_model_name_or_path"] == str(tmp_path / "base")
    assert flags["--dataset_name"] == str(tmp_path / "data") and flags["--dataset_split_name"] == "train"
    assert {k: flags[k] for k in ("--resolution", "--train_batch_size", "--max_train_steps", "--learning_rate",
                                  "--lr_warmup_steps", "--rank", "--beta_dpo", "--seed")} == {
        "--resolution": "32", "--train_batch_size": "16", "--max_train_steps": "150", "--learning_rate": "0.001",
        "--lr_warmup_steps": "10", "--rank": "8", "--beta_dpo": "2000", "--seed": "3"}
    assert "--mixed_precision" not in command  # fp32 on a CPU, as t2ialign trains the toy model


def test_variants_move_only_the_settings_they_name(tmp_path):
    from t2ialign.config import load_train_config, to_dict
    from t2ialign.toy.demo import DemoSettings

    script = load_script()
    inputs = {"settings": DemoSettings(), "base_dir": tmp_path / "base", "pairs": tmp_path / "pairs" / "train.parquet"}

    def resolved(variant):
        raw = script.t2ialign_config(inputs, script.Setup(), tmp_path / "run", 0, script.VARIANTS[variant])
        flat = {}
        for section, value in to_dict(load_train_config(data=raw)).items():
            for key, inner in (value.items() if isinstance(value, dict) else [(None, value)]):
                flat[f"{section}.{key}" if key else section] = inner
        return flat

    before = resolved("demo_v1")
    assert before["data.random_flip"] is False and before["data.prompt_dropout"] == 0.1
    assert before["optim.weight_decay"] == 0.0 and before["optim.lr_scheduler"] == "constant_with_warmup"
    assert before["optim.warmup_steps"] == 10 and before["lora.rank"] == 8 and before["objective.beta"] == 2000.0
    assert script.VARIANTS["peer_like"] == script.DEMO_V1 + list(script.PEER_SETTINGS.values())
    for variant, overrides in script.VARIANTS.items():
        if variant in ("t2ialign", "demo_v1"):
            continue
        after = resolved(variant)
        named = {o.split("=", 1)[0] for o in overrides[len(script.DEMO_V1):]}
        assert {k for k in before if before[k] != after[k]} == named, variant
    # the shipped DPO recipe is the ablation's winner (docs/PEER_COMPARISON.md)
    assert resolved("t2ialign") == resolved("flip_no_dropout")
