"""Run ``t2ialign train`` in-process with a registered objective whose loss goes bad on chosen micro-steps.

Used by tests/test_reliability_resume.py: ``python tests/helpers/flaky_objective_train.py CONFIG PLAN_JSON [--set k=v ...]``.
PLAN_JSON maps a call index (= micro-step, 0-based) to one of
  "nan_loss"      loss * nan: non-finite loss and non-finite gradients
  "inf_loss"      loss + inf (a constant): non-finite loss, finite gradients
  "nan_grad"      loss + sqrt(0 * err): finite loss, NaN gradients
The objective is registered as "flaky_dpo" (DPO otherwise), then the real CLI entry point runs, so the
exit code and the printed error are what a user would see.
"""
import json
import sys

import torch

from t2ialign.objectives import ObjectiveOutput, ObjectiveSpec, dpo_loss, register_objective


def make_flaky(plan: dict):
    calls = {"n": 0}

    def flaky_dpo(model_err_w, model_err_l, ref_err_w, ref_err_l, beta: float = 5000.0) -> ObjectiveOutput:
        out = dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta=beta)
        kind = plan.get(str(calls["n"]))
        calls["n"] += 1
        loss = out.loss
        if kind == "nan_loss":
            loss = loss * float("nan")
        elif kind == "inf_loss":
            loss = loss + torch.tensor(float("inf"))
        elif kind == "nan_grad":
            loss = loss + (model_err_w.sum() * 0.0).sqrt()  # value 0, d sqrt(u)/du at 0 = inf, times 0 = nan
        return ObjectiveOutput(loss, out.metrics)

    return flaky_dpo


def main(argv) -> int:
    config_path, plan_path, *rest = argv
    plan = json.loads(open(plan_path).read())
    register_objective(ObjectiveSpec("flaky_dpo", make_flaky(plan), description="test objective: DPO with bad steps"))
    from t2ialign.cli import main as cli_main

    return cli_main(["train", config_path, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
