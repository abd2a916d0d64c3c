"""SIGTERM / SIGINT during training: finish the optimizer step, write a checkpoint, exit 128 + signal.

Schedulers (SLURM, Kubernetes) send SIGTERM some time before SIGKILL; Ctrl-C sends SIGINT. The handlers
only set a flag; the loop looks at it at the end of each optimizer step (``agreed_signal``), writes a
checkpoint there and raises ``TrainingInterrupted``, which the CLI turns into exit code 143 / 130.

* A repeat of the signal more than ``REPEAT_WINDOW_S`` after the first exits at once (``os._exit``, no
  checkpoint): the way out when the step or the save takes too long. A repeat within the window counts as
  the same request: a launcher (torchrun, ``accelerate launch``) forwards the scheduler's SIGTERM to its
  workers, which then also got it directly from the scheduler, a few milliseconds apart.
* Several processes: the flag is reduced across ranks at every step boundary, so a signal that reached
  one rank only stops every rank at the same step, and the checkpoint (a collective) is written by all.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


class TrainingInterrupted(Exception):
    """Training stopped on a signal; ``checkpoint`` (or None) holds the state to resume from."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
        where = f"checkpoint written to {checkpoint}" if checkpoint else "no step trained yet: no checkpoint written"
        super().__init__(f"received {signal.Signals(signum).name} at step {step}: {where}")


class StopRequest:
    """Installs the handlers for the duration of a ``with`` block (then restores the previous ones)."""

    def __init__(self, signals=STOP_SIGNALS, repeat_window: float = REPEAT_WINDOW_S):
        self.signals, self.repeat_window = tuple(signals), repeat_window
        self.signum, self.first_at = 0, 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():  # Python only allows handlers there
            logger.debug("train() outside the main thread: SIGTERM/SIGINT keep their handlers")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum, self.first_at = signum, now
            logger.warning("received %s: stopping after this optimizer step with a checkpoint "
                           "(send it again after %g s to exit at once, without one)", name, self.repeat_window)
        elif now - self.first_at > self.repeat_window:
            os.write(2, f"received {name} again: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)


def agreed_signal(accelerator, request: StopRequest | None) -> int:
    """The stop signal if any rank got one, else 0; the same answer on every rank (a collective when >1 process)."""
    local = request.signum if request is not None else 0
    if accelerator.num_processes == 1:
        return local
    import torch

    # one integer per rank; the step already waits for the host (the logged metrics), so this adds no stall
    flags = accelerator.gather(torch.tensor([local], dtype=torch.int64, device=accelerator.device))
    return int(flags.max())


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a signal to the process group must not kill the workers while the main
    process finishes its step (it needs their batches); they exit with the main process."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
