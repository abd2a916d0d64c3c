"""User scorers ``package.module:function``: loading, one-line errors, and every command that takes a scorer
(score and eval in a subprocess / in process, sweep). The callables live in tests/user_scorers_for_tests.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2ialign.errors import UserFacingError
from t2ialign.scoring import canonical_scorer_name, get_scorer, parse_scorer_list

TESTS = Path(__file__).parent
SPEC = "user_scorers_for_tests:brightness"


def _images():
    return [Image.new("RGB", (8, 8), (v, v, v)) for v in (0, 255, 51)]


def test_user_callable_scores_under_its_spec():
    scorer = get_scorer(SPEC)
    assert scorer.name == SPEC == canonical_scorer_name(" " + SPEC)
    assert torch.allclose(scorer.score(_images(), ["a"] * 3), torch.tensor([0.0, 1.0, 0.2]))
    assert get_scorer("user_scorers_for_tests:Namespace.redness").score(_images()[:1], ["a"]).tolist() == [0.0]
    assert parse_scorer_list(f"toy.vividness,{SPEC}") == ["toy.vividness", SPEC]


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("user_scorers_for_tests:missing", "has no attribute 'missing'"),
    ("user_scorers_for_tests:NOT_CALLABLE", "is a int, not a callable"),
    ("user_scorers_for_tests:", "package.module:function"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(UserFacingError, match=message) as info:
        get_scorer(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fn, message", [("wrong_length", "returned 1 values for 3 images"),
                                         ("not_finite", "non-finite values")])
def test_bad_outputs_are_one_line_errors(fn, message):
    with pytest.raises(UserFacingError, match=message):
        get_scorer(f"user_scorers_for_tests:{fn}").score(_images(), ["a"] * 3)


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def test_score_cli_subprocess_and_eval(tmp_path):
    from test_evaluation import _make_model_dir

    from t2ialign.cli import main

    a, b = _make_model_dir(tmp_path, "a", 80, n=4), _make_model_dir(tmp_path, "b", 150, n=4)
    cmd = [sys.executable, "-m", "t2ialign", "score", str(a), "--scorers", SPEC]
    done = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    row = json.loads(open(a / "scores.jsonl").readline())
    expected = np.asarray(Image.open(a / row["file"]).convert("L"), dtype=np.float64).mean() / 255.0
    assert row["scores"][SPEC] == pytest.approx(expected)
    bad = subprocess.run([*cmd[:-1], "user_scorers_for_tests:wrong_length"], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: user scorer")
    out = tmp_path / "rep"
    assert main(["eval", f"A={a}", f"B={b}", "--scorers", SPEC, "--baseline", "A", "--out", str(out), "--n-boot", "20"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["win_rates"][0]["scorer"] == SPEC and rep["win_rates"][0]["win_rate"] == 1.0


def test_sweep_cli_takes_a_user_scorer(tiny_sdxl_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from t2ialign.cli import main

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "aligned")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\na cat\n")
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(tiny_sdxl_dir), "--guide-with", str(tmp_path / "aligned"), "--scales", "0,1",
                 "--prompts", str(prompts), "--steps", "2", "--device", "cpu", "--dtype", "fp32", "--scorers", SPEC,
                 "--n-boot", "10", "--out", str(out)]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["scorers"] == [SPEC] and sweep["results"]["1"]["scores"][SPEC]["n"] == 2
