"""The training recipe: ``train(config)`` runs preference optimisation with accelerate.

Micro-step ``m`` reads a batch and draws its noise from a generator seeded by (seed, m, rank), so
the run is a pure function of the config and the step counter: resuming from a checkpoint replays
exactly what an uninterrupted run would have done.

The output directory is the run's own (training/run_dir.py: lock, no run overwritten, config checked on
resume), and SIGTERM / SIGINT stop it at an optimizer-step boundary with a checkpoint (training/signals.py).
"""
from __future__ import annotations

import json
import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from t2ialign.config import TrainConfig, to_dict
from t2ialign.preflight import check_model_source
from t2ialign.errors import UserFacingError
from t2ialign.objectives import get_objective, objective_params
from t2ialign.training.batches import ResumableBatchSampler, make_loader
from t2ialign.training.checkpoint import (
    TrainerState,
    load_checkpoint,
    maybe_kill,
    save_checkpoint,
    truncate_metrics,
)
from t2ialign.training.export import export_model
from t2ialign.training.optim import build_lr_scheduler, build_optimizer, effective_learning_rate
from t2ialign.training.run_dir import RunStart, open_run_dir, record_start
from t2ialign.training.setup import (
    build_dataset,
    build_policy_and_reference,
    check_loaded_scheduler,
    load_training_components,
    make_accelerator,
)
from t2ialign.training.signals import StopRequest, TrainingInterrupted, agreed_signal
from t2ialign.training.step import StepModels, preference_step

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    export_dir: Path
    final_step: int
    bad_steps: int
    model: object = None  # the trained (unwrapped) UNet on this process
    alarm: Optional[dict] = None  # the over-optimisation alarm, if it fired (validation.alarm; see training/validation.py)


class MetricAverager:
    """Metrics of the current optimizer step (summed on device over its micro-batches), then a window of
    optimizer-step means (plain floats, identical on every process) averaged at log time.

    The window is part of the checkpoint (``TrainerState.metric_sums``), so a resumed run logs exactly
    the averages an uninterrupted one would, whatever ``log_every`` and ``checkpoint_every`` are.
    Skipped (non-finite) steps are left out of the averages and counted in ``skipped_steps``.
    """

    def __init__(self, state: TrainerState):
        self.state = state
        self.sums, self.count = {}, 0

    def add(self, loss, metrics: dict):
        for name, value in {"loss": loss.detach(), **metrics}.items():
            value = value.detach().float()
            self.sums[name] = self.sums.get(name, 0) + value
        self.count += 1

    def close_step(self, accelerator) -> dict:
        """This optimizer step's metrics, averaged over micro-batches and processes (a collective)."""
        if not self.count:
            return {}
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names]) / self.count
        stacked = accelerator.reduce(stacked, reduction="mean")
        self.sums, self.count = {}, 0
        return {n: float(v) for n, v in zip(names, stacked.tolist())}

    def accept(self, step_metrics: dict):
        for name, value in step_metrics.items():
            self.state.metric_sums[name] = self.state.metric_sums.get(name, 0.0) + value
        self.state.metric_count += 1

    def skip(self):
        self.state.skipped_in_window += 1

    def pop(self) -> dict:
        count = self.state.metric_count
        out = {n: v / count for n, v in sorted(self.state.metric_sums.items())} if count else {}
        out["skipped_steps"] = self.state.skipped_in_window
        self.state.metric_sums, self.state.metric_count, self.state.skipped_in_window = {}, 0, 0
        return out


def micro_step_generator(seed: int, micro_step: int, rank: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + micro_step) * 1_009 + rank)
    return generator


def train(config: TrainConfig) -> TrainResult:
    # cheap checks first: a missing model or an incompatible scheduler fails before anything heavy loads
    check_model_source(config)
    accelerator = make_accelerator(config)
    _check_engine_compat(config, accelerator)
    # the directory is this run's from here on (lock, no other run overwritten, config safe to resume with);
    # a refusal is raised on every rank in seconds, before any model loads
    start, lock = open_run_dir(config, accelerator)
    try:
        with StopRequest() as stop:
            return _train(config, accelerator, start, stop)
    finally:
        if lock is not None:
            lock.release()


def _train(config: TrainConfig, accelerator, start: RunStart, stop: StopRequest) -> TrainResult:
    output_dir = Path(config.output_dir)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    spec = get_objective(config.objective.name)

    dataset, collate = build_dataset(config)
    components = load_training_components(config, accelerator.device)
    check_loaded_scheduler(config, spec, components)
    params = objective_params(spec, config.objective.beta, config.objective.params, flow=components.is_flow)
    if components.is_flow and config.objective.beta is None and "beta" in spec.flow_defaults:
        logger.info("objective.beta: %s for a flow model (%s's flow default; docs/FLOW.md)", params["beta"], spec.name)
    policy, reference, trainable = build_policy_and_reference(config, spec, components)
    pairs_per_step = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(trainable, config.optim, effective_learning_rate(config.optim, pairs_per_step))
    lr_scheduler = build_lr_scheduler(optimizer, config.optim, config.max_steps)
    # the LR schedule is ours: one step per optimizer step. An offloaded optimizer keeps its state in host RAM:
    # accelerate's device placement would send it (with bf16 weights: the fp32 masters) to the GPU and back
    policy, optimizer = accelerator.prepare(policy, optimizer, device_placement=[True, not config.optim.offload])
    if reference is not None:
        reference.to(accelerator.device)
    models = StepModels(policy, accelerator.unwrap_model(policy), reference, components, lora=config.lora.enabled)
    step_fn = _step_function(config, components)

    state = TrainerState()
    resume_from = Path(start.resume_from) if start.resume_from else None
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, model=policy, optimizer=optimizer, lr_scheduler=lr_scheduler)
        _warn_on_changed_layout(config, accelerator, state, resume_from)
        logger.info("resumed from %s at step %d (micro-step %d)", resume_from, state.global_step, state.micro_step)
    state.num_processes = accelerator.num_processes
    state.train_batch_size = config.train_batch_size
    state.gradient_accumulation_steps = config.gradient_accumulation_steps
    if accelerator.is_main_process:
        # written once the run is set up: a run that fails to load its model or data leaves no run behind
        record_start(config, start, state.global_step)
        # lines a crashed run wrote after its last checkpoint are written again below
        truncate_metrics(output_dir / "metrics.jsonl", state.global_step)
    if accelerator.is_main_process and config.report_to != "none":
        init_kwargs = {"tensorboard": {"purge_step": state.global_step + 1}} if resume_from and config.report_to == "tensorboard" else {}
        accelerator.init_trackers("t2ialign", config=_flat_hparams(config), init_kwargs=init_kwargs)

    sampler = ResumableBatchSampler(
        len(dataset), config.train_batch_size, config.seed, accelerator.process_index, accelerator.num_processes, state.micro_step
    )
    batches = _merging_bad_rows(iter(make_loader(dataset, collate, sampler, config.data.num_workers)),
                                getattr(dataset, "report", None))
    saver = CheckpointSaver(config, accelerator, models.policy, optimizer, lr_scheduler, resume_from, state.global_step)
    alarm = _run_steps(config, accelerator, models, spec, params, optimizer, lr_scheduler, batches, state, trainable, saver,
                       stop, step_fn)

    export_dir = output_dir / "final"
    if config.model.policy_dtype != "fp32":  # export the fp32 masters, not their bf16 rounding
        getattr(optimizer, "optimizer", optimizer).load_masters_into_params()  # under accelerate's wrapper
    if accelerator.is_main_process:
        export_model(models.policy_unwrapped, components, config, export_dir)
    accelerator.wait_for_everyone()
    summary = getattr(dataset, "bad_row_summary", None)
    if accelerator.is_main_process and callable(summary):
        logger.info("data: %s", summary())
    if stop.signum and accelerator.is_main_process:
        logger.warning("received %s after the last step: the run is complete", signal.Signals(stop.signum).name)
    accelerator.end_training()
    if config.push_to_hub and accelerator.is_main_process:
        _push(config, output_dir)
    return TrainResult(output_dir, export_dir, state.global_step, state.bad_steps_total, models.policy_unwrapped, alarm)


def _step_function(config: TrainConfig, components):
    """``preference_step`` (UNet families) or ``flow_preference_step`` (SD3 / FLUX) with the run's settings bound."""
    from functools import partial

    if not components.is_flow:
        return partial(preference_step, resolution=config.data.resolution, prompt_dropout=config.data.prompt_dropout,
                       time_ids_mode=config.data.time_ids)
    from t2ialign.training.flow_step import FlowSettings, flow_preference_step

    return partial(flow_preference_step, prompt_dropout=config.data.prompt_dropout, settings=FlowSettings.from_config(config.flow))


def _push(config: TrainConfig, output_dir: Path) -> None:
    """``push_to_hub``: the run is complete either way, so a failed upload is a warning naming the retry command."""
    from t2ialign.sharing import ShareError, push_to_hub

    try:
        url = push_to_hub(output_dir, config.push_to_hub, private=config.hub_private)
        logger.info("pushed to %s", url)
    except ShareError as exc:
        logger.warning("%s", exc)


class CheckpointSaver:
    """Writes checkpoints (with the run's config) and remembers the last one: a stop right after a periodic
    save, or before the first step of a resumed run, does not write the same state twice."""

    def __init__(self, config, accelerator, model, optimizer, lr_scheduler, resumed_from, step: int):
        self.config, self.accelerator = config, accelerator
        self.objects = dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.step, self.path = (step, resumed_from) if resumed_from else (0, None)

    def save(self, state: TrainerState) -> Path:
        self.path = save_checkpoint(self.accelerator, Path(self.config.output_dir), state, self.config.keep_last_checkpoints,
                                    config=to_dict(self.config), **self.objects)
        self.step = state.global_step
        return self.path

    def latest(self, state: TrainerState):
        """A checkpoint of the current state: the last one if nothing was trained since, else a new one."""
        if state.global_step == self.step:
            return self.path
        return self.save(state)


def _merging_bad_rows(batches, report):
    """DataLoader workers count bad rows in their own copy of the dataset's report: merge what each batch met
    into this process's, so the end-of-training summary covers every row read (counting is idempotent)."""
    for batch in batches:
        if report is not None and isinstance(batch, dict):
            report.record_events(batch.get("bad_rows", ()))
            report.record_read(batch.get("rows_read", ()))
        yield batch


def _check_engine_compat(config: TrainConfig, accelerator) -> None:
    from t2ialign.config import ConfigError
    from t2ialign.training.checkpoint import uses_accelerate_format

    if config.optim.offload and uses_accelerate_format(accelerator):
        raise ConfigError(
            f"optim.offload: not with {accelerator.distributed_type.value}, which shards the optimizer itself; set "
            "optim.offload=false and use its own offload in the accelerate config (DeepSpeed: offload_optimizer_device: cpu; "
            "FSDP: fsdp_offload_params: true)"
        )


def _warn_on_changed_layout(config, accelerator, state: TrainerState, path):
    saved = (state.num_processes, state.train_batch_size, state.gradient_accumulation_steps)
    now = (accelerator.num_processes, config.train_batch_size, config.gradient_accumulation_steps)
    if state.train_batch_size and saved != now and accelerator.is_main_process:
        logger.warning(
            "resuming %s with (processes, train_batch_size, gradient_accumulation_steps) = %s instead of %s: "
            "training continues, but not on the data order an uninterrupted run would have seen", path, now, saved
        )


def _run_steps(config, accelerator, models, spec, params, optimizer, lr_scheduler, batches, state, trainable,
               saver: CheckpointSaver, stop: StopRequest | None = None, step_fn=None) -> Optional[dict]:
    """The optimizer steps up to ``max_steps``; returns the over-optimisation alarm when it stopped the run early."""
    log_path = Path(config.output_dir) / "metrics.jsonl"
    step_fn = step_fn or _step_function(config, models.components)
    averager = MetricAverager(state)
    progress = tqdm(
        total=config.max_steps, initial=state.global_step, desc=f"{spec.name} training", unit="step",
        disable=not (config.progress_bar and accelerator.is_main_process),
    )
    _stop_if_signalled(accelerator, stop, saver, state, progress)  # a signal during the set-up
    validator = None
    if config.validation.every:  # training/validation.py: own generators, RNG states and train/eval flags restored
        from t2ialign.training.validation import Validator

        validator = Validator(config, accelerator, models, spec, state)
        if validator.due(state.global_step):  # the base model, once, before the first step
            validator.run(state.global_step)
    while state.global_step < config.max_steps:
        maybe_kill("micro_step", state.micro_step)  # test hook (T2IALIGN_TEST_KILL), see training/checkpoint.py
        batch = next(batches)
        generator = micro_step_generator(config.seed, state.micro_step, accelerator.process_index, accelerator.device)
        with accelerator.accumulate(models.policy), accelerator.autocast():
            output = step_fn(models, spec, params, batch, generator=generator)
            accelerator.backward(output.loss)
            averager.add(output.loss, output.metrics)
            if accelerator.sync_gradients:
                accepted = _optimizer_step(config, accelerator, optimizer, lr_scheduler, trainable, state, averager)
                if validator is not None:
                    validator.observe(accepted)
        state.micro_step += 1
        if not accelerator.sync_gradients:
            continue
        state.global_step += 1
        progress.update(1)
        if state.global_step % config.log_every == 0 or state.global_step == config.max_steps:
            record = {"step": state.global_step, "lr": lr_scheduler.get_last_lr()[0], **averager.pop()}
            record["bad_steps"] = state.bad_steps_total
            _log(accelerator, log_path, record, progress)
        if state.bad_steps_consecutive >= config.max_bad_steps:
            progress.close()
            raise UserFacingError(
                f"stopping at step {state.global_step}: {state.bad_steps_consecutive} consecutive optimizer steps had "
                f"non-finite loss or gradients (max_bad_steps={config.max_bad_steps}; last cause: {state.last_bad_cause}). "
                "Lower optim.learning_rate or objective.beta, use mixed_precision=bf16 instead of fp16, "
                "or resume from the last checkpoint with resume=latest"
            )
        if validator is not None and validator.due(state.global_step):
            validator.run(state.global_step)
        if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
            saver.save(state)
        if validator is not None and validator.should_stop and state.global_step < config.max_steps:
            saver.latest(state)  # then export, as at the end of the run
            progress.close()
            return validator.alarm
        _stop_if_signalled(accelerator, stop, saver, state, progress)
    progress.close()
    return None


def _stop_if_signalled(accelerator, stop, saver: CheckpointSaver, state: TrainerState, progress) -> None:
    """At an optimizer-step boundary: if any rank got SIGTERM/SIGINT, every rank checkpoints here and stops."""
    signum = agreed_signal(accelerator, stop)
    if not signum:
        return
    progress.close()
    interrupted = TrainingInterrupted(signum, state.global_step, saver.latest(state) if state.global_step else None)
    if accelerator.is_main_process:
        logger.warning("%s", interrupted)
    accelerator.end_training()  # flush the trackers (tensorboard events) as a finished run does
    raise interrupted


def _optimizer_step(config, accelerator, optimizer, lr_scheduler, trainable, state, averager) -> Optional[dict]:
    """Clip, then step unless the loss or the gradients are not finite: then the update is skipped and counted.

    Returns the step's metrics when the update was taken, None when it was skipped.
    Loss and gradient norm are the same on every process (the loss is averaged across processes, the
    gradients are all-reduced), so every replica takes the same decision. fp16: inf/nan gradients are
    the loss scaler's business (it skips the update and lowers the scale), so only a non-finite loss counts.
    """
    step_metrics = averager.close_step(accelerator)
    loss = step_metrics.get("loss", 0.0)
    grad_norm = accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
    grad_value = None if grad_norm is None else float(grad_norm)
    fp16 = config.mixed_precision == "fp16"
    cause = None
    if not math.isfinite(loss):
        cause = f"non-finite loss ({loss})"
    elif grad_value is not None and not math.isfinite(grad_value) and not fp16:
        cause = f"non-finite gradient norm ({grad_value})"
    if cause is None:
        optimizer.step()  # fp16: the GradScaler skips inf/nan gradients itself and lowers the scale
        lr_scheduler.step()
        state.bad_steps_consecutive = 0
        averager.accept(step_metrics)
    else:
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:  # clip_grad_norm_ unscaled the gradients: close the scaler's step (lowers the scale on inf)
            scaler.update()
        state.bad_steps_total += 1
        state.bad_steps_consecutive += 1
        averager.skip()
        state.last_bad_cause = f"{cause} at step {state.global_step + 1}"
        if accelerator.is_main_process:
            logger.warning(
                "step %d: %s; update skipped (%d consecutive, %d in total; the run stops at max_bad_steps=%d)",
                state.global_step + 1, cause, state.bad_steps_consecutive, state.bad_steps_total, config.max_bad_steps,
            )
    optimizer.zero_grad(set_to_none=True)
    return step_metrics if cause is None else None


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
