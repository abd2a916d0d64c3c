"""On-policy rounds (t2ialign.feedback.rounds, `t2ialign pairs rounds`) on the toy base with tiny budgets: round 2
samples round 1's export, a kill between rounds continues, a rerun of a finished recipe touches nothing, the
fused init is the previous policy, and rounds.json agrees with the per-round evaluations."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from t2ialign.errors import UserFacingError
from t2ialign.feedback.rounds import _check_same_recipe, load_recipe, run_rounds

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "feedback"
TOY = CONFIGS / "rounds_toy.yaml"
EVAL_PROMPTS = 4


def _tiny(out: Path) -> list[str]:
    return [f"output_dir={out}", "prompts=toy:6", "prompts_per_round=3", f"eval_prompts=toy-heldout:{EVAL_PROMPTS}",
            "num_images=3", "sampling.num_inference_steps=2", "train.max_steps=3", "train.train_batch_size=2",
            "train.checkpoint_every=2", "train.progress_bar=false", "progress=false"]


def _mtimes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _run_cli_until(overrides: list, marker: Path) -> None:
    """`t2ialign pairs rounds` in a subprocess, SIGKILLed as soon as ``marker`` exists (a kill between rounds)."""
    args = [sys.executable, "-m", "t2ialign", "pairs", "rounds", str(TOY)] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finished before the kill"


def test_two_rounds_kill_continue_and_rerun(tmp_path):
    import datasets

    out = tmp_path / "rounds"
    overrides = _tiny(out) + ["rounds=2"]
    _run_cli_until(overrides, out / "round_1" / "eval.json")
    assert not (out / "round_2" / "train" / "final").exists() and not (out / "rounds.json").exists()
    round_1 = {n: (out / "round_1" / n).stat().st_mtime_ns for n in ("pairs/train.parquet", "train/final/export.json", "eval.json")}
    recipe = load_recipe(TOY, overrides)
    results = run_rounds(recipe)  # continues with round 2; round 1 is not redone
    assert {n: (out / "round_1" / n).stat().st_mtime_ns for n in round_1} == round_1

    # round 2 sampled round 1's policy: the base with round 1's export, recorded in its pairs
    export_1 = str(out / "round_1" / "train" / "final")
    pairs = [datasets.load_dataset("parquet", data_files=str(out / f"round_{k}" / "pairs" / "train.parquet"), split="train")
             for k in (1, 2)]
    assert set(pairs[0]["aligned"]) == {""} and set(pairs[1]["aligned"]) == {export_1}
    assert set(pairs[1]["pretrained"]) == set(pairs[0]["pretrained"]) == {results["base"]}
    assert not set(pairs[0]["caption"]) & set(pairs[1]["caption"])  # fresh prompts each round
    # round 2 trained from round 1's policy: the init pipeline, its reference
    trained = yaml.safe_load((out / "round_2" / "train" / "config.yaml").read_text())
    assert trained["model"]["pretrained"] == str(out / "round_2" / "init")
    assert json.loads((out / "round_2" / "init" / "policy.json").read_text())["aligned"] == export_1
    _check_results(out, results)
    _check_fused_init(out)

    before = _mtimes(out)
    assert run_rounds(load_recipe(TOY, overrides)) == results  # a finished recipe: nothing redone or rewritten
    assert _mtimes(out) == before


def _check_results(out: Path, results: dict) -> None:
    stored = json.loads((out / "rounds.json").read_text())
    assert stored == results and [e["round"] for e in stored["rounds"]] == [1, 2]
    base_means = set()
    for entry in stored["rounds"]:
        s = entry["scorers"]["toy.vividness"]
        assert entry == json.loads((out / f"round_{entry['round']}" / "eval.json").read_text())
        for w in (s["vs_base"], s["vs_previous"]):
            assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1 and w["n"] == EVAL_PROMPTS
            assert w["wins"] + w["ties"] + w["losses"] == w["n"]
            assert w["win_rate"] == pytest.approx((w["wins"] + 0.5 * w["ties"]) / w["n"])
        scores = [json.loads(line)["scores"]["toy.vividness"]
                  for line in (out / f"round_{entry['round']}" / "eval" / "image_scores.jsonl").read_text().splitlines()]
        assert len(scores) == EVAL_PROMPTS and s["mean_reward"] == pytest.approx(np.mean(scores))
        base_means.add(s["base_mean_reward"])
    assert len(base_means) == 1  # one base folder, scored once
    table = (out / "rounds.md").read_text()
    assert table.count("| toy.vividness |") == 3  # base + two rounds


def _check_fused_init(out: Path) -> None:
    """Round 2's trainer base (LoRA fused into the UNet) computes what the sampled policy (base + LoRA) computes."""
    import torch

    from t2ialign.models.pipeline import load_pipeline

    policy = json.loads((out / "round_2" / "init" / "policy.json").read_text())
    fused = load_pipeline(str(out / "round_2" / "init")).unet
    lora = load_pipeline(policy["pretrained"], aligned=policy["aligned"]).unet
    base = load_pipeline(policy["pretrained"]).unet
    c = fused.config
    torch.manual_seed(0)
    x, t, text = torch.randn(2, c.in_channels, 8, 8), torch.tensor([300, 700]), torch.randn(2, 7, c.cross_attention_dim)
    extra = {"text_embeds": torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim),
             "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        y_fused, y_lora, y_base = (u(x, t, text, added_cond_kwargs=extra).sample for u in (fused, lora, base))
    assert (y_fused - y_lora).abs().max() < 1e-5 < 1e-4 < (y_lora - y_base).abs().max()


def test_recipes_and_a_changed_recipe(tmp_path):
    from t2ialign.toy.demo import DemoSettings, train_config

    toy = load_recipe(TOY)
    demo = train_config(DemoSettings(), Path("B"), Path("P"), "dpo", Path("R"), toy.train["max_steps"])
    for key in ("model", "output_dir", "resume"):
        demo.pop(key)
    demo["data"] = {k: v for k, v in demo["data"].items() if k != "dataset"}
    # the toy recipe is the demo's DPO recipe (except when it checkpoints)
    assert {**toy.train, "checkpoint_every": demo["checkpoint_every"]} == demo
    sdxl = load_recipe(CONFIGS / "rounds_sdxl.yaml")
    assert sdxl.scorers == ["pickscore"] and sdxl.num_images == 4 and sdxl.train["lora"]["enabled"]
    with pytest.raises(UserFacingError, match="set per round"):
        load_recipe(TOY, ["train.model.pretrained=x"])
    _check_same_recipe(tmp_path, toy)
    _check_same_recipe(tmp_path, load_recipe(TOY, ["rounds=3"]))  # more rounds: the same experiment continued
    with pytest.raises(UserFacingError, match="num_images"):
        _check_same_recipe(tmp_path, load_recipe(TOY, ["num_images=2"]))
