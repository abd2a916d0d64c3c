"""One run per output directory: the run lock, the refusal to start over another run, and the run history.

* ``.t2ialign.lock``: taken by the main process for the life of ``train()``. It is an ``fcntl.flock`` on an
  open file, so the kernel drops it when the process dies however it dies (SIGKILL, OOM killer); the file's
  JSON (pid, host, start time, command) only serves the messages. A lock file whose lock nobody holds is
  the leftover of a killed run and is taken over.
* A new run (no ``resume``) into a directory that already holds a run (checkpoints, ``final/``,
  ``metrics.jsonl``, ``config.yaml``) is refused unless ``overwrite_output_dir`` is set; nothing of the old
  run is touched before that decision.
* ``runs.jsonl``: one line per (re)start (time, event, step, config or its changes), so resuming with
  other settings never loses what the run was started with.

Under several processes only rank 0 touches the directory; the other ranks receive its decision (an error
message, or the resume plan), so a refusal stops every rank at the same point instead of leaving some
waiting in a collective.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from t2ialign.errors import UserFacingError
from t2ialign.training.checkpoint import CONFIG_FILE, PREFIX, list_checkpoints, remove_incomplete, resolve_resume
from t2ialign.training.config_check import check_resume_config

logger = logging.getLogger(__name__)

LOCK_FILE = ".t2ialign.lock"
HISTORY_FILE = "runs.jsonl"
METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "final"
# what a run leaves besides checkpoints; --overwrite deletes these (and logs/), never other files
RUN_FILES = (EXPORT_DIR, METRICS_FILE, CONFIG_FILE)
OVERWRITTEN = RUN_FILES + ("logs", "validation")  # validation/: images of validation during training

_HELD_FDS: set[int] = set()


def _close_in_fork_child() -> None:
    # a forked child (DataLoader worker) shares the lock's open file; if the parent were SIGKILLed, an orphan
    # worker would keep the lock held. The child closes its copy (the parent's lock is unaffected).
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_fork_child)


def command_line() -> str:
    return shlex.join(getattr(sys, "orig_argv", sys.argv))  # orig_argv: with the interpreter and its -m


class RunDirBusy(UserFacingError):
    """Another live run holds the output directory."""


class RunDirTaken(UserFacingError):
    """A new run into a directory that holds another run, without resume or overwrite."""


@dataclass
class Holder:
    pid: int
    host: str
    since: str  # local time, for people
    command: str

    @classmethod
    def me(cls) -> "Holder":
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S %z"), command_line())

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command})"


class RunLock:
    """The exclusive, crash-proof lock of one output directory (see the module docstring)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self.fd: Optional[int] = None
        self.holder = Holder.me()

    def acquire(self) -> Optional[Holder]:
        """Take the lock; returns the recorded holder of a stale lock taken over (None if there was none)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                free = _try_lock(fd)
                if free and _same_file(fd, self.path):
                    break
                previous = _read_holder(fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not free:
                raise RunDirBusy(_busy_message(self.path, previous))
            # the holder released (unlinked) the file between our open and our lock: lock the new file
        previous = _read_holder(fd)
        _write_holder(fd, self.holder)
        self.fd = fd
        _HELD_FDS.add(fd)
        return previous

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked: whoever opens the path next gets a fresh file
        except FileNotFoundError:
            pass
        _HELD_FDS.discard(self.fd)
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without locks (some NFS / Lustre mounts): judge by the recorded pid
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        logger.warning("the output_dir's file system does not support locks (%s); judging by the recorded pid", exc)
        holder = _read_holder(fd)
        return holder is None or (holder.host == socket.gethostname() and not _pid_alive(holder.pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, named = os.fstat(fd), os.stat(path)
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> Optional[Holder]:
    try:
        raw = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        return Holder(int(raw["pid"]), str(raw["host"]), str(raw["since"]), str(raw["command"]))
    except (ValueError, TypeError, KeyError):  # empty (a holder killed while writing it) or not ours
        return None


def _write_holder(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(holder)).encode() + b"\n", 0)
    os.fsync(fd)


def _busy_message(path: Path, holder: Optional[Holder]) -> str:
    who = holder.describe() if holder else "a process that has not recorded itself yet"
    return (f"output_dir {path.parent} is in use by another t2ialign run: {who}; wait for it to finish or stop it, "
            "or choose another output_dir")


# ---------------------------------------------------------------- what the directory holds


def run_contents(output_dir: Path) -> list[str]:
    """The traces of a run in ``output_dir`` (complete checkpoints, final/, metrics.jsonl, config.yaml)."""
    found = [p.name for p in list_checkpoints(output_dir)]
    return found + [name + ("/" if name == EXPORT_DIR else "") for name in RUN_FILES if (Path(output_dir) / name).exists()]


def _summary(contents: list[str]) -> str:
    ckpts = [c for c in contents if c.startswith(PREFIX)]
    rest = [c for c in contents if not c.startswith(PREFIX)]
    if len(ckpts) > 1:
        ckpts = [f"{len(ckpts)} checkpoints up to {ckpts[-1]}"]
    return ", ".join(ckpts + rest)


def check_new_run(output_dir: Path, overwrite: bool) -> list[str]:
    """Refuse a new run over another run unless ``overwrite``; returns what overwriting will delete."""
    contents = run_contents(output_dir)
    if contents and not overwrite:
        raise RunDirTaken(
            f"output_dir {output_dir} already holds a run ({_summary(contents)}); continue it with --set resume=latest, "
            "replace it with --overwrite (deletes that run), or choose another output_dir"
        )
    return contents


def delete_previous_run(output_dir: Path) -> None:
    """--overwrite: the old run's checkpoints (also half-written ones), export, log, config, tensorboard logs and
    validation images."""
    root = Path(output_dir)
    doomed = [p for p in root.iterdir() if p.name.startswith(PREFIX) or p.name in OVERWRITTEN]
    for path in sorted(doomed):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if doomed:
        logger.info("overwrite_output_dir: deleted the previous run in %s (%s)", root, ", ".join(p.name for p in sorted(doomed)))


# ---------------------------------------------------------------- opening the directory for a run


@dataclass
class RunStart:
    """Rank 0's decision, shared with every rank: how this run starts."""

    event: str  # "new", "overwrite" or "resume"
    resume_from: Optional[str] = None  # the checkpoint to load, if any
    changes: dict = field(default_factory=dict)  # allowed differences from the checkpoint's config: key -> [old, new]


def open_run_dir(config, accelerator):
    """Lock the directory and decide how the run starts (rank 0), then share the decision with every rank.

    Returns ``(RunStart, lock)``; ``lock`` is None on other ranks. Raises the same UserFacingError on every rank.
    """
    lock, start, error = None, None, None
    if accelerator.is_main_process:
        try:
            lock, start = _open_on_main(config)
        except Exception as exc:  # shared below, so the other ranks stop too instead of waiting in a collective
            error = exc
    message = None
    if error is not None:
        message = str(error) if isinstance(error, UserFacingError) else f"rank 0 could not open the output_dir: {error!r}"
    shared = _broadcast(accelerator, [message, None if start is None else asdict(start)])
    if error is not None:
        raise error
    if shared[0] is not None:
        raise UserFacingError(shared[0])
    return RunStart(**shared[1]), lock


def _broadcast(accelerator, payload: list) -> list:
    if accelerator.num_processes == 1:
        return payload
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(payload, from_process=0)


def _open_on_main(config):
    from t2ialign.data.files import prepare_output_dir

    output_dir = prepare_output_dir(config.output_dir, "output_dir")  # a file there: one line, not a traceback
    lock = RunLock(output_dir)
    stale = lock.acquire()
    try:
        if stale is not None:
            logger.info("%s: taking over the lock of a run that is no longer running (%s)", output_dir, stale.describe())
        start = _plan(config, output_dir)
    except BaseException:
        lock.release()
        raise
    return lock, start


def _plan(config, output_dir: Path) -> RunStart:
    if not config.resume:
        contents = check_new_run(output_dir, config.overwrite_output_dir)
        if contents:
            delete_previous_run(output_dir)
        return RunStart("overwrite" if contents else "new")
    remove_incomplete(output_dir)  # checkpoint-*.tmp left by a crash during a save
    checkpoint = resolve_resume(output_dir, config.resume)
    if checkpoint is None:
        logger.warning("resume=%s: no checkpoint in %s: starting from step 0", config.resume, output_dir)
        return RunStart("resume")
    changes = check_resume_config(config, checkpoint)
    return RunStart("resume", str(checkpoint), changes)


def preflight(config) -> None:
    """The read-only checks, for the CLI to run before its heavy imports: a run that would be refused for the
    directory's contents or a changed config is refused in a second or two. ``train()`` checks again under the
    lock (what counts); while a lock file exists (a live run, or a killed one to take over) only it decides."""
    output_dir = Path(config.output_dir)
    if (output_dir / LOCK_FILE).exists():
        return
    if not config.resume:
        check_new_run(output_dir, config.overwrite_output_dir)
        return
    checkpoint = resolve_resume(output_dir, config.resume)
    if checkpoint is not None:
        check_resume_config(config, checkpoint, quiet=True)


def record_start(config, start: RunStart, step: int) -> None:
    """Rank 0, once the run is set up: write config.yaml (atomically) and append this start to runs.jsonl."""
    from t2ialign.config import to_dict

    output_dir = Path(config.output_dir)
    as_dict = to_dict(config)
    tmp = output_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(as_dict, sort_keys=False))
    os.replace(tmp, output_dir / CONFIG_FILE)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": start.event, "step": step,
             "checkpoint": start.resume_from, "pid": os.getpid(), "host": socket.gethostname(), "command": command_line()}
    # a resume records what changed against the checkpoint's config; anything else the whole config
    entry.update({"changes": start.changes} if start.resume_from else {"config": as_dict})
    with open(output_dir / HISTORY_FILE, "a") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
