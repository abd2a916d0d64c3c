"""Rounds of on-policy AI-feedback DPO: generate pairs -> train -> evaluate, K times, each round sampling the
previous round's policy (iterative DPO; ``t2ialign pairs rounds CONFIG``, docs/FEEDBACK.md).

Round k (1-based):

* **pairs**: sample the policy of round k-1 (round 1: the base; round k: round k-1's training base with
  round k-1's export as ``aligned``), label with the recipe's scorers (``build_pairs``);
* **init** (k >= 2): the trainer's ``model.pretrained`` for round k: a pipeline directory equal to the
  policy of round k-1 (the other components are symlinks; the UNet is the previous export's UNet, or the
  previous base with the LoRA fused in, saved in fp32). The trainer has no "start from this adapter" key,
  so a new LoRA is trained on top of the previous policy, whose frozen copy is the DPO reference: the
  iterative recipe of Self-Rewarding LMs / Iterative RPO / SPIN-Diffusion (reference = previous iterate);
* **train**: ``t2ialign train`` on round k's pairs only, ``resume: latest``;
* **eval**: the round's policy and the base sample the same held-out prompts with the same seeds; win
  rate over the base (and over round k-1) per labelling scorer, bootstrap 95% CI.

Every step is skipped when its output is complete, so a killed run continues where it stopped and a rerun
of a finished recipe changes nothing. Run folder::

    OUT/recipe.json                 the recipe (a rerun may change only rounds / progress / threads)
    OUT/eval_prompts.jsonl, OUT/eval_base/   held-out prompts; the base's samples and scores
    OUT/round_K/prompts.jsonl       this round's pair prompts
    OUT/round_K/pairs/              build_pairs' folder (train.parquet, summary.json, samples/, ...)
    OUT/round_K/init/               (K >= 2) the pipeline round K trains from (= round K-1's policy)
    OUT/round_K/train/              the training run (final/ = the export)
    OUT/round_K/eval/, eval.json    held-out samples, scores and win rates
    OUT/rounds.json, OUT/rounds.md  all rounds' results and the table
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from t2ialign.errors import UserFacingError

from .schema import PARQUET_NAME, write_json_atomic

logger = logging.getLogger(__name__)

# settings a rerun may change: they do not change what any finished step produced
RESUMABLE = ("rounds", "progress", "threads")
TOY_BASE = "toy"  # ``base: toy``: the shipped tiny SDXL pipeline (toy.pretrain.get_toy_pipeline)


@dataclass
class RoundsRecipe:
    output_dir: str
    base: str = "stabilityai/stable-diffusion-xl-base-1.0"  # hub id / directory, or "toy"
    rounds: int = 2
    # pair prompts: a prompt set / file / parquet / hub dataset (as `pairs build --prompts`), or toy:N (N toy captions)
    prompts: str = "partiprompts"
    prompt_column: str = "caption"
    prompts_limit: Optional[int] = None  # the first N prompts of the source
    prompts_per_round: Optional[int] = None  # round k takes prompts [(k-1)n, kn): fresh prompts; None: all every round
    eval_prompts: str = "partiprompts"  # held-out prompts (toy-heldout:N: the demo's held-out toy captions)
    eval_limit: Optional[int] = None
    eval_images: int = 1  # images per held-out prompt (a prompt's reward is their mean)
    num_images: int = 4  # images per pair prompt
    scorers: list = field(default_factory=lambda: ["pickscore"])  # the labelling scorer(s), also the evaluation's
    weights: Optional[list] = None
    strategy: str = "best-worst"
    min_margin: float = 0.0
    scorer_options: dict = field(default_factory=dict)  # device, dtype, scorer_paths, batch_size
    sampling: dict = field(default_factory=dict)  # SampleConfig fields shared by every sampling (steps, cfg, device...)
    train: dict = field(default_factory=dict)  # TrainConfig fragment; model.pretrained/data.dataset/output_dir set per round
    seed: int = 0
    n_boot: int = 1000
    threads: Optional[int] = None  # torch.set_num_threads (toy models: 1 is fastest, as in the demo)
    progress: bool = True


def load_recipe(path, overrides=None) -> RoundsRecipe:
    from t2ialign.config.parsing import ConfigError, apply_overrides, from_dict, load_yaml

    recipe = from_dict(RoundsRecipe, apply_overrides(load_yaml(path), overrides or []))
    if recipe.rounds < 1 or recipe.num_images < 2 or recipe.eval_images < 1:
        raise ConfigError("rounds >= 1, num_images >= 2 and eval_images >= 1 are required")
    for key in ("model.pretrained", "data.dataset", "output_dir", "resume"):
        section, _, name = key.rpartition(".")
        if name in (recipe.train.get(section) or {} if section else recipe.train):
            raise ConfigError(f"train.{key}: set per round by the recipe; remove it")
    return recipe


# ---------------------------------------------------------------- the driver


def run_rounds(recipe: RoundsRecipe) -> dict:
    """Run (or continue) every round; returns the rounds.json content."""
    import torch

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(out, recipe)
    threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    try:
        return _run_all(_Run(recipe, out, _base_dir(recipe)))
    finally:
        torch.set_num_threads(threads)  # a caller's own work (tests, notebooks) keeps its threads


def _run_all(run: "_Run") -> dict:
    recipe = run.recipe
    pair_prompts = _prompt_source(recipe.prompts, recipe, recipe.prompts_limit)
    _write_prompts(run.eval_file, _prompt_source(recipe.eval_prompts, recipe, recipe.eval_limit))
    policy = (run.base, None)  # (pretrained, aligned) of the model round k samples its pairs from
    for k in range(1, recipe.rounds + 1):
        policy = _run_round(run, k, policy, pair_prompts)
    return _write_results(run)


@dataclass
class _Run:
    recipe: RoundsRecipe
    out: Path
    base: str
    _scorers: Optional[dict] = None

    @property
    def eval_file(self) -> Path:
        return self.out / "eval_prompts.jsonl"

    def scorers(self) -> dict:
        """The labelling scorers for the evaluation, loaded once and only if something is left to score."""
        if self._scorers is None:
            from t2ialign.evaluation.recipes import _build_scorers

            from .build import _loader_options

            built = _build_scorers(list(self.recipe.scorers), **_loader_options(self.recipe.scorer_options))
            self._scorers = {s.name: s for s in built}
        return self._scorers


def _run_round(run: _Run, k: int, previous: tuple, pair_prompts: list) -> tuple:
    """One round; returns its policy ``(pretrained, export)``."""
    recipe, folder = run.recipe, run.out / f"round_{k}"
    folder.mkdir(exist_ok=True)
    prompts = _write_prompts(folder / "prompts.jsonl", _round_prompts(pair_prompts, recipe.prompts_per_round, k))
    parquet = _pairs_step(recipe, folder / "pairs", previous, prompts, k)
    init = run.base if k == 1 else _init_step(recipe, previous, folder / "init")
    export = _train_step(recipe, init, parquet, folder / "train")
    _eval_step(run, k, (init, str(export)))
    return init, str(export)


def _pairs_step(recipe, out: Path, policy: tuple, prompts: Path, k: int) -> Path:
    from .build import PairsConfig, build_pairs

    if _pairs_complete(out):
        logger.info("round pairs %s: complete, skipped", out)
        return out / PARQUET_NAME
    n_prompts = sum(1 for line in prompts.read_text().splitlines() if line.strip())
    # disjoint per-image seeds across rounds: image_seed = seed + prompt_index * N + image_index
    seed = recipe.seed + (k - 1) * n_prompts * recipe.num_images
    sample = _sample_config(recipe, policy, str(prompts), out / "samples", recipe.num_images, seed)
    config = PairsConfig(sample=sample, scorers=list(recipe.scorers), weights=recipe.weights, strategy=recipe.strategy,
                         min_margin=recipe.min_margin, out_dir=str(out), scorer_options=dict(recipe.scorer_options),
                         progress=recipe.progress)
    return build_pairs(config)


def _pairs_complete(out: Path) -> bool:
    # build_pairs writes train.parquet, then summary.json, then summary.png: the last one marks the end
    return all((out / name).is_file() for name in (PARQUET_NAME, "summary.json", "summary.png"))


def _train_step(recipe, init: str, parquet: Path, run_dir: Path) -> Path:
    from t2ialign.config import load_train_config
    from t2ialign.training import train

    export = run_dir / "final"
    if (export / "export.json").is_file():  # the trainer writes final/ atomically, manifest included
        logger.info("round training %s: complete, skipped", run_dir)
        return export
    train(load_train_config(data=round_train_config(recipe, init, parquet, run_dir)))
    return export


def round_train_config(recipe, init: str, parquet: Path, run_dir: Path) -> dict:
    """The recipe's TrainConfig fragment with this round's base, pairs and folder; ``resume: latest`` continues a
    killed run from its last checkpoint (and starts a fresh one when there is none)."""
    config = copy.deepcopy(recipe.train)
    config.setdefault("model", {})["pretrained"] = str(init)
    config.setdefault("data", {})["dataset"] = str(parquet)
    config.update(output_dir=str(run_dir), resume="latest")
    return config


def _eval_step(run: _Run, k: int, policy: tuple) -> None:
    recipe, out = run.recipe, run.out
    path = out / f"round_{k}" / "eval.json"
    if path.is_file():
        logger.info("round eval %s: complete, skipped", path)
        return
    base = _folder_rewards(run, (run.base, None), out / "eval_base")
    mine = _folder_rewards(run, policy, out / f"round_{k}" / "eval")
    previous = base if k == 1 else _folder_rewards(run, None, out / f"round_{k - 1}" / "eval")
    entry = {"round": k, "model": {"pretrained": policy[0], "aligned": policy[1]},
             "scorers": {n: _compare(recipe, n, mine[n], base[n], previous[n], k) for n in mine}}
    write_json_atomic(entry, path)


def _folder_rewards(run: _Run, policy: Optional[tuple], folder: Path) -> dict:
    """``{scorer: {prompt_index: mean reward}}`` of a held-out folder, sampled (if ``policy``: the same held-out
    prompts and seeds for every model) and scored as needed (both resume where they stopped)."""
    from t2ialign.evaluation.folders import read_metadata

    from .scores import score_images

    recipe, samples = run.recipe, folder / "samples"
    if policy is not None:
        from t2ialign.evaluation.sampling import sample

        sample(_sample_config(recipe, policy, str(run.eval_file), samples, recipe.eval_images, recipe.seed))
    rows = sorted(read_metadata(str(samples)), key=lambda r: (r["prompt_index"], r.get("image_index", 0)))
    scorers = run.scorers()
    chunk = int(recipe.scorer_options.get("batch_size") or 32)
    done = score_images(samples, rows, scorers, folder / "image_scores.jsonl", chunk=chunk, progress=recipe.progress)
    rewards: dict = {n: {} for n in scorers}
    for r in rows:
        for n in scorers:
            rewards[n].setdefault(r["prompt_index"], []).append(done[r["file"]][n])
    return {n: {i: float(np.mean(v)) for i, v in per.items()} for n, per in rewards.items()}


def _compare(recipe, scorer: str, mine: dict, base: dict, previous: dict, k: int) -> dict:
    from t2ialign.evaluation.stats import bootstrap_win_rate

    def win(other: dict, name: str) -> dict:
        keys = sorted(set(mine) & set(other))
        w = bootstrap_win_rate([mine[i] for i in keys], [other[i] for i in keys], n_boot=recipe.n_boot, seed=recipe.seed,
                               model_a=f"round_{k}", model_b=name, scorer=scorer)
        return {"win_rate": w.win_rate, "ci_low": w.low, "ci_high": w.high, "wins": w.wins, "ties": w.ties,
                "losses": w.losses, "n": w.n}

    return {"vs_base": win(base, "base"), "vs_previous": win(previous, "base" if k == 1 else f"round_{k - 1}"),
            "mean_reward": float(np.mean(list(mine.values()))), "base_mean_reward": float(np.mean(list(base.values())))}


# ---------------------------------------------------------------- the previous policy as the trainer's base


def _init_step(recipe, policy: tuple, out: Path) -> str:
    """A pipeline directory equal to ``policy`` (pretrained + export), built once and renamed into place."""
    if (out / "policy.json").is_file():
        return str(out)
    from t2ialign.models.pipeline import resolve_aligned

    kind, weights = resolve_aligned(policy[1])
    if kind == "transformer":
        from t2ialign.errors import UserFacingError

        raise UserFacingError(f"pairs rounds: {policy[1]} is a flow transformer (SD3 / FLUX); on-policy rounds merge "
                              "UNet exports only for now")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = _local_pipeline(policy[0])
    for entry in source.iterdir():  # everything but the UNet is shared with the previous base
        if entry.name != "unet":
            (tmp / entry.name).symlink_to(entry.resolve())
    if kind == "unet":
        (tmp / "unet").symlink_to(Path(weights).resolve())
    else:
        _fuse_lora(recipe, policy, tmp / "unet")
    write_json_atomic({"pretrained": policy[0], "aligned": policy[1], "kind": kind}, tmp / "policy.json")
    os.replace(tmp, out)
    return str(out)


def _fuse_lora(recipe, policy: tuple, unet_dir: Path) -> None:
    """The previous base's UNet with the LoRA fused in, saved in fp32: a LoRA delta after a few hundred steps
    at lr 1e-5 is below bf16's resolution of the base weights and would round away."""
    import torch

    from t2ialign.evaluation.sampling import pick_device
    from t2ialign.models.pipeline import load_pipeline

    pipe = load_pipeline(policy[0], aligned=policy[1], dtype=torch.float32,
                         device=pick_device(recipe.sampling.get("device", "auto")))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    pipe.unet.to("cpu").save_pretrained(unet_dir, safe_serialization=True)


def _local_pipeline(pretrained: str) -> Path:
    path = Path(pretrained)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(pretrained, local_files_only=True))  # sampled in round 1, so it is cached


# ---------------------------------------------------------------- prompts, sampling, the recipe


def _base_dir(recipe) -> str:
    if recipe.base == TOY_BASE:
        from t2ialign.toy.pretrain import get_toy_pipeline

        return str(get_toy_pipeline())
    return recipe.base


def _prompt_source(spec: str, recipe, limit: Optional[int]) -> list[str]:
    """Prompts of ``spec``; ``toy:N`` / ``toy-heldout:N`` are the demo's pair / held-out toy captions."""
    if spec.startswith(("toy:", "toy-heldout:")):
        from t2ialign.toy import world
        from t2ialign.toy.demo import held_out_prompts

        n = int(spec.split(":", 1)[1])
        prompts = [r.prompt for r in held_out_prompts(n, recipe.seed)] if spec.startswith("toy-heldout:") \
            else world.sample_captions(n, seed=recipe.seed)
        return prompts[:limit] if limit is not None else prompts
    from .build import load_records

    return [r.prompt for r in load_records(spec, recipe.prompt_column, limit)]


def _round_prompts(prompts: list, per_round: Optional[int], k: int) -> list:
    if per_round is None:
        return prompts
    chosen = prompts[(k - 1) * per_round : k * per_round]
    if not chosen:
        raise UserFacingError(f"prompts_per_round: round {k} needs prompts {(k - 1) * per_round}.. but the source has "
                              f"{len(prompts)}; give more prompts or a smaller prompts_per_round")
    return chosen


def _write_prompts(path: Path, prompts: list) -> Path:
    """A JSON string per line (captions may hold newlines); left alone once written (a rerun reads the same)."""
    text = "".join(json.dumps(p) + "\n" for p in prompts)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def _sample_config(recipe, policy: tuple, prompts: str, out: Path, num_images: int, seed: int):
    from t2ialign.config.sample import load_sample_config

    data = {**recipe.sampling, "pretrained": policy[0], "aligned": policy[1], "prompts": prompts,
            "output_dir": str(out), "num_images_per_prompt": num_images, "seed": seed, "progress_bar": recipe.progress}
    return load_sample_config(data=data)


def _check_same_recipe(out: Path, recipe) -> None:
    """A rerun continues the same experiment: only RESUMABLE settings may differ from the stored recipe."""
    path = out / "recipe.json"
    wanted = json.loads(json.dumps(asdict(recipe)))
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = sorted(k for k in set(stored) | set(wanted) if k not in RESUMABLE and stored.get(k) != wanted.get(k))
        if changed:
            raise UserFacingError(f"{out} holds rounds run with another recipe ({', '.join(changed)} differ); rerun "
                                  "the same recipe to continue it (rounds may grow), or set another output_dir")
        if stored == wanted:
            return
    write_json_atomic(wanted, path)


# ---------------------------------------------------------------- results


def _write_results(run: _Run) -> dict:
    out = run.out
    entries = [json.loads((out / f"round_{k}" / "eval.json").read_text()) for k in range(1, run.recipe.rounds + 1)]
    results = {"base": run.base, "scorers": list(run.recipe.scorers), "rounds": entries}
    for name, text in (("rounds.json", json.dumps(results, indent=2)), ("rounds.md", rounds_table(results))):
        path = out / name
        if not path.is_file() or path.read_text() != text:  # unchanged results leave the files untouched
            tmp = path.with_name(name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    return results


def rounds_table(results: dict) -> str:
    """Markdown: per round and scorer, the win rate over the base (95% CI), over the previous round, and the mean."""
    def pct(x):
        return f"{100 * x:.1f}%"

    lines = ["| round | scorer | win rate vs base | 95% CI | vs previous round | mean reward |", "|---|---|---|---|---|---|"]
    for name, s in (results["rounds"][0]["scorers"].items() if results["rounds"] else []):
        lines.append(f"| 0 (base) | {name} | - | - | - | {s['base_mean_reward']:.4f} |")
    for entry in results["rounds"]:
        for name, s in entry["scorers"].items():
            b, p = s["vs_base"], s["vs_previous"]
            # round 1's previous policy is the base: the same comparison, shown once
            vs_previous = "-" if entry["round"] == 1 else f"{pct(p['win_rate'])} [{pct(p['ci_low'])}, {pct(p['ci_high'])}]"
            lines.append(f"| {entry['round']} | {name} | {pct(b['win_rate'])} | [{pct(b['ci_low'])}, {pct(b['ci_high'])}] | "
                         f"{vs_previous} | {s['mean_reward']:.4f} |")
    return "\n".join(lines) + "\n"
