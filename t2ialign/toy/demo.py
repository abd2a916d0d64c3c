"""``t2ialign demo``: the whole method, offline, on a CPU, in minutes.

pretrain the toy pipeline (or reuse the cache) -> sample preference pairs from it and label them with a
programmatic "human" -> align with each objective through the same ``train()`` a real SDXL run uses ->
sample base and aligned models on held-out prompts with identical seeds -> score -> table + report.
Training runs in chunks resumed from the last checkpoint (the real resume path), and the aligned
model is scored after each chunk to draw reward over training.

``family="sd3"`` runs the same loop on the rectified-flow toy (``toy.flow_pretrain``: a tiny
StableDiffusion3Pipeline sharing the SDXL toy's VAE and CLIP encoders), trained through the flow step
(``training.flow_step``) with the objectives defined for flow models (not DDIM-InPO).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from PIL import Image

from t2ialign.config import SampleConfig, load_train_config
from t2ialign.evaluation.prompts import PromptRecord
from t2ialign.evaluation.sampling import sample
from t2ialign.evaluation.stats import bootstrap_win_rate
from t2ialign.training import train

logger = logging.getLogger(__name__)

# Toy-world settings per objective, found by measurement on the demo's default world. Each is a
# plain TrainConfig fragment; the demo writes the full config next to every run so it can be rerun
# with `t2ialign train`. DPO keeps TrainConfig's data defaults (random flips, no prompt dropout), as the
# diffusers Diffusion-DPO script does: over 10 seeds 86.0% win rate against 83.9% with the demo's former
# no-flip / 10%-dropout data (a gain within seed noise; neither setting alone moved it), and flips left
# the left/right placement of the toy shapes unchanged (docs/PEER_COMPARISON.md).
OBJECTIVE_RECIPES = {
    "dpo": {"objective": {"name": "dpo", "beta": 2000.0}, "optim": {"learning_rate": 1e-3},
            "data": {"random_flip": True, "prompt_dropout": 0.0}},
    "mapo": {"objective": {"name": "mapo", "beta": 0.5}, "optim": {"learning_rate": 3e-4}},
    "dcpo": {"objective": {"name": "dcpo", "beta": 2000.0}, "optim": {"learning_rate": 1e-3}},
    "inpo": {"objective": {"name": "inpo", "beta": 2000.0}, "optim": {"learning_rate": 1e-3}},
    "sft": {"objective": {"name": "sft"}, "optim": {"learning_rate": 3e-3}},
}

# The rectified-flow toy (family "sd3"). Velocity errors are ~5x the toy UNet's epsilon errors (v = eps - x0 has
# twice a unit latent's variance; the base's error is 0.3 against 0.06), so DPO / DCPO need a smaller beta for the
# same implicit-reward scale. Tuned on 128 prompts and sampling seeds apart from the held-out ones (captions seed
# 20000, seed 7), 150 steps: DPO beta 50 / 150 / 500 / 2000 at lr 1e-3 won 80.5 / 82.0 / 75.0 / 78.9% (lr 3e-3:
# 75.0% at 150, 69.5% at 500), a sign-flipped DPO at 150 13.3%; DCPO 150 / 500: 89.1 / 87.5%. LoRA covers the
# joint attention's context projections too (add_*_proj, to_add_out).
FLOW_OBJECTIVE_RECIPES = {
    "dpo": {"objective": {"name": "dpo", "beta": 150.0}, "optim": {"learning_rate": 1e-3},
            "data": {"random_flip": True, "prompt_dropout": 0.0}},
    "mapo": {"objective": {"name": "mapo", "beta": 0.5}, "optim": {"learning_rate": 3e-4}},
    "dcpo": {"objective": {"name": "dcpo", "beta": 150.0}, "optim": {"learning_rate": 1e-3}},
    "sft": {"objective": {"name": "sft"}, "optim": {"learning_rate": 3e-3}},
}
FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FAMILIES = ("sdxl", "sd3")

# the pairs' pre-encoded latents and text (``t2ialign cache``), shared by the objectives without random flips;
# fp32 storage: training from it equals training from the images bit for bit
LATENT_CACHE_DIR = "latents"
LATENT_CACHE_DTYPE = "fp32"


@dataclass
class DemoSettings:
    output_dir: str = "t2ialign-demo"
    family: str = "sdxl"  # the toy base: "sdxl" (UNet, toy.pretrain) or "sd3" (rectified flow, toy.flow_pretrain)
    preference: Optional[str] = None  # None: the toy world's default preference
    objectives: Optional[list] = None  # None: every objective with a recipe for the family
    num_pairs: int = 512
    pair_sample_steps: Optional[int] = None  # sampler steps of the pairs' images (None: the pairs builder's default)
    train_steps: int = 150
    curve_points: int = 2  # reward-over-training evaluations (training is chunked and resumed)
    # the curve's intermediate points sample only the first curve_prompts held-out prompts (per-image seeds:
    # the same images as in the full set), and every point of the curve, base included, averages over them
    curve_prompts: Optional[int] = 32
    train_batch_size: int = 16
    num_eval_prompts: int = 128
    sample_steps: int = 20
    guidance_scale: float = 4.0
    rlg_objective: str = "dpo"
    # None: [0, 0.5, 1, 1.5, 2]
    rlg_scales: Optional[list] = None
    rlg_prompts: Optional[int] = 64  # the sweep samples the first rlg_prompts held-out prompts (None: all)
    label_noise: float = 0.0
    # LoRA by default: on the toy model a full fine-tune drifts (its denoising error grows) faster than it
    # learns the preference; the adapter keeps it near the base, as the KL term intends
    lora: bool = True
    seed: int = 0
    pretrain_steps: Optional[int] = None  # None: the toy world's default pretraining budget
    workers: int = 2  # processes for the pairs, the objectives and the RLG scales (1 = this process only)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.objectives is None:
            self.objectives = list(recipes(self.family))
        if self.rlg_scales is None:
            self.rlg_scales = [0.0, 0.5, 1.0, 1.5, 2.0]


def recipes(family: str = "sdxl") -> dict:
    """The family's objective recipes: the UNet toy's, or the flow toy's (no DDIM-InPO: it inverts a UNet)."""
    return FLOW_OBJECTIVE_RECIPES if family == "sd3" else OBJECTIVE_RECIPES


def _toy():
    """The toy world's entry points (imported lazily: the demo is the only caller)."""
    from t2ialign.toy import pairs, preferences, pretrain, world

    return pairs, preferences, pretrain, world


def held_out_prompts(num: int, seed: int) -> list[PromptRecord]:
    _, _, _, world = _toy()
    captions = world.sample_captions(num, seed=seed + 10_000)  # a seed range the pairs never use
    return [PromptRecord(prompt=c, index=i, source="toy-heldout") for i, c in enumerate(captions)]


def folder_rewards(folder: Path, reward_fn) -> dict[int, dict]:
    """Per prompt index of a sample folder: the mean reward and the first image's path."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = _pil_to_tensor([Image.open(folder / r["file"]) for r in rows])
    rewards = reward_fn(images, [r["prompt"] for r in rows]).tolist()
    per_prompt: dict[int, dict] = {}
    for row, value in zip(rows, rewards):
        entry = per_prompt.setdefault(row["prompt_index"], {"values": [], "file": str(folder / row["file"]), "prompt": row["prompt"]})
        entry["values"].append(value)
    return {k: {**v, "reward": float(np.mean(v["values"]))} for k, v in sorted(per_prompt.items())}


def toy_base_dir(settings: DemoSettings) -> Path:
    """The family's pretrained toy base (cached; trained first when missing)."""
    _, _, pretrain, _ = _toy()
    steps = {"steps": settings.pretrain_steps} if settings.pretrain_steps else {}
    if settings.family == "sd3":
        from t2ialign.toy.flow_pretrain import get_flow_toy_pipeline

        return get_flow_toy_pipeline(cache=True, **steps)
    return pretrain.get_toy_pipeline(cache=True, **steps)


def sample_toy(config: SampleConfig, records, family: str = "sdxl") -> Path:
    """``sample()`` of a toy base (the flow toy's T5 length travels in ``config.max_sequence_length``)."""
    return sample(config, records)


def sample_toy_folder(config: SampleConfig, records, family: str = "sdxl") -> str:
    """``demo_tasks.sample_folder`` through ``sample_toy`` (a worker task: module level, picklable)."""
    started = time.time()
    folder = sample_toy(config, records, family)
    logger.info("sampled %s in %.0f s", folder, time.time() - started)
    return str(folder)


def _sample_config(settings: DemoSettings, base_dir: Path, out: Path, aligned: Optional[Path] = None, **extra) -> SampleConfig:
    if settings.family == "sd3":  # the flow toy was trained on T5_LENGTH tokens; the pipeline's default is 256
        from t2ialign.toy.flow_pretrain import T5_LENGTH

        extra.setdefault("max_sequence_length", T5_LENGTH)
    return SampleConfig(
        pretrained=str(base_dir), aligned=str(aligned) if aligned else None, output_dir=str(out), seed=settings.seed,
        num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance_scale, batch_size=64,
        device="cpu", dtype="fp32", progress_bar=False, **extra,
    )


def train_config(settings: DemoSettings, base_dir: Path, pairs_path: Path, objective: str, run_dir: Path, max_steps: int,
                 cache_dir: Optional[Path] = None) -> dict:
    """``objective``'s TrainConfig fragment; ``cache_dir``: train from the pairs' pre-encoded latents there."""
    from t2ialign.objectives import get_objective

    recipe = _recipe(objective, settings.family)
    model = {"pretrained": str(base_dir)}
    if get_objective(recipe["objective"]["name"]).needs_reference and not settings.lora:
        model["reference_dtype"] = "fp32"  # CPU: half-precision kernels are slow there
    config = {
        "model": model,
        "data": {"dataset": str(pairs_path), "resolution": _toy()[3].RESOLUTION,
                 "random_flip": False, "prompt_dropout": 0.1, **recipe.get("data", {})},
        "objective": recipe["objective"],
        "optim": {"warmup_steps": 10, "weight_decay": 0.0, **recipe.get("optim", {})},
        "lora": {"enabled": settings.lora, "rank": 8},
        "output_dir": str(run_dir), "seed": settings.seed, "max_steps": max_steps,
        "train_batch_size": settings.train_batch_size, "checkpoint_every": max_steps, "keep_last_checkpoints": 1,
        "log_every": 5, "report_to": "none", "progress_bar": True, "resume": "latest",
    }
    if cache_dir is not None:
        config["data"].update(cache_dir=str(cache_dir), cache_dtype=LATENT_CACHE_DTYPE)
    if settings.family == "sd3":
        from t2ialign.toy.flow_pretrain import T5_LENGTH

        config["lora"]["target_modules"] = list(FLOW_LORA_TARGETS)
        config["flow"] = {"max_sequence_length": T5_LENGTH}  # the T5 length the toy was pretrained with
    return config


def _recipe(objective: str, family: str = "sdxl") -> dict:
    return recipes(family).get(objective, {"objective": {"name": objective}})


def uses_latent_cache(objective: str, family: str = "sdxl") -> bool:
    """Whether ``objective`` trains from the shared latent cache: every recipe without random flips (a cache of
    one augmentation draw is then exactly the image path; DPO's flips would need one draw per epoch)."""
    data = _recipe(objective, family).get("data", {})
    return not data.get("random_flip", False) and not data.get("random_crop", False)


def latent_cache_config(settings: DemoSettings, base_dir: Path, pairs_path: Path, cache_dir: Path) -> dict:
    """The TrainConfig ``t2ialign cache`` encodes the pairs with, for every objective ``uses_latent_cache``.

    Built once for all of them: the VAE and text encoders run once per pair instead of once per step and
    objective (40% of a step on the toy model), and fp32 storage makes the runs the image path's bit for bit.
    The consumers' first objective names the build, so DCPO's per-image captions are stored when it is one."""
    from t2ialign.objectives import get_objective

    consumers = [o for o in settings.objectives if uses_latent_cache(o, settings.family)]
    captioned = [o for o in consumers if get_objective(_recipe(o, settings.family)["objective"]["name"]).per_image_captions]
    return train_config(settings, base_dir, pairs_path, (captioned or consumers)[0], cache_dir, 1, cache_dir=cache_dir)


def curve_mean(rewards: dict, settings: DemoSettings) -> float:
    """A reward-over-training point: the mean reward over the curve's prompts (the first ``curve_prompts``)."""
    keys = sorted(rewards)[: settings.curve_prompts]
    return float(np.mean([rewards[k]["reward"] for k in keys]))


def align_with_curve(settings, base_dir, pairs_path, objective, records, reward_fn, out: Path,
                     cache_dir: Optional[Path] = None) -> tuple[Path, list]:
    """Train in ``curve_points`` chunks (each resuming the last), scoring the export after each.

    The last chunk's export samples all ``records`` (the folder the win rate is measured on); the earlier
    ones only the curve's prompts. ``cache_dir``: the pairs' latent cache (``latent_cache_config``)."""
    run_dir = out / "runs" / objective
    run_dir.mkdir(parents=True, exist_ok=True)
    # the whole run in one go (`t2ialign train demo_train.yaml`): the learning rate is constant after warm-up
    # and resuming is exact, so it trains the same weights as the chunks below
    whole = train_config(settings, base_dir, pairs_path, objective, run_dir, settings.train_steps, cache_dir)
    (run_dir / "demo_train.yaml").write_text(yaml.safe_dump({**whole, "resume": None}, sort_keys=False))
    curve = []
    chunk = max(1, settings.train_steps // settings.curve_points)
    for point in range(1, settings.curve_points + 1):
        last = point == settings.curve_points
        steps = settings.train_steps if last else chunk * point
        result = train(load_train_config(data=train_config(settings, base_dir, pairs_path, objective, run_dir, steps, cache_dir)))
        prompts = records if last else records[: settings.curve_prompts]
        folder = sample_toy(_sample_config(settings, base_dir, out / "samples" / f"{objective}-step{steps}", result.export_dir),
                            prompts, settings.family)
        curve.append({"step": steps, "mean_reward": curve_mean(folder_rewards(folder, reward_fn), settings)})
    return result.export_dir, curve


def _table(rows: list[dict]) -> str:
    lines = [f"{'objective':<10} {'win rate vs base':>16} {'95% CI':>16} {'mean reward':>12}"]
    for r in rows:
        lines.append(f"{r['objective']:<10} {r['win_rate']:>16.1%} {'[' + format(r['ci_low'], '.1%') + ', ' + format(r['ci_high'], '.1%') + ']':>16} {r['mean_reward']:>12.4f}")
    return "\n".join(lines)


def run_demo(settings: DemoSettings) -> dict:
    from t2ialign.toy.demo_tasks import TaskPool

    _, preferences, _, _ = _toy()
    started = time.time()
    # the toy models' kernels are too small to split across threads: one thread is several times
    # faster, and on a busy machine OpenMP spin-waiting would make more threads up to 50x slower;
    # the cores are used by worker processes instead (toy.demo_tasks)
    torch.set_num_threads(1)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    preference_name = settings.preference or preferences.DEFAULT_PREFERENCE
    reward_fn = preferences.get_preference(preference_name)
    check_settings(settings)

    base_dir = toy_base_dir(settings)
    records = held_out_prompts(settings.num_eval_prompts, settings.seed)
    with TaskPool(settings.workers) as pool:
        pairs_path = _build_pairs(pool, settings, base_dir, preference_name, out)
        aligned = _start_objectives(pool, settings, base_dir, pairs_path, records, preference_name, out)
        base_folder = Path(_start_base_sample(pool, settings, base_dir, records, out).result())
        rlg_tasks = _start_rlg(pool, settings, base_dir, aligned, base_folder, records, out)
        _import_reporting()
        base_rewards = folder_rewards(base_folder, reward_fn)
        rows, curves, per_model, exports = [], {}, {"base": base_rewards}, {}
        for objective in settings.objectives:
            export_dir, curve = aligned[objective].result()
            exports[objective] = Path(export_dir)
            rewards = folder_rewards(out / "samples" / f"{objective}-step{settings.train_steps}", reward_fn)
            rows.append(_win_row(objective, rewards, base_rewards, preference_name, settings.seed))
            curves[objective] = [{"step": 0, "mean_reward": curve_mean(base_rewards, settings)}] + curve
            per_model[objective] = rewards
        for task in rlg_tasks:
            task.result()

    rlg = _rlg_sweep(settings, base_dir, exports, records, reward_fn, preference_name, out)
    report = _write_outputs(out, settings, preference_name, rows, curves, rlg, per_model, time.time() - started)
    print(_table(rows))
    print(f"report: {out / 'report'}  ({report['elapsed_s']:.0f} s)")
    return report


def check_settings(settings: DemoSettings) -> None:
    """Refuse, before any work, what the flow toy cannot run: an objective its trainer refuses (DDIM-InPO), and the
    RLG sweep, whose sampler (``sample_folder`` in the workers) does not pass the toy's T5 length."""
    from t2ialign.errors import UserFacingError
    from t2ialign.objectives import get_objective

    if settings.family != "sd3":
        return
    inverting = [o for o in settings.objectives if get_objective(_recipe(o, "sd3")["objective"]["name"]).uses_inversion]
    if inverting:
        raise UserFacingError(f"objectives {', '.join(inverting)}: DDIM inversion is defined for epsilon-prediction UNets, "
                              f"not the rectified-flow (sd3) toy; its objectives: {', '.join(FLOW_OBJECTIVE_RECIPES)}")


def _build_pairs(pool, settings: DemoSettings, base_dir: Path, preference_name: str, out: Path) -> Path:
    """The labelled pairs: their images sampled batch by batch in the workers, labelled and written here."""
    from t2ialign.toy.demo_tasks import pair_images

    pairs_mod, _, _, world = _toy()
    prompts = world.sample_captions(settings.num_pairs, seed=settings.seed)
    steps = settings.pair_sample_steps or pairs_mod.DEFAULT_STEPS
    images = pair_images(pool, base_dir, prompts, settings.seed, steps, pairs_mod.DEFAULT_GUIDANCE)
    return pairs_mod.build_preference_pairs(
        base_dir, preference=preference_name, num_pairs=settings.num_pairs, prompts=prompts, out_dir=out / "pairs",
        label_noise=settings.label_noise, seed=settings.seed, num_inference_steps=steps, images=images,
    )


def _by_cost(settings: DemoSettings) -> list[str]:
    """Objectives in the order they are handed to the workers: the longest first, so no worker is left with
    a long job at the end (inversion objectives cost ~3x: DDIM inversion runs the UNet 10 more times per
    step), then the RL-guidance one, so the sweep's scales can start while the others train."""
    from t2ialign.objectives import get_objective

    def rank(objective: str) -> tuple:
        name = _recipe(objective, settings.family)["objective"]["name"]
        return (not get_objective(name).uses_inversion, objective != settings.rlg_objective)

    return sorted(settings.objectives, key=rank)


def _start_objectives(pool, settings, base_dir, pairs_path, records, preference_name, out) -> dict:
    """Each objective's task; those that read the latent cache start once it is built, the others with the build."""
    from t2ialign.toy.demo_tasks import align_objective, build_latent_cache

    def start(objective, cache_dir=None):
        return pool.submit(align_objective, settings, base_dir, pairs_path, objective, records, preference_name, out, cache_dir)

    cached = [o for o in _by_cost(settings) if uses_latent_cache(o, settings.family)]
    cache_dir = pairs_path.parent / LATENT_CACHE_DIR
    shutil.rmtree(cache_dir, ignore_errors=True)  # a cache of earlier pairs in this folder would be resumed, not rebuilt
    build = pool.submit(build_latent_cache, latent_cache_config(settings, base_dir, pairs_path, cache_dir)) if cached else None
    tasks = {objective: start(objective) for objective in _by_cost(settings) if objective not in cached}
    if build is not None:
        build.result()
        tasks.update({objective: start(objective, cache_dir) for objective in cached})
    return tasks


def _start_base_sample(pool, settings, base_dir, records, out):
    return pool.submit(sample_toy_folder, _sample_config(settings, base_dir, out / "samples" / "base"), records, settings.family)


def _win_row(objective: str, rewards: dict, base_rewards: dict, preference_name: str, seed: int) -> dict:
    keys = sorted(set(rewards) & set(base_rewards))
    aligned, base = [rewards[k]["reward"] for k in keys], [base_rewards[k]["reward"] for k in keys]
    win = bootstrap_win_rate(aligned, base, model_a=objective, model_b="base", scorer=preference_name, seed=seed)
    return {"objective": objective, "win_rate": win.win_rate, "ci_low": win.low, "ci_high": win.high,
            "mean_reward": float(np.mean(aligned)), "base_mean_reward": float(np.mean(base))}


def _rlg_base_config(settings, base_dir, export_dir, out):
    return _sample_config(settings, base_dir, out / "rlg", None, guide_with=str(export_dir))


def _start_rlg(pool, settings, base_dir, aligned: dict, base_folder: Path, records, out) -> list:
    """Fill the RLG sweep's folders once the guiding objective is trained: w = 0 and w = 1 reuse the base and
    aligned samples (exactly equal), the other scales are sampled in the workers."""
    if settings.rlg_objective not in aligned or not settings.rlg_scales or not _guidance_available():
        return []
    from t2ialign.toy.demo_tasks import presample_rlg

    export_dir, _ = aligned[settings.rlg_objective].result()
    exact = {0.0: base_folder, 1.0: out / "samples" / f"{settings.rlg_objective}-step{settings.train_steps}"}
    return presample_rlg(pool, _rlg_base_config(settings, base_dir, export_dir, out), settings.rlg_scales,
                         records[: settings.rlg_prompts], exact)


def _import_reporting() -> None:
    """Import what scoring the sweep and writing the report need while the workers still run (this process
    waits for them anyway), instead of after them."""
    import matplotlib.pyplot  # noqa: F401

    import t2ialign.evaluation.report  # noqa: F401
    import t2ialign.scoring.base  # noqa: F401


def _guidance_available() -> bool:
    try:
        import t2ialign.evaluation.sweep  # noqa: F401
        import t2ialign.guidance  # noqa: F401
    except ImportError:  # guidance not available in this build
        return False
    return True


def _rlg_sweep(settings, base_dir, exports, records, reward_fn, preference_name, out):
    """The sweep's summary and plot; its folders are already sampled (``_start_rlg``), so this only scores."""
    if settings.rlg_objective not in exports or not settings.rlg_scales or not _guidance_available():
        return None
    from t2ialign.evaluation.sweep import rlg_sweep
    from t2ialign.scoring.base import FunctionScorer

    scorer = FunctionScorer(preference_name, lambda images, prompts: reward_fn(_pil_to_tensor(images), prompts))
    base_config = _rlg_base_config(settings, base_dir, exports[settings.rlg_objective], out)
    return rlg_sweep(base_config, settings.rlg_scales, {preference_name: scorer}, out / "rlg",
                     records=records[: settings.rlg_prompts])


def _pil_to_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images])


def _score_tables(per_model: dict, preference_name: str) -> dict:
    """Evaluation-report rows (one per held-out prompt) with each model's image for the grid."""
    return {
        model: [{"prompt_index": k, "prompt": v["prompt"], "category": None, "seed": 0, "file": v["file"],
                 "scores": {preference_name: v["reward"]}} for k, v in rewards.items()]
        for model, rewards in per_model.items()
    }


def _write_outputs(out, settings, preference_name, rows, curves, rlg, per_model, elapsed) -> dict:
    """The report folder: report.html (win rates, reward over training, the runs' loss / implicit accuracy,
    the RLG sweep, samples; written by evaluation.report, which also writes each plot as a PNG) and demo.json."""
    from t2ialign.evaluation.report import write_report

    report_dir = out / "report"
    preference = _toy()[1].get_preference(preference_name)
    # the reward's docstring says what one unit is (e.g. "... in [0, 1]"): the histograms' x axis shows it
    scorer_info = {preference_name: {"name": preference_name, "description": preference.description,
                                     "scale": (preference.reward.__doc__ or "").strip().split("\n")[0]}}
    runs = {o: out / "runs" / o for o in curves if (out / "runs" / o / "metrics.jsonl").is_file()}
    files = write_report(str(report_dir), _score_tables(per_model, preference_name), baseline="base",
                         title=f"t2ialign demo: aligning the {_family_label(settings)} to '{preference_name}'", settings=asdict(settings),
                         scorer_info=scorer_info, curves=curves, runs=runs, sweep=rlg,
                         curve_label=f"mean {preference_name} reward\n({_curve_prompts_label(settings)})")
    summary = {"preference": preference_name, "results": rows, "reward_over_training": curves, "rlg_sweep": rlg,
               "settings": asdict(settings), "elapsed_s": elapsed, "report_files": {k: str(v) for k, v in files.items()}}
    (report_dir / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _curve_prompts_label(settings) -> str:
    return f"first {settings.curve_prompts} held-out prompts" if settings.curve_prompts else "held-out prompts"


def _family_label(settings) -> str:
    return {"sdxl": "toy model", "sd3": "rectified-flow (SD3) toy model"}[settings.family]
