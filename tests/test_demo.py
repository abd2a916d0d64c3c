"""The toy world's end-to-end signal: DPO raises the toy reward, a sign-flipped DPO does not.

Smaller budget than `t2ialign demo`, same code: toy pretraining, pairs in the Pick-a-Pic schema,
`train()`, `sample()` with identical seeds, the toy preference as the scorer.
"""
import numpy as np
import pytest
import torch

from t2ialign.objectives import ObjectiveSpec, dpo_loss, register_objective
from t2ialign.toy.demo import OBJECTIVE_RECIPES, DemoSettings, _sample_config, align_with_curve, folder_rewards, held_out_prompts


def flipped_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta: float = 5000.0):
    """Diffusion-DPO with winner and loser swapped: the sign error a broken objective would make."""
    return dpo_loss(model_err_l, model_err_w, ref_err_l, ref_err_w, beta)


register_objective(ObjectiveSpec("dpo_sign_flipped", flipped_dpo_loss, description="test only: DPO with the sign flipped"))
# the same hyperparameters as the demo's DPO, only the sign differs
OBJECTIVE_RECIPES["dpo_sign_flipped"] = {**OBJECTIVE_RECIPES["dpo"], "objective": {**OBJECTIVE_RECIPES["dpo"]["objective"], "name": "dpo_sign_flipped"}}

BUDGET = dict(num_pairs=512, train_steps=150, curve_points=1, train_batch_size=16, num_eval_prompts=96, sample_steps=20)


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    from t2ialign.toy import pairs, preferences, pretrain

    torch.set_num_threads(1)
    # the demo's own base model: pretrained once (about 4-5 CPU minutes) into the content-addressed
    # toy cache that `t2ialign demo` also uses, then reused by later runs
    base = pretrain.get_toy_pipeline(cache=True)
    out = tmp_path_factory.mktemp("toy_demo")
    settings = DemoSettings(output_dir=str(out), rlg_scales=[], **BUDGET)
    pairs_path = pairs.build_preference_pairs(base, out / "pairs", preference=preferences.DEFAULT_PREFERENCE,
                                              num_pairs=settings.num_pairs, seed=0)
    return settings, base, pairs_path, preferences.get_preference(preferences.DEFAULT_PREFERENCE), out


def mean_reward(rewards: dict) -> float:
    return float(np.mean([r["reward"] for r in rewards.values()]))


@pytest.mark.slow
def test_dpo_raises_the_toy_reward_and_a_sign_flipped_objective_does_not(toy_world):
    from t2ialign.evaluation.sampling import sample
    from t2ialign.evaluation.stats import bootstrap_win_rate

    settings, base, pairs_path, reward, out = toy_world
    records = held_out_prompts(settings.num_eval_prompts, seed=0)
    base_rewards = folder_rewards(sample(_sample_config(settings, base, out / "samples" / "base"), records), reward)
    results = {}
    for objective in ("dpo", "dpo_sign_flipped"):
        export, curve = align_with_curve(settings, base, pairs_path, objective, records, reward, out)
        rewards = folder_rewards(out / "samples" / f"{objective}-step{settings.train_steps}", reward)
        keys = sorted(rewards)
        win = bootstrap_win_rate([rewards[k]["reward"] for k in keys], [base_rewards[k]["reward"] for k in keys])
        results[objective] = (mean_reward(rewards), win)
    base_mean = mean_reward(base_rewards)
    dpo_mean, dpo_win = results["dpo"]
    flipped_mean, flipped_win = results["dpo_sign_flipped"]
    assert dpo_mean > base_mean and dpo_win.low > 0.5, (base_mean, results)
    assert flipped_mean < base_mean and flipped_win.win_rate < 0.5, (base_mean, results)
    _eval_cli_reproduces(out, settings, dpo_win)


def _eval_cli_reproduces(out, settings, demo_win):
    """`t2ialign eval --scorers toy.vividness` on the demo's folders gives the demo's win rate and CI, offline."""
    import json
    import subprocess
    import sys

    report = out / "eval-by-hand"
    cmd = [sys.executable, "-m", "t2ialign", "eval", f"base={out / 'samples' / 'base'}",
           f"dpo={out / 'samples' / f'dpo-step{settings.train_steps}'}", "--scorers", "toy.vividness", "--baseline", "base",
           "--out", str(report), "--seed", str(settings.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [w for w in json.loads((report / "report.json").read_text())["win_rates"] if w["scorer"] == "toy.vividness"]
    assert (row["win_rate"], row["low"], row["high"]) == pytest.approx((demo_win.win_rate, demo_win.low, demo_win.high), abs=1e-12)
