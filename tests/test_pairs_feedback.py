"""AI-feedback pairs (t2ialign.feedback, `t2ialign pairs`): strategies and margins against hand-derived pairs,
the ensemble's z-normalisation against numpy, kill-and-rerun byte equality, relabelling, and the toy world
end to end (pairs labelled by toy.vividness -> DPO through `t2ialign train`)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from t2ialign.errors import UserFacingError
from t2ialign.feedback import Pair, ensemble_scores, make_pairs, parse_weights

TESTS = Path(__file__).parent
USER = "user_scorers_for_tests:brightness"

# two prompts of three images; prompt 1 has an exact tie (3, 4) and near-ties (margins 0.05)
GROUPS = [[0, 1, 2], [3, 4, 5]]
SCORES = [0.1, 0.5, 0.3, 2.0, 2.0, 1.95]


def test_best_worst_by_hand():
    pairs, counts = make_pairs(GROUPS, SCORES, "best-worst")
    # prompt 0: best 1, worst 0 -> jpg_0 = image 0 (lower index), which loses; prompt 1: best 3 (first max), worst 5
    assert pairs == [Pair(0, 0, 1, 0.0), Pair(1, 3, 5, 1.0)]
    assert counts == {"candidates": 2, "kept": 2, "dropped_near_tie": 0, "dropped_tie": 0}
    pairs, counts = make_pairs(GROUPS, SCORES, "best-worst", min_margin=0.1)
    assert pairs == [Pair(0, 0, 1, 0.0)] and counts["dropped_near_tie"] == 1


def test_all_pairs_and_margins_by_hand():
    pairs, counts = make_pairs(GROUPS, SCORES, "all", min_margin=0.1)
    assert pairs == [Pair(0, 0, 1, 0.0), Pair(0, 0, 2, 0.0), Pair(0, 1, 2, 1.0)]
    assert counts == {"candidates": 6, "kept": 3, "dropped_near_tie": 2, "dropped_tie": 1}
    pairs, counts = make_pairs(GROUPS, SCORES, "all")
    assert len(pairs) == 5 and counts["dropped_tie"] == 1 and Pair(1, 4, 5, 1.0) in pairs
    # all images equal: best-worst gives an exact tie, which is dropped
    assert make_pairs([[0, 1]], [1.0, 1.0], "best-worst")[1]["dropped_tie"] == 1
    with pytest.raises(UserFacingError, match="at least 2"):
        make_pairs([[0]], [1.0])
    with pytest.raises(UserFacingError, match="--strategy"):
        make_pairs(GROUPS, SCORES, "random")


def test_ensemble_z_normalisation_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(20, 3, 50), rng.normal(0.3, 0.01, 50)
    z = lambda x: (x - np.mean(x)) / np.sqrt(np.mean((x - np.mean(x)) ** 2))  # noqa: E731
    np.testing.assert_allclose(ensemble_scores({"a": a, "b": b}, [0.7, 0.3]), 0.7 * z(a) + 0.3 * z(b), rtol=1e-12)
    np.testing.assert_allclose(ensemble_scores({"a": a, "b": b}), 0.5 * z(a) + 0.5 * z(b), rtol=1e-12)
    np.testing.assert_array_equal(ensemble_scores({"a": a}), a)  # one scorer: raw units
    np.testing.assert_array_equal(ensemble_scores({"a": a, "c": np.ones(50)}, "1,1"), z(a))  # constant: no information
    with pytest.raises(UserFacingError, match="one per scorer"):
        parse_weights("0.7", 2)
    with pytest.raises(UserFacingError, match="numbers"):
        parse_weights("a,b", 2)


# ---------------------------------------------------------------- the toy world
@pytest.fixture(scope="module")
def toy_base():
    from t2ialign.toy.pretrain import get_toy_pipeline

    return get_toy_pipeline()


def _argv(base, prompts, out, *extra):
    return ["pairs", "build", "--model", str(base), "--prompts", str(prompts), "--num-images", "3", "--steps", "2",
            "--batch-size", "2", "--device", "cpu", "--dtype", "fp32", "--no-progress", "--out", str(out), *extra]


def _prompts(tmp_path, n):
    from t2ialign.toy import world

    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(world.sample_captions(n, seed=3)) + "\n")
    return path


def _progress(run: Path) -> int:
    """Appends done: sampler batches (2 metadata rows each) + scoring chunks (2 score rows each)."""
    lines = lambda p: p.read_bytes().count(b"\n") if p.exists() else 0  # noqa: E731
    return lines(run / "samples" / "metadata.jsonl") // 2 + lines(run / "image_scores.jsonl") // 2


def test_killed_and_rerun_equals_uninterrupted(toy_base, tmp_path):
    from t2ialign.cli import main

    prompts = _prompts(tmp_path, 4)
    extra = ["--scorers", f"toy.vividness,{USER}", "--weights", "0.7,0.3", "--strategy", "all", "--min-margin", "0.1",
             "--scorer-batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "t2ialign", *_argv(toy_base, prompts, killed, *extra)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sys.path.insert(0, str(TESTS)) if str(TESTS) not in sys.path else None
    assert main(_argv(toy_base, prompts, tmp_path / "ref", *extra)) == 0  # the uninterrupted run, meanwhile
    # 12 images: 6 sampler batches and 6 scoring chunks of 2, each one append; kill after a random number of them
    # (up to 8: the last chunks, pairing and writing leave the poll loop time to kill before the end)
    target = random.Random().randint(1, 8)
    while _progress(killed) < target and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "train.parquet").exists(), "finished before the kill"
    assert main(_argv(toy_base, prompts, killed, *extra)) == 0
    ref, again = (tmp_path / "ref" / "train.parquet").read_bytes(), (killed / "train.parquet").read_bytes()
    assert ref == again, f"differs after a kill at progress step {target} (of 12)"
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["candidates"] == 12 and summary["kept"] + summary["dropped"] == 12
    assert (tmp_path / "ref" / "summary.png").stat().st_size > 1000
    # a torn scores line (a kill mid-append) and a missing parquet: the rerun restores the same bytes
    scores = killed / "image_scores.jsonl"
    scores.write_bytes(scores.read_bytes()[:-20])
    (killed / "train.parquet").unlink()
    assert main(_argv(toy_base, prompts, killed, *extra)) == 0
    assert (killed / "train.parquet").read_bytes() == ref
    # other sampling settings into the same folder are refused
    assert main(_argv(toy_base, prompts, killed, *extra, "--seed", "5")) == 2


def test_toy_pairs_then_dpo_with_the_trainer(toy_base, tmp_path):
    import datasets
    import yaml

    from t2ialign.cli import main
    from t2ialign.toy.demo import DemoSettings, train_config

    prompts = _prompts(tmp_path, 6)
    assert main(_argv(toy_base, prompts, tmp_path / "pairs", "--scorers", "toy.vividness")) == 0
    path = tmp_path / "pairs" / "train.parquet"
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    for column in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "score_0", "score_1", "seed_0", "seed_1", "model_0",
                   "num_inference_steps", "guidance_scale", "scorers", "strategy"):
        assert column in rows.column_names
    assert 0 < len(rows) <= 6 and set(rows["scorers"]) == {"toy.vividness"}
    for row in rows:  # labels follow the scorer, and score_* are its raw values (one scorer)
        assert row["label_0"] == (1.0 if row["score_0"] > row["score_1"] else 0.0) and row["label_0"] + row["label_1"] == 1
        assert json.loads(row["raw_scores_0"])["toy.vividness"] == row["score_0"]
    settings = DemoSettings(train_batch_size=2)
    config = train_config(settings, Path(toy_base), path, "dpo", tmp_path / "run", max_steps=2)
    config.update(progress_bar=False, log_every=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "train.yaml")]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_relabel_agreement_and_ties(pickapic_parquet, tmp_path):
    import datasets

    from t2ialign.cli import main

    sys.path.insert(0, str(TESTS)) if str(TESTS) not in sys.path else None
    assert main(["pairs", "relabel", str(pickapic_parquet), "--scorers", USER, "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    old = datasets.load_dataset("parquet", data_files=str(pickapic_parquet), split="train")
    new = datasets.load_dataset("parquet", data_files=str(tmp_path / "r" / "train.parquet"), split="train")
    assert new["jpg_0"] == old["jpg_0"] and new["orig_label_0"] == old["label_0"]
    expected = [1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5 for s0, s1 in zip(new["score_0"], new["score_1"])]
    assert new["label_0"] == expected
    decided = [(o, n) for o, n in zip(old["label_0"], expected) if o != 0.5 and n != 0.5]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())["agreement"]
    assert summary["both_decided"] == len(decided) and summary["agree"] == sum(o == n for o, n in decided)
    assert summary["original_ties"] == sum(o == 0.5 for o in old["label_0"])
    # a scorer that ties everything: no agreement rate, every row a tie, and --drop-ties writes none
    assert main(["pairs", "relabel", str(pickapic_parquet), "--scorers", "user_scorers_for_tests:constant",
                 "--out", str(tmp_path / "c"), "--drop-ties", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["agreement"]["agreement"] is None and summary["agreement"]["new_ties"] == len(old)
    assert summary["written_rows"] == 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_same_pairs_and_leftovers_resume(toy_base, tmp_path):
    """`t2ialign pairs build` in two torchrun processes (gloo on CPU) == the 1-process run, byte for byte; and a
    run killed after one process's share resumes with one process to the same bytes (its rank files merged)."""
    from t2ialign.cli import main
    from t2ialign.config import SampleConfig
    from t2ialign.evaluation.sampling import sample
    from t2ialign.feedback.build import load_records

    prompts = _prompts(tmp_path, 6)
    # 12 images: sampler batches of 3 straddle prompts (rank 0: batches 0, 2; rank 1: 1, 3); scoring chunks of 5
    # (rank 0: chunks 0, 2; rank 1: chunk 1)
    argv = lambda out: ["pairs", "build", "--model", str(toy_base), "--prompts", str(prompts), "--num-images", "2",  # noqa: E731
                        "--steps", "2", "--batch-size", "3", "--device", "cpu", "--dtype", "fp32", "--no-progress",
                        "--scorers", "toy.vividness", "--scorer-batch-size", "5", "--strategy", "all", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "t2ialign", *argv(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("pairs: kept") == 1, proc.stdout  # one report, from the main process
    assert main(argv(tmp_path / "one")) == 0
    ref = (tmp_path / "one" / "train.parquet").read_bytes()
    assert (tmp_path / "two" / "train.parquet").read_bytes() == ref
    for name in ("summary.json", "image_scores.jsonl", "samples/metadata.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not list((tmp_path / "two").rglob("*.rank*.jsonl"))  # merged and removed

    # process 1 of 2 alone (process 0 killed before writing anything): its batches, in its own metadata file
    left = tmp_path / "left"
    config = SampleConfig(pretrained=str(toy_base), prompts=str(prompts), num_images_per_prompt=2, num_inference_steps=2,
                          batch_size=3, device="cpu", dtype="fp32", progress_bar=False, output_dir=str(left / "samples"))
    sample(config, records=load_records(str(prompts)), shard=(1, 2))
    rank_rows = [json.loads(line) for line in (left / "samples" / "metadata.rank1.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rank_rows] == [f"images/{p:05d}_{i}.png" for p, i in [(1, 1), (2, 0), (2, 1), (4, 1), (5, 0), (5, 1)]]
    assert not (left / "samples" / "metadata.jsonl").exists()
    # a scoring leftover too (chunk 1 of process 1, last line torn), then the rerun with one process
    scores = (tmp_path / "one" / "image_scores.jsonl").read_text().splitlines(keepends=True)
    (left / "image_scores.rank1.jsonl").write_text("".join(scores[5:10])[:-7])
    assert main(argv(left)) == 0
    assert (left / "train.parquet").read_bytes() == ref
    assert not list(left.rglob("*.rank*.jsonl"))
