"""Atomic training checkpoints in safetensors + JSON: write to a temporary directory, then rename.

A checkpoint directory ``checkpoint-00000500`` holds the full training state and only gets its final
name once everything is on disk, so a crash (even SIGKILL) during a save leaves the previous one
usable; ``resume: latest`` ignores and removes half-written ``checkpoint-*.tmp`` directories.

Layout (single process and DDP; no pickle anywhere):

* ``model.safetensors``            the trainable UNet's full state dict (LoRA: with the adapters)
* ``optimizer.safetensors`` + ``optimizer.json``        optimizer state: tensors / everything else
* ``lr_scheduler.json``            the LR schedule's state dict
* ``rng_state_<rank>.safetensors`` + ``rng_state_<rank>.json``  torch CPU/CUDA, numpy, python RNGs
* ``grad_scaler.json``             fp16 loss-scaler state (fp16 runs only)
* ``config.yaml``                  the run's config: a resume compares it with its own (training/config_check.py)
* ``trainer_state.json``           step counters (``micro_step``: data position and noise stream),
  bad-step counters, the open metric-averaging window; written last

DeepSpeed / FSDP / XLA shard the model and optimizer in their own formats, so there the model and
optimizer go through ``accelerator.save_state(safe_serialization=True)`` (accelerate pickles the
optimizer and its RNG file, and reads them back with ``torch.load(weights_only=True)``); the LR
schedule, RNG states and trainer state are still written by us as JSON/safetensors.

Test hook: ``T2IALIGN_TEST_KILL=save:<step>`` makes every process SIGKILL itself in the middle of
saving the checkpoint of optimizer step ``<step>`` (after the weights are written, before the
rename); ``T2IALIGN_TEST_KILL=micro_step:<m>`` (used by the loop) kills before micro-step ``m``.
The reliability tests use it to crash a run at a chosen point; nothing else reads it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from t2ialign.errors import UserFacingError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
TRASH_SUFFIX = ".deleting"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
FORMAT_SAFE = "t2ialign-safetensors-v1"
FORMAT_ACCELERATE = "accelerate-sharded-v1"  # DeepSpeed / FSDP / XLA: model + optimizer via accelerate
KILL_ENV = "T2IALIGN_TEST_KILL"


@dataclass
class TrainerState:
    global_step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches consumed (data position and RNG stream derive from it)
    bad_steps_total: int = 0
    bad_steps_consecutive: int = 0
    last_bad_cause: str = ""
    # the metric-averaging window open since the last metrics.jsonl line (so a resumed run logs the same averages)
    metric_sums: dict = field(default_factory=dict)
    metric_count: int = 0
    skipped_in_window: int = 0
    # what the data order depends on besides (seed, micro_step); a resume with other values warns
    num_processes: int = 1
    train_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    format: str = FORMAT_SAFE
    # the validation history the over-optimisation alarm reads (t2ialign.training.validation); older checkpoints
    # lack it (empty), and older versions ignore it
    validation: dict = field(default_factory=dict)


# ---------------------------------------------------------------- test hook

def kill_requested(kind: str, value: int) -> bool:
    """True when ``T2IALIGN_TEST_KILL`` asks to crash at this point (see the module docstring)."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return False
    wanted_kind, _, wanted_value = spec.partition(":")
    return wanted_kind == kind and wanted_value.strip() == str(value)


def maybe_kill(kind: str, value: int) -> None:
    if kill_requested(kind, value):
        logger.warning("%s=%s: killing this process with SIGKILL (test hook)", KILL_ENV, os.environ[KILL_ENV])
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- finding checkpoints

def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    suffix = path.name[len(PREFIX):]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` / ``.deleting`` directories are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete ``checkpoint-*.tmp`` (a save that crashed) and ``checkpoint-*.deleting`` (a prune that crashed)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        if path.name.startswith(PREFIX) and path.name.endswith((TMP_SUFFIX, TRASH_SUFFIX)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.warning("removed incomplete checkpoint directory %s (a save or cleanup was interrupted)", path)
    return removed


def resolve_resume(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserFacingError(
            f"resume: {path} is not a complete checkpoint (no {STATE_FILE}); use resume=latest or a checkpoint-* directory"
        )
    return path


# ---------------------------------------------------------------- JSON + safetensors encoding of state dicts

def _encode(obj: Any, tensors: dict, path: str) -> Any:
    """A JSON-able mirror of ``obj``; tensors go to ``tensors`` under their path and are referenced by name."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    try:
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.key{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise UserFacingError(
        f"checkpoint: cannot store a {type(obj).__name__} at '{path}' as JSON/safetensors; "
        "use an optimizer / LR schedule whose state dict holds only tensors, numbers and strings"
    )


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            import numpy as np

            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state_dict(state: Any, directory: Path, name: str) -> None:
    """``name.json`` (structure and non-tensor values) + ``name.safetensors`` (tensors, if any)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    encoded = _encode(state, tensors, name)
    if tensors:
        save_file(tensors, str(Path(directory) / f"{name}.safetensors"))
    (Path(directory) / f"{name}.json").write_text(json.dumps(encoded))


def load_state_dict(directory: Path, name: str) -> Any:
    from safetensors.torch import load_file

    directory = Path(directory)
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)


# ---------------------------------------------------------------- RNG states

def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different GPU count: restore this process's device only
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


# ---------------------------------------------------------------- save / load

def uses_accelerate_format(accelerator) -> bool:
    """Sharded engines keep their own model/optimizer formats; everything else uses ours."""
    from accelerate.utils import DistributedType

    sharded = {DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA}
    megatron = getattr(DistributedType, "MEGATRON_LM", None)
    if megatron is not None:
        sharded.add(megatron)
    return accelerator.distributed_type in sharded


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, keep_last: int, *, model, optimizer, lr_scheduler,
                    config: Optional[dict] = None) -> Path:
    """Save on every process (each writes its RNG state), publish atomically on rank 0, prune to ``keep_last``.

    ``config``: the run's config (``to_dict``), stored with the state it produced."""
    final = checkpoint_dir(output_dir, state.global_step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    sharded = uses_accelerate_format(accelerator)
    if sharded:
        accelerator.save_state(str(tmp), safe_serialization=True)
    else:
        tmp.mkdir(parents=True, exist_ok=True)
        if accelerator.is_main_process:
            from safetensors.torch import save_model

            save_model(accelerator.unwrap_model(model), str(tmp / MODEL_FILE))
            maybe_kill("save", state.global_step)  # test hook: a crash half-way through a save
            save_state_dict(optimizer.state_dict(), tmp, "optimizer")
    accelerator.wait_for_everyone()
    save_state_dict(rng_state(), tmp, f"rng_state_{accelerator.process_index}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_state_dict(lr_scheduler.state_dict(), tmp, "lr_scheduler")
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            save_state_dict(scaler.state_dict(), tmp, "grad_scaler")
        if config is not None:
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        record = dataclasses.replace(state, format=FORMAT_ACCELERATE if sharded else FORMAT_SAFE)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(record), indent=2))  # last: marks the save complete
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (an explicit older resume): move the old one aside first
            trash = final.with_name(final.name + TRASH_SUFFIX)
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_path(final.parent)
        _prune(output_dir, keep_last)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, *, model, optimizer, lr_scheduler) -> TrainerState:
    path = Path(path)
    raw = json.loads((path / STATE_FILE).read_text())
    known = {f.name for f in dataclasses.fields(TrainerState)}
    fmt = raw.get("format")
    if fmt not in (FORMAT_SAFE, FORMAT_ACCELERATE):
        raise UserFacingError(
            f"resume: {path} was written in an older checkpoint format ({fmt or 'accelerate pickles'}) that this "
            "version does not read; start a new run (or a new output_dir) instead of resuming it"
        )
    state = TrainerState(**{k: v for k, v in raw.items() if k in known})
    if fmt == FORMAT_ACCELERATE:
        if not uses_accelerate_format(accelerator):
            raise UserFacingError(f"resume: {path} was written by a DeepSpeed/FSDP run; resume it with the same accelerate config")
        accelerator.load_state(str(path))
    else:
        if uses_accelerate_format(accelerator):
            raise UserFacingError(f"resume: {path} was written by a DDP/single-process run; resume it without DeepSpeed/FSDP")
        from safetensors.torch import load_model

        load_model(accelerator.unwrap_model(model), str(path / MODEL_FILE), strict=True)
        optimizer.load_state_dict(load_state_dict(path, "optimizer"))
    lr_scheduler.load_state_dict(load_state_dict(path, "lr_scheduler"))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (path / "grad_scaler.json").is_file():
        scaler.load_state_dict(load_state_dict(path, "grad_scaler"))
    rank_file = path / f"rng_state_{accelerator.process_index}.json"
    if rank_file.is_file():
        set_rng_state(load_state_dict(path, f"rng_state_{accelerator.process_index}"))
    else:
        logger.warning("%s has no RNG state for process %d (saved with fewer processes); RNGs not restored",
                       path, accelerator.process_index)
    accelerator.step = state.micro_step  # accelerate's accumulation counter (checkpoints sit on step boundaries)
    return state


def truncate_metrics(log_path: Path, last_step: int) -> int:
    """Drop metrics.jsonl lines for steps after ``last_step`` (written by a run that crashed after its last
    checkpoint; the resumed run writes them again) and any torn last line. Returns the lines dropped."""
    log_path = Path(log_path)
    if not log_path.is_file():
        return 0
    kept, dropped = [], 0
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= last_step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = log_path.with_name(log_path.name + TMP_SUFFIX)
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log_path)
        logger.info("metrics.jsonl: dropped %d line(s) after step %d (from before the resume)", dropped, last_step)
    return dropped


def _prune(output_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep_last]:
        trash = old.with_name(old.name + TRASH_SUFFIX)  # renamed first: a half-deleted dir never looks complete
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    for file in Path(path).rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_path(path)
