"""Atomic training checkpoints: write to a temporary directory, then rename.

A checkpoint directory ``checkpoint-00000500`` holds accelerate's full training state (model,
optimizer, LR schedule, RNG states of every process) and ``trainer_state.json``. It only gets its
final name once everything is on disk, so a crash during a save leaves the previous one usable.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from t2ialign.errors import UserFacingError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    global_step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches consumed (data position and RNG stream derive from it)
    bad_steps_total: int = 0
    bad_steps_consecutive: int = 0


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:08d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary ``.tmp`` directories are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserFacingError(f"resume: {path} is not a complete checkpoint (no {STATE_FILE}); use resume=latest or a checkpoint-* directory")
    return path


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, keep_last: int) -> Path:
    """Save on every process (accelerate writes per-process RNG states), publish atomically on rank 0."""
    final = checkpoint_dir(output_dir, state.global_step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(output_dir, keep_last)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((Path(path) / STATE_FILE).read_text()))


def _prune(output_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for file in Path(path).rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
