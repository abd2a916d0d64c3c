#!/usr/bin/env python
"""t2ialign's Diffusion-DPO against the diffusers research script, on the toy world, seed by seed.

Both trainers get the same base (the demo's pretrained toy pipeline), the same 1,024 vividness pairs the
demo builds (``t2ialign.toy.pairs.build_preference_pairs``, seed 0), LoRA rank 8, beta 2000, lr 1e-3,
warmup 10, 16 pairs x 150 steps; each trained model is sampled with t2ialign's ``sample()`` on the demo's
128 held-out prompts (20 steps, guidance 4, sampling seed 0, the same seeds as the base) and scored with
the demo's reward and bootstrap win rate over the base (``folder_rewards`` / ``bootstrap_win_rate``).
Only the training seed changes between seeds. It prints a table and a JSON summary (per seed: win rate,
its CI, mean reward, the captioner's fidelity, left/right placement, wall times; per system: means over
seeds, std and the 95% CI of the mean) and writes it to OUT/compare.json. Nothing is downloaded.

The peer script (not shipped with t2ialign; pass it with ``--peer-script``):
  repository  https://github.com/huggingface/diffusers
  path        examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py
  commit      58eb52c0803ea9af3abec60841c2a093bdf1f951 (the file's last change: c9c82173068d628b0569ccb6d656adfa37a389e8)
  e.g.        git clone https://github.com/huggingface/diffusers && cd diffusers && git checkout 58eb52c0 &&
              cp examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py /tmp/peer/
It runs unchanged in a subprocess, with its own defaults except the flags the comparison fixes (see
``peer_command``): the toy pipeline directory as --pretrained_model_name_or_path, a directory holding only
the pairs' ``train.parquet`` as --dataset_name (``datasets.load_dataset`` reads a local folder; the split is
then "train", the script's default is "validation"), --resolution 32 and the shared hyperparameters. No
--mixed_precision: on a CPU it trains in fp32 as t2ialign does. The script imports ``wandb`` at the top but
only uses it with --report_to wandb; when wandb is not installed a stub module is put on its PYTHONPATH.
Its LoRA output directory (``pytorch_lora_weights.safetensors``) is sampled like t2ialign's export.

t2ialign runs as ``python -m t2ialign train CONFIG`` in a subprocess too (same start-up cost in the wall
times), with the demo's recipe (``t2ialign.toy.demo.train_config``) plus the variant's overrides.
``--variants`` picks t2ialign settings to compare (VARIANTS: "t2ialign" is the shipped recipe, "demo_v1" the
recipe before this comparison, the others demo_v1 with one or more settings moved to the peer's).

  python scripts/compare_peer_dpo.py --peer-script /tmp/peer/train_diffusion_dpo_sdxl.py --seeds 0,1,2,3,4
  python scripts/compare_peer_dpo.py --variants demo_v1,flip,no_prompt_dropout,flip_no_dropout   # ablation only
  python scripts/compare_peer_dpo.py --tiny --seeds 0 --json                                  # smoke test

Runs are kept under --out (one directory per system and seed, each with result.json) and reused when their
settings match, so an interrupted comparison continues where it stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling module, also when loaded by path
from compare_peer_report import _mean_reward, left_right_positions, summarise, table  # noqa: E402
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEER_REPO = "https://github.com/huggingface/diffusers"
PEER_PATH = "examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py"
PEER_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"

# t2ialign variants: overrides (``--set`` syntax) on top of the demo's DPO recipe (t2ialign.toy.demo.train_config).
# "t2ialign" is the recipe as it ships; "demo_v1" the recipe before this comparison (no flips, 10% prompt dropout),
# the starting point of the ablation: every other variant is demo_v1 with settings moved to what the peer does
# with the flags of ``peer_command`` (docs/PEER_COMPARISON.md).
DEMO_V1 = ["data.random_flip=false", "data.prompt_dropout=0.1", "optim.weight_decay=0.0",
           "optim.lr_scheduler=constant_with_warmup"]
PEER_SETTINGS = {
    "flip": "data.random_flip=true",  # peer: RandomHorizontalFlip p=0.5 per pair unless --no_hflip
    "weight_decay": "optim.weight_decay=0.01",  # peer: --adam_weight_decay 1e-2
    "no_warmup": "optim.lr_scheduler=constant",  # peer: --lr_scheduler constant ignores --lr_warmup_steps
    "no_dropout": "data.prompt_dropout=0.0",  # peer: never drops captions
}
VARIANTS: dict[str, list[str]] = {
    "t2ialign": [],
    "demo_v1": DEMO_V1,
    "flip": DEMO_V1 + [PEER_SETTINGS["flip"]],
    "weight_decay": DEMO_V1 + [PEER_SETTINGS["weight_decay"]],
    "no_warmup": DEMO_V1 + [PEER_SETTINGS["no_warmup"]],
    "no_prompt_dropout": DEMO_V1 + [PEER_SETTINGS["no_dropout"]],
    "flip_no_dropout": DEMO_V1 + [PEER_SETTINGS["flip"], PEER_SETTINGS["no_dropout"]],
    "flip_no_warmup": DEMO_V1 + [PEER_SETTINGS["flip"], PEER_SETTINGS["no_warmup"]],
    "no_dropout_no_warmup": DEMO_V1 + [PEER_SETTINGS["no_dropout"], PEER_SETTINGS["no_warmup"]],
    "peer_like": DEMO_V1 + list(PEER_SETTINGS.values()),
}


@dataclass
class Setup:
    num_pairs: int = 1024
    train_steps: int = 150
    batch_size: int = 16
    num_eval_prompts: int = 128
    sample_steps: int = 20
    guidance_scale: float = 4.0
    rank: int = 8
    beta: float = 2000.0
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    pairs_seed: int = 0  # the demo's pairs and held-out prompts (seed 0); training seeds vary
    sample_seed: int = 0


RESULT_VERSION = 3  # bump when result.json changes, so older runs are redone instead of reused
TINY = Setup(num_pairs=32, train_steps=2, batch_size=4, num_eval_prompts=4, sample_steps=2)


def _threads_env() -> dict:
    # the toy kernels are too small for several threads; on a shared CPU OpenMP spin-waiting is much slower
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# ----------------------------------------------------------------------------- shared inputs
def prepare(out: Path, setup: Setup, tiny: bool, base: Optional[str]):
    """Base pipeline, the demo's pairs, the held-out prompts and the base model's samples/rewards."""
    from t2ialign.toy import pairs as toy_pairs, preferences, pretrain
    from t2ialign.toy.demo import DemoSettings, _sample_config, folder_rewards, held_out_prompts
    from t2ialign.evaluation.sampling import sample

    if base:
        base_dir = Path(base)
    elif tiny:
        base_dir = out / "tiny_base"
        if not pretrain.is_complete(base_dir):
            shutil.rmtree(base_dir, ignore_errors=True)
            config = pretrain.PretrainConfig(num_images=64, vae_steps=2, vae_batch_size=8, unet_steps=2,
                                             unet_batch_size=8, heldout_images=8)
            pretrain.pretrain_toy_pipeline(base_dir, config)
    else:
        base_dir = pretrain.get_toy_pipeline(cache=True)  # the demo's base (content-addressed cache)
    preference = preferences.DEFAULT_PREFERENCE
    reward_fn = preferences.get_preference(preference)
    pairs_dir = out / "pairs"
    stamp = {"base": str(base_dir), "num_pairs": setup.num_pairs, "seed": setup.pairs_seed, "preference": preference}
    if not (pairs_dir / "train.parquet").is_file() or _read_json(pairs_dir / "stamp.json") != stamp:
        shutil.rmtree(pairs_dir, ignore_errors=True)
        toy_pairs.build_preference_pairs(base_dir, preference=preference, num_pairs=setup.num_pairs, out_dir=pairs_dir,
                                         label_noise=0.0, seed=setup.pairs_seed)
        (pairs_dir / "stamp.json").write_text(json.dumps(stamp))
    # the peer reads a dataset folder with datasets.load_dataset: give it one that holds only the parquet
    peer_data = out / "peer_dataset"
    if not (peer_data / "train.parquet").is_file() or _read_json(out / "peer_dataset.stamp") != stamp:
        shutil.rmtree(peer_data, ignore_errors=True)
        peer_data.mkdir(parents=True)
        shutil.copy(pairs_dir / "train.parquet", peer_data / "train.parquet")
        (out / "peer_dataset.stamp").write_text(json.dumps(stamp))
    settings = DemoSettings(output_dir=str(out), seed=setup.sample_seed, num_pairs=setup.num_pairs,
                            train_steps=setup.train_steps, train_batch_size=setup.batch_size,
                            num_eval_prompts=setup.num_eval_prompts, sample_steps=setup.sample_steps,
                            guidance_scale=setup.guidance_scale)
    records = held_out_prompts(setup.num_eval_prompts, setup.sample_seed)
    base_samples = out / "samples" / "base"
    if _read_json(base_samples / "stamp.json") != {**stamp, "eval": asdict(setup)}:
        shutil.rmtree(base_samples, ignore_errors=True)
    sample(_sample_config(settings, base_dir, base_samples), records)
    (base_samples / "stamp.json").write_text(json.dumps({**stamp, "eval": asdict(setup)}))
    base_rewards = folder_rewards(base_samples, reward_fn)
    # a second score: does the model still draw what the caption says (colour/shape/size/position)?
    fidelity_fn = preferences.get_preference("fidelity")
    base_fidelity = _mean_reward(folder_rewards(base_samples, fidelity_fn))
    base_positions = left_right_positions(base_samples)
    return {"base_dir": base_dir, "pairs": pairs_dir / "train.parquet", "peer_data": peer_data, "settings": settings,
            "records": records, "reward_fn": reward_fn, "preference": preference, "base_rewards": base_rewards,
            "fidelity_fn": fidelity_fn, "base_fidelity": base_fidelity, "base_positions": base_positions, "stamp": stamp}


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the two trainers
def t2ialign_config(inputs: dict, setup: Setup, run_dir: Path, seed: int, overrides: list[str]) -> dict:
    from t2ialign.config.parsing import apply_overrides
    from t2ialign.toy.demo import train_config

    raw = train_config(inputs["settings"], inputs["base_dir"], inputs["pairs"], "dpo", run_dir, setup.train_steps)
    raw = apply_overrides(raw, [
        f"seed={seed}", f"objective.beta={setup.beta}", f"optim.learning_rate={setup.learning_rate}",
        f"optim.warmup_steps={setup.warmup_steps}", f"lora.rank={setup.rank}", f"train_batch_size={setup.batch_size}",
        "resume=null", "progress_bar=false", f"checkpoint_every={setup.train_steps}", *overrides,
    ])
    return raw


def config_fingerprint(raw: dict) -> str:
    """A hash of the resolved training config (defaults filled in) without its output directory (which names the
    run, not what it does)."""
    from t2ialign.config import load_train_config, to_dict

    settings = {k: v for k, v in to_dict(load_train_config(data=raw)).items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_t2ialign(inputs: dict, setup: Setup, run_dir: Path, seed: int, overrides: list[str]) -> tuple[Path, float]:
    import yaml

    raw = t2ialign_config(inputs, setup, run_dir / "train", seed, overrides)
    shutil.rmtree(run_dir / "train", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "train.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    wall = _run([sys.executable, "-m", "t2ialign", "train", str(config_path)], run_dir / "train.log", _threads_env())
    return run_dir / "train" / "final", wall


def peer_command(script: str, inputs: dict, setup: Setup, output_dir: Path, seed: int, extra: list[str]) -> list[str]:
    """The peer script with its defaults, except what the comparison fixes (and ``--peer-args``)."""
    from t2ialign.toy import world

    return [
        sys.executable, str(script),
        "--pretrained_model_name_or_path", str(inputs["base_dir"]),
        "--dataset_name", str(inputs["peer_data"]), "--dataset_split_name", "train",
        "--resolution", str(world.RESOLUTION),
        "--train_batch_size", str(setup.batch_size), "--max_train_steps", str(setup.train_steps),
        "--learning_rate", str(setup.learning_rate), "--lr_warmup_steps", str(setup.warmup_steps),
        "--rank", str(setup.rank), "--beta_dpo", str(int(setup.beta)),
        "--output_dir", str(output_dir), "--seed", str(seed), *extra,
    ]


def _peer_env(out: Path) -> dict:
    env = _threads_env()
    if importlib.util.find_spec("wandb") is None:  # imported at the top of the script, used only with wandb
        shims = out / "peer_shims"
        shims.mkdir(parents=True, exist_ok=True)
        (shims / "wandb.py").write_text(
            '"""Stub: wandb is not installed; the peer script only needs it with --report_to wandb."""\n'
            "class Image:\n    def __init__(self, *args, **kwargs):\n"
            "        raise RuntimeError('wandb is not installed')\n"
        )
        env["PYTHONPATH"] = os.pathsep.join([str(shims), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_peer(script: str, inputs: dict, setup: Setup, run_dir: Path, seed: int, extra: list[str], out: Path) -> tuple[Path, float]:
    output_dir = run_dir / "train"
    shutil.rmtree(output_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = peer_command(script, inputs, setup, output_dir, seed, extra)
    (run_dir / "command.txt").write_text(shlex.join(command) + "\n")
    wall = _run(command, run_dir / "train.log", _peer_env(out))
    if not (output_dir / "pytorch_lora_weights.safetensors").is_file():
        raise RuntimeError(f"the peer script wrote no LoRA weights into {output_dir}; see {run_dir / 'train.log'}")
    return output_dir, wall


def _run(command: list[str], log: Path, env: dict) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{shlex.join(command[:4])} ... failed ({proc.returncode}); log {log}:\n{tail}")
    return wall


# ----------------------------------------------------------------------------- scoring and the table
def evaluate(inputs: dict, aligned: Path, folder: Path) -> dict:
    import numpy as np

    from t2ialign.evaluation.sampling import sample
    from t2ialign.evaluation.stats import bootstrap_win_rate
    from t2ialign.toy.demo import _sample_config, folder_rewards

    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    sample(_sample_config(inputs["settings"], inputs["base_dir"], folder, aligned), inputs["records"])
    sample_wall = time.perf_counter() - started
    rewards = folder_rewards(folder, inputs["reward_fn"])
    base = inputs["base_rewards"]
    keys = sorted(set(rewards) & set(base))
    ours, theirs = [rewards[k]["reward"] for k in keys], [base[k]["reward"] for k in keys]
    win = bootstrap_win_rate(ours, theirs, model_a=folder.name, model_b="base", scorer=inputs["preference"],
                             seed=inputs["settings"].seed)
    return {"win_rate": win.win_rate, "ci_low": win.low, "ci_high": win.high, "mean_reward": float(np.mean(ours)),
            "base_mean_reward": float(np.mean(theirs)), "num_prompts": len(keys), "sample_wall_s": sample_wall,
            "fidelity": _mean_reward(folder_rewards(folder, inputs["fidelity_fn"])), "base_fidelity": inputs["base_fidelity"],
            **left_right_positions(folder)}


def run_one(system: str, kind: str, spec: list[str], seed: int, inputs: dict, setup: Setup, out: Path,
            peer_script: Optional[str], reuse: bool) -> dict:
    run_dir = out / "runs" / system / f"seed{seed}"
    key = {"version": RESULT_VERSION, "kind": kind, "seed": seed, "setup": asdict(setup), "inputs": inputs["stamp"]}
    if kind == "peer":  # what ran: the script's bytes and the extra flags
        key.update(peer_sha=hashlib.sha256(Path(peer_script).read_bytes()).hexdigest()[:12], peer_args=spec)
    else:  # what ran: the resolved training config (so a changed demo recipe is retrained, not reused)
        key.update(config=config_fingerprint(t2ialign_config(inputs, setup, run_dir / "train", seed, spec)))
    cached = _read_json(run_dir / "result.json")
    if reuse and cached and cached.get("key") == key:
        if "lr_position_accuracy" not in cached:  # a run scored before this metric existed: score its samples
            cached.update(left_right_positions(run_dir / "samples"))
            (run_dir / "result.json").write_text(json.dumps(cached, indent=2))
        return {**cached, "system": system}
    if kind == "peer":
        aligned, train_wall = run_peer(peer_script, inputs, setup, run_dir, seed, spec, out)
    else:
        aligned, train_wall = run_t2ialign(inputs, setup, run_dir, seed, spec)
    result = {"system": system, "kind": kind, "seed": seed, "train_wall_s": train_wall,
              **evaluate(inputs, aligned, run_dir / "samples"), "key": key}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/compare_peer", help="working directory (pairs, samples, runs, compare.json)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds, comma-separated")
    parser.add_argument("--variants", default="t2ialign", help=f"t2ialign variants, comma-separated ({', '.join(VARIANTS)}); "
                        "'none' for the peer only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra t2ialign config override for every t2ialign variant (repeatable)")
    parser.add_argument("--peer-script", default=None, help=f"path to {PEER_PATH} from {PEER_REPO} (commit {PEER_COMMIT[:12]})")
    parser.add_argument("--peer-args", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra peer run named NAME with FLAGS appended (e.g. 'peer_noflip=--no_hflip'); repeatable. "
                        "Without it, one run named 'peer' with no extra flags")
    parser.add_argument("--base", default=None, help="toy pipeline directory (default: the demo's cached base)")
    parser.add_argument("--num-pairs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 150)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 16)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts (default 128)")
    parser.add_argument("--sample-steps", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="smoke-test scale: a 2-step toy base, 32 pairs, 2 steps, 4 prompts")
    parser.add_argument("--no-reuse", action="store_true", help="retrain runs that already have a result.json")
    parser.add_argument("--prepare-only", action="store_true", help="build pairs and base samples, then stop")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary (one line)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup = replace(TINY) if args.tiny else Setup()
    for name, value in (("num_pairs", args.num_pairs), ("train_steps", args.steps), ("batch_size", args.batch_size),
                        ("num_eval_prompts", args.eval_prompts), ("sample_steps", args.sample_steps)):
        if value is not None:
            setattr(setup, name, value)
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [] if args.variants.strip() == "none" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    systems = [(v, "t2ialign", VARIANTS[v] + args.overrides) for v in variants]
    if args.peer_script:
        if not Path(args.peer_script).is_file():
            raise SystemExit(f"--peer-script {args.peer_script}: no such file ({PEER_PATH} from {PEER_REPO})")
        peers = [item.split("=", 1) if "=" in item else (item, "") for item in args.peer_args] or [("peer", "")]
        systems += [(name, "peer", shlex.split(flags)) for name, flags in peers]
    inputs = prepare(out, setup, args.tiny, args.base)
    if args.prepare_only:
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = []
    for system, kind, spec in systems:
        for seed in seeds:
            result = run_one(system, kind, spec, seed, inputs, setup, out, args.peer_script, not args.no_reuse)
            results.append({k: v for k, v in result.items() if k != "key"})
            if not args.json:
                print(f"{system} seed {seed}: win rate {result['win_rate']:.1%}, mean reward {result['mean_reward']:.4f}, "
                      f"train {result['train_wall_s']:.0f} s", flush=True)
    summary = summarise(results)
    report = {"setup": asdict(setup), "preference": inputs["preference"], "base": str(inputs["base_dir"]),
              "base_mean_reward": _mean_reward(inputs["base_rewards"]), "base_fidelity": inputs["base_fidelity"],
              "base_lr_position_accuracy": inputs["base_positions"]["lr_position_accuracy"],
              "base_lr_mirrored": inputs["base_positions"]["lr_mirrored"],
              "peer_script": args.peer_script, "peer_commit": PEER_COMMIT if args.peer_script else None,
              "systems": {name: {"kind": kind, "spec": spec} for name, kind, spec in systems},
              "runs": results, "summary": summary}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    if not args.json:
        print(table(results, summary))
        print(f"json: {out / 'compare.json'}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
