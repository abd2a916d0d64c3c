"""The training recipe: ``train(config)`` runs preference optimisation with accelerate.

Micro-step ``m`` reads a batch and draws its noise from a generator seeded by (seed, m, rank), so
the run is a pure function of the config and the step counter: resuming from a checkpoint replays
exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from t2ialign.config import TrainConfig, to_dict
from t2ialign.errors import UserFacingError
from t2ialign.objectives import get_objective, objective_params
from t2ialign.training.batches import ResumableBatchSampler, make_loader
from t2ialign.training.checkpoint import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
from t2ialign.training.export import export_model
from t2ialign.training.optim import build_lr_scheduler, build_optimizer, effective_learning_rate
from t2ialign.training.setup import build_dataset, build_policy_and_reference, load_training_components, make_accelerator
from t2ialign.training.step import StepModels, preference_step

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    export_dir: Path
    final_step: int
    bad_steps: int
    model: object = None  # the trained (unwrapped) UNet on this process


class MetricAverager:
    """Sums metrics on device over an optimizer step's micro-batches; averages across processes at log time."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, loss, metrics: dict):
        for name, value in {"loss": loss.detach(), **metrics}.items():
            value = value.detach().float()
            self.sums[name] = self.sums.get(name, 0) + value
        self.count += 1

    def pop(self, accelerator) -> dict:
        if not self.count:
            return {}
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names]) / self.count
        stacked = accelerator.reduce(stacked, reduction="mean")
        self.sums, self.count = {}, 0
        return {n: float(v) for n, v in zip(names, stacked.tolist())}


def micro_step_generator(seed: int, micro_step: int, rank: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + micro_step) * 1_009 + rank)
    return generator


def train(config: TrainConfig) -> TrainResult:
    accelerator = make_accelerator(config)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    spec = get_objective(config.objective.name)
    params = objective_params(spec, config.objective.beta, config.objective.params)

    dataset, collate = build_dataset(config)
    components = load_training_components(config, accelerator.device)
    policy, reference, trainable = build_policy_and_reference(config, spec, components)
    pairs_per_step = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(trainable, config.optim, effective_learning_rate(config.optim, pairs_per_step))
    lr_scheduler = build_lr_scheduler(optimizer, config.optim, config.max_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)  # not prepared: it steps once per optimizer step
    if reference is not None:
        reference.to(accelerator.device)
    models = StepModels(policy, accelerator.unwrap_model(policy), reference, components, lora=config.lora.enabled)

    state = TrainerState()
    resume_from = resolve_resume(output_dir, config.resume)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        logger.info("resumed from %s at step %d", resume_from, state.global_step)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("t2ialign", config=_flat_hparams(config))

    sampler = ResumableBatchSampler(
        len(dataset), config.train_batch_size, config.seed, accelerator.process_index, accelerator.num_processes, state.micro_step
    )
    batches = iter(make_loader(dataset, collate, sampler, config.data.num_workers))
    _run_steps(config, accelerator, models, spec, params, optimizer, lr_scheduler, batches, state, trainable,
               getattr(dataset, "report", None))

    export_dir = output_dir / "final"
    if accelerator.is_main_process:
        export_model(models.policy_unwrapped, components, config, export_dir)
    accelerator.wait_for_everyone()
    summary = getattr(dataset, "bad_row_summary", None)
    if accelerator.is_main_process and callable(summary):
        logger.info("data: %s", summary())
    accelerator.end_training()
    return TrainResult(output_dir, export_dir, state.global_step, state.bad_steps_total, models.policy_unwrapped)


def _run_steps(config, accelerator, models, spec, params, optimizer, lr_scheduler, batches, state, trainable, bad_row_report=None):
    log_path = Path(config.output_dir) / "metrics.jsonl"
    averager = MetricAverager()
    progress = tqdm(
        total=config.max_steps, initial=state.global_step, desc=f"{spec.name} training", unit="step",
        disable=not (config.progress_bar and accelerator.is_main_process),
    )
    while state.global_step < config.max_steps:
        batch = next(batches)
        if bad_row_report is not None and batch.get("bad_rows"):  # rows skipped inside data-loader workers
            bad_row_report.record_events(batch["bad_rows"])
        generator = micro_step_generator(config.seed, state.micro_step, accelerator.process_index, accelerator.device)
        with accelerator.accumulate(models.policy), accelerator.autocast():
            output = preference_step(
                models, spec, params, batch, resolution=config.data.resolution,
                prompt_dropout=config.data.prompt_dropout, generator=generator,
            )
            accelerator.backward(output.loss)
            averager.add(output.loss, output.metrics)
            if accelerator.sync_gradients:
                _optimizer_step(config, accelerator, optimizer, lr_scheduler, trainable, state)
        state.micro_step += 1
        if not accelerator.sync_gradients:
            continue
        state.global_step += 1
        progress.update(1)
        if state.global_step % config.log_every == 0 or state.global_step == config.max_steps:
            record = {"step": state.global_step, "lr": lr_scheduler.get_last_lr()[0], **averager.pop(accelerator)}
            record["bad_steps"] = state.bad_steps_total
            _log(accelerator, log_path, record, progress)
        if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
            save_checkpoint(accelerator, Path(config.output_dir), state, config.keep_last_checkpoints)
    progress.close()


def _optimizer_step(config, accelerator, optimizer, lr_scheduler, trainable, state):
    """Clip, then step unless the gradients are not finite (skipped and counted; fp16 leaves it to the scaler)."""
    grad_norm = accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
    finite = grad_norm is None or math.isfinite(float(grad_norm))
    if finite or config.mixed_precision == "fp16":
        optimizer.step()
        lr_scheduler.step()
        state.bad_steps_consecutive = 0
    else:
        state.bad_steps_total += 1
        state.bad_steps_consecutive += 1
        logger.warning("step %d: non-finite gradient norm (%s); update skipped", state.global_step + 1, grad_norm)
        if state.bad_steps_consecutive >= config.max_bad_steps:
            raise UserFacingError(
                f"{state.bad_steps_consecutive} consecutive steps had non-finite loss or gradients; stopping. "
                "Lower optim.learning_rate or objective.beta, or use mixed_precision=bf16 instead of fp16."
            )
    optimizer.zero_grad(set_to_none=True)


def _log(accelerator, log_path: Path, record: dict, progress):
    if not accelerator.is_main_process:
        return
    with open(log_path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "implicit_acc") if k in record})


def _flat_hparams(config: TrainConfig) -> dict:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}/", inner)
        else:
            flat[prefix.rstrip("/")] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", to_dict(config))
    return flat
