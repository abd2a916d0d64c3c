"""Validation during training, and the over-optimisation alarm (``validation:`` in the train config).

Every ``validation.every`` optimizer steps (and once from the base model at step 0) the live policy samples a
fixed prompt set with fixed per-image seeds (the package's ``sample()`` on the family's pipeline built around the
training components and the unwrapped policy: the UNet of SD / SDXL, the transformer of SD3 / FLUX, which samples
with the run's ``flow.max_sequence_length``), the configured scorers score the images, and, with
``validation.preference_split``, the implicit-reward accuracy on held-out preference pairs is measured (for a flow
model with the flow ELBO surrogate: the same per-sample velocity errors as its training step).
Images go to ``output_dir/validation/step-XXXXXXXX/`` and to tensorboard / wandb; ``val/<scorer>``,
``val/implicit_acc`` and ``val/seconds`` go to metrics.jsonl (records with ``"validation": true``) and the trackers.

Validation leaves the training trajectory exactly as it was: it uses its own generators, saves and restores
the global RNG states (python, numpy, torch CPU and CUDA), runs under ``torch.no_grad`` with every module in
eval mode and puts each module's train/eval flag back afterwards. A run's training records are the same with
and without validation (tests/test_validation.py).

The alarm: when the training metric (``alarm.train_metric``, averaged over the optimizer steps since the
previous validation) improved over the last ``alarm.window`` validations while the held-out score
``val/<alarm.scorer>`` fell more than ``alarm.threshold`` below its best, a WARNING is logged, an
``{"alarm": ...}`` record goes to metrics.jsonl, and with ``alarm.stop`` the run stops there (checkpoint and
export, as at the end). The history the alarm reads lives in the checkpoint (``TrainerState.validation``).

Under DDP every process samples its share of the images (``sample(shard=...)``: the same images a single process
would) and scores them; the rows are gathered so every process takes the same alarm decision.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

VALIDATION_DIR = "validation"


def step_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / VALIDATION_DIR / f"step-{step:08d}"


@contextlib.contextmanager
def isolated(*modules):
    """No gradients, modules in eval mode; afterwards every RNG state and every module's train flag as before."""
    from t2ialign.training.checkpoint import rng_state, set_rng_state

    rng = rng_state()
    modes = [(m, m.training) for module in modules if module is not None for m in module.modules()]
    try:
        with torch.no_grad():
            for module in modules:
                if module is not None:
                    module.eval()
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        set_rng_state(rng)


# ---------------------------------------------------------------- the alarm

def check_alarm(history: list, alarm, scorer_key: str) -> Optional[dict]:
    """The alarm record when the rule fires at the last entry of ``history``, else None.

    ``history``: ``[{"step", "scores": {"val/...": x}, "train": {metric: mean since the previous validation}}]``.
    """
    metric = alarm.train_metric
    falls = metric == "loss"
    trained = [h for h in history if metric in h.get("train", {}) and math.isfinite(h["train"][metric])]
    scored = [h for h in history if scorer_key in h.get("scores", {}) and math.isfinite(h["scores"][scorer_key])]
    if len(trained) <= alarm.window or not scored or history[-1] is not trained[-1] or history[-1] is not scored[-1]:
        return None
    then, now = trained[-1 - alarm.window], trained[-1]
    a, b = then["train"][metric], now["train"][metric]
    improvement = (a - b) if falls else (b - a)
    if improvement <= alarm.min_improvement:
        return None
    best = max(scored, key=lambda h: h["scores"][scorer_key])  # the earliest of equal bests
    c, d = best["scores"][scorer_key], now["scores"][scorer_key]
    if c - d <= alarm.threshold:
        return None
    verb = "fell" if falls else "rose"
    message = (f"over-optimisation: {metric} {verb} from {a:.4g} to {b:.4g} (steps {then['step']}-{now['step']}) "
               f"while {scorer_key} fell from {c:.4g} to {d:.4g} since step {best['step']}")
    return {"step": now["step"], "train_metric": metric, "train_from": a, "train_to": b, "train_since_step": then["step"],
            "scorer": scorer_key, "best": c, "now": d, "best_step": best["step"], "message": message}


# ---------------------------------------------------------------- validation

class Validator:
    """Runs validation at the steps it is due, keeps the alarm's history in ``state.validation``."""

    def __init__(self, config, accelerator, models, spec, state):
        self.config, self.val = config, config.validation
        self.accelerator, self.models, self.spec, self.state = accelerator, models, spec, state
        self.output_dir = Path(config.output_dir)
        self.pipe = None
        self.scorers = None
        self.records = None
        self.pair_batches = None
        self.alarm: Optional[dict] = state.validation.get("alarm")  # fired once per run (a resume does not re-fire it)
        self.stop_now = False
        self.started, self.seconds, self.warned_cost = time.perf_counter(), 0.0, False  # this process's wall clock
        state.validation.setdefault("history", [])
        state.validation.setdefault("train_sums", {})
        state.validation.setdefault("train_count", 0)

    # -------------------------------------------------------- bookkeeping

    @property
    def history(self) -> list:
        return self.state.validation["history"]

    def due(self, step: int) -> bool:
        return bool(self.val.every) and step % self.val.every == 0 and not any(h["step"] == step for h in self.history)

    def observe(self, step_metrics: Optional[dict]) -> None:
        """An accepted optimizer step's metrics (None: a skipped step), averaged until the next validation."""
        if not step_metrics:
            return
        sums = self.state.validation["train_sums"]
        for name, value in step_metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        self.state.validation["train_count"] += 1

    def _pop_train(self) -> dict:
        count = self.state.validation["train_count"]
        sums = self.state.validation["train_sums"]
        out = {k: v / count for k, v in sorted(sums.items())} if count else {}
        self.state.validation["train_sums"], self.state.validation["train_count"] = {}, 0
        return out

    @property
    def should_stop(self) -> bool:
        """The alarm fired at this validation and ``alarm.stop`` is set (a resumed run after an alarm goes on)."""
        return self.stop_now

    # -------------------------------------------------------- one validation

    def run(self, step: int) -> Optional[dict]:
        """Validate at ``step`` (every process); returns the alarm record if the alarm fired now."""
        started = time.perf_counter()
        models = self.models
        frozen = [models.components.vae, *models.components.text_encoders]
        with isolated(models.policy_unwrapped, models.reference, *frozen), self.accelerator.autocast():
            scores, rows = self._sample_and_score(step) if self.val.prompts is not None else ({}, [])
            if self.val.preference_split:
                accuracy = self._implicit_accuracy()
                if accuracy is not None:
                    scores["val/implicit_acc"] = accuracy
        seconds = time.perf_counter() - started
        self._check_cost(step, seconds)
        entry = {"step": step, "scores": scores, "train": self._pop_train() if step else {}}
        self.history.append(entry)
        record = {"step": step, "validation": True, **scores, "val/seconds": seconds}
        if self.accelerator.is_main_process:
            self._write(record)
            self.accelerator.log({k: v for k, v in record.items() if k.startswith("val/")}, step=step)
            self._log_images(step, rows)
            logger.info("validation at step %d: %s (%.1f s)", step,
                        ", ".join(f"{k}={v:.4g}" for k, v in scores.items()) or "no scores", seconds)
        return self._maybe_alarm(step)

    def _check_cost(self, step: int, seconds: float) -> None:
        """Warn once when validation takes more than ``max_time_share`` of this run's wall time (it never skips a
        validation for it: the records stay a function of the config, not of the machine's speed)."""
        self.seconds += seconds
        share = self.seconds / max(time.perf_counter() - self.started, 1e-9)
        if step and not self.warned_cost and share > self.val.max_time_share and self.accelerator.is_main_process:
            self.warned_cost = True
            logger.warning("validation took %.0f%% of this run's time so far (%.1f s, above validation.max_time_share="
                           "%.2f): raise validation.every, or use fewer prompts / sampler steps", 100 * share, self.seconds,
                           self.val.max_time_share)

    def _maybe_alarm(self, step: int) -> Optional[dict]:
        if self.alarm is not None or not self.val.alarm.enabled:
            return None
        key = self.val.alarm.scorer or (self.val.scorers[0] if self.val.scorers else "implicit_acc")
        key = key if key.startswith("val/") else f"val/{key}"
        alarm = check_alarm(self.history, self.val.alarm, key)
        if alarm is None:
            return None
        alarm["stop"] = bool(self.val.alarm.stop)
        self.alarm = self.state.validation["alarm"] = alarm
        self.stop_now = alarm["stop"]
        if self.accelerator.is_main_process:
            logger.warning("step %d: %s%s", step, alarm["message"],
                           "; stopping (validation.alarm.stop)" if alarm["stop"] else "")
            self._write({"step": step, "alarm": alarm})
        return alarm

    def _write(self, record: dict) -> None:
        with open(self.output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # -------------------------------------------------------- images and scores

    def _prompt_records(self):
        if self.records is None:
            from t2ialign.evaluation.prompts import PromptRecord, load_prompt_set

            prompts = self.val.prompts
            if isinstance(prompts, str):
                self.records = load_prompt_set(prompts, limit=self.val.limit)
            else:
                self.records = [PromptRecord(prompt=p, index=i, source="validation") for i, p in enumerate(prompts)]
                self.records = self.records[: self.val.limit] if self.val.limit else self.records
        return self.records

    def _pipeline(self):
        """The family's diffusers pipeline (SD / SDXL / StableDiffusion3Pipeline / FluxPipeline) around the training
        components and the live (unwrapped) policy UNet or transformer; its scheduler is the pipeline's own, a fresh
        object, so sampling never touches the training noise scheduler."""
        if self.pipe is not None:
            return self.pipe
        from diffusers import DiffusionPipeline

        from t2ialign.training.setup import DTYPES

        c, model = self.models.components, self.config.model
        given = {"transformer" if c.is_flow else "unet": self.models.policy_unwrapped}
        if c.vae is not None:
            given["vae"] = c.vae
        if c.is_flow:  # by pipeline slot (SD3: three encoders; FLUX: CLIP-L and T5); a cache run loaded none
            given.update({slot: module for slot, module in c.text_slots.items() if module is not None})
        elif c.text_encoders:
            given.update(zip(("text_encoder", "text_encoder_2"), c.text_encoders))
            given.update(zip(("tokenizer", "tokenizer_2"), c.tokenizers))
        pipe = DiffusionPipeline.from_pretrained(model.pretrained, revision=model.revision, variant=model.variant,
                                                 local_files_only=model.local_files_only, **given)
        # a cached-latent run trains without VAE and text encoders: the pipeline loaded them, put them on the device
        dtype = DTYPES[self.config.mixed_precision]
        for name, module in pipe.components.items():
            if name not in given and isinstance(module, torch.nn.Module):
                module.requires_grad_(False).to(self.accelerator.device, dtype=torch.float32 if name == "vae" else dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        return pipe

    def _call_kwargs(self) -> dict:
        """Flow pipelines encode prompts with the T5 length the run trains with."""
        components = self.models.components
        if not components.is_flow:
            return {}
        from t2ialign.models.flow_text import max_sequence_length

        return {"max_sequence_length": max_sequence_length(components, self.config.flow.max_sequence_length)}

    def _scorer_list(self):
        if self.scorers is None:
            from t2ialign.scoring import get_scorer

            self.scorers = [(name, get_scorer(name, device=self.accelerator.device)) for name in self.val.scorers]
        return self.scorers

    def _sample_and_score(self, step: int) -> tuple[dict, list]:
        from PIL import Image

        from t2ialign.config import SampleConfig
        from t2ialign.evaluation.sampling import sample

        acc = self.accelerator
        out = step_dir(self.output_dir, step)
        if acc.is_main_process and out.exists():  # left by a crashed run (after its last checkpoint): sample again
            import shutil

            shutil.rmtree(out)
        acc.wait_for_everyone()
        world = acc.num_processes
        shard = (acc.process_index, world) if world > 1 else None
        dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[self.config.mixed_precision]
        config = SampleConfig(
            pretrained=self.config.model.pretrained, aligned=f"{self.config.output_dir} (step {step}, live policy)",
            prompts=self.val.prompts if isinstance(self.val.prompts, str) else "validation.prompts",
            limit=self.val.limit, output_dir=str(out), num_images_per_prompt=self.val.num_images, seed=self.val.seed,
            num_inference_steps=self.val.num_inference_steps, guidance_scale=self.val.guidance_scale,
            resolution=self.val.resolution, batch_size=self.val.batch_size, dtype=dtype, device=str(acc.device),
            progress_bar=False,
        )
        sample(config, self._prompt_records(), shard=shard, pipe=self._pipeline(), call_kwargs=self._call_kwargs())
        meta = out / ("metadata.jsonl" if shard is None else f"metadata.rank{acc.process_index}.jsonl")
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()] if meta.is_file() else []
        if rows and self.val.scorers:
            images = [Image.open(out / r["file"]).convert("RGB") for r in rows]
            prompts = [r["prompt"] for r in rows]
            for name, scorer in self._scorer_list():
                for row, value in zip(rows, scorer.score(images, prompts).tolist()):
                    row[name] = float(value)
        if world > 1:
            from accelerate.utils import gather_object

            rows = gather_object([rows])
            rows = [r for part in rows for r in part]
        rows.sort(key=lambda r: (r["prompt_index"], r["image_index"]))
        if acc.is_main_process:
            if shard is not None:
                (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        scores = {f"val/{name}": sum(r[name] for r in rows) / len(rows) for name in self.val.scorers} if rows else {}
        return scores, rows

    def _log_images(self, step: int, rows: list) -> None:
        if not rows or not self.val.log_images or self.config.report_to == "none":
            return
        import numpy as np
        from PIL import Image

        out = step_dir(self.output_dir, step)
        shown = [r for r in rows if (out / r["file"]).is_file()][: self.val.log_images]
        if not shown:
            return
        images = [Image.open(out / r["file"]).convert("RGB") for r in shown]
        if self.config.report_to == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("val/images", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
            writer.flush()
        elif self.config.report_to == "wandb":
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.log({"val/images": [wandb.Image(im, caption=r["prompt"]) for im, r in zip(images, shown)]}, step=step)

    # -------------------------------------------------------- implicit-reward accuracy on held-out pairs

    def _implicit_accuracy(self) -> Optional[float]:
        """Share of held-out pairs whose winner the policy's error lowered more than the loser's (vs the reference)."""
        from t2ialign.evaluation.implicit_reward import implicit_reward_margin
        from t2ialign.evaluation.preference_accuracy import _pair_batches, _winners_losers

        models, acc = self.models, self.accelerator
        if not self.spec.needs_reference or models.components.vae is None:
            if self.pair_batches is None:
                logger.warning("validation.preference_split: skipped (%s)", "objective '%s' has no reference model"
                               % self.spec.name if not self.spec.needs_reference else "a cached-latent run has no VAE")
                self.pair_batches = []
            return None
        if self.pair_batches is None:
            batches = list(_pair_batches(self.config.data.dataset, self.val.preference_split, self.config.data.resolution,
                                         self.val.max_pairs, self.val.batch_size))
            self.pair_batches = [b for i, b in enumerate(batches) if i % acc.num_processes == acc.process_index]
        generator = torch.Generator(acc.device).manual_seed(self.val.seed)  # the same draws at every validation
        if models.components.is_flow:
            from t2ialign.training.flow_step import FlowSettings

            pair_errors = partial(flow_pair_errors, models, FlowSettings.from_config(self.config.flow))
        else:
            pair_errors = partial(unet_pair_errors, models, resolution=self.config.data.resolution,
                                  time_ids=self.config.data.time_ids, device=acc.device)
        errors = {"policy": [], "reference": []}
        for batch in self.pair_batches:
            policy, reference = pair_errors(batch, generator)
            errors["policy"].append(policy.float().cpu())
            errors["reference"].append(reference.float().cpu())
        margins = []
        if errors["policy"]:
            policy_w, policy_l = _winners_losers(errors["policy"])
            reference_w, reference_l = _winners_losers(errors["reference"])
            margins = implicit_reward_margin(policy_w, policy_l, reference_w, reference_l).tolist()
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            margins = [m for part in gather_object([margins]) for m in part]
        if not margins:
            return None
        return float(sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins))


# ---------------------------------------------------------------- per-sample errors of held-out pairs

def unet_pair_errors(models, batch: dict, generator, *, resolution: int, time_ids: str, device) -> tuple:
    """(policy, reference) per-sample errors of one batch of pairs (2B, winners first): SD / SDXL UNets, from the
    VAE posterior means."""
    from t2ialign.evaluation.preference_accuracy import _conditioning
    from t2ialign.noising import noisy_latents_and_target, per_sample_error
    from t2ialign.training.step import reference_errors

    dtype, vae = models.policy_unwrapped.dtype, models.components.vae
    cond = _conditioning(models.components, batch, resolution, time_ids, device, dtype)
    latents = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    zt, timesteps, target = noisy_latents_and_target(models.components.noise_scheduler, latents.float(), generator)
    policy = per_sample_error(models.policy_unwrapped(zt.to(dtype), timesteps, **cond).sample, target)
    return policy, reference_errors(models, zt.to(dtype), timesteps, cond, target)


def flow_pair_errors(models, settings, batch: dict, generator) -> tuple:
    """(policy, reference) per-sample velocity errors of one batch of pairs (2B, winners first): SD3 / FLUX, as
    ``flow_preference_step`` computes them (``settings``: the run's ``flow:`` timestep density, loss weighting,
    guidance value and T5 length), from the VAE posterior means with the VAE's shift and scale."""
    from t2ialign.flow_noising import flow_noisy_latents_and_target, training_table, weighted_per_sample_error
    from t2ialign.models.flow_text import encode_flow_prompts
    from t2ialign.training.flow_step import flow_reference_errors, flow_velocity
    from t2ialign.training.step import _shift_and_scale

    components, vae = models.components, models.components.vae
    mean = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist.mean
    latents = _shift_and_scale(mean, vae.config.get("shift_factor"), vae.config.scaling_factor).float().contiguous()
    dtype = next(models.policy_unwrapped.parameters()).dtype
    embeds = encode_flow_prompts(components, list(batch["captions"]) * 2, settings.max_sequence_length)
    embeds = embeds.to(latents.device, torch.float32 if dtype == torch.float32 else dtype)
    table = training_table(components.noise_scheduler)
    noised = flow_noisy_latents_and_target(components.noise_scheduler, latents, settings.sampling, generator, table)
    pred = flow_velocity(components.family, models.policy_unwrapped, noised.noisy, noised.timesteps, embeds,
                         settings.guidance_scale)
    policy = weighted_per_sample_error(pred, noised.target, noised.weights)
    return policy, flow_reference_errors(models, noised, embeds, settings)
