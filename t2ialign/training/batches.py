"""Deterministic, resumable batch order across processes.

The order of micro-batch ``m`` is a pure function of (seed, m, process rank), so a resumed run reads
exactly the rows an uninterrupted run would have read, without replaying the data loader.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableBatchSampler(Sampler):
    """Yields this process's index lists for micro-steps ``start, start+1, ...`` (epochs reshuffled by seed)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_micro_step: int = 0):
        global_batch = batch_size * world_size
        if num_rows < global_batch:
            raise ValueError(
                f"the dataset has {num_rows} usable rows, fewer than one global batch of {global_batch} pairs "
                f"(train_batch_size x processes); use more data or a smaller train_batch_size"
            )
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start_micro_step
        self.batches_per_epoch = num_rows // global_batch  # the ragged tail is dropped, as DDP samplers do

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """(row, epoch) keys: the dataset seeds each row's augmentation from its epoch."""
        micro_step = self.start
        epoch, order = None, None
        while True:
            this_epoch, position = divmod(micro_step, self.batches_per_epoch)
            if this_epoch != epoch:
                epoch, order = this_epoch, self.epoch_order(this_epoch)
            first = (position * self.world_size + self.rank) * self.batch_size
            yield [(row, epoch) for row in order[first : first + self.batch_size].tolist()]
            micro_step += 1

    def __len__(self) -> int:  # DataLoader needs a length for progress info; the stream is endless
        return 2**31 - 1


def make_loader(dataset, collate_fn, sampler: ResumableBatchSampler, num_workers: int) -> DataLoader:
    from t2ialign.training.signals import ignore_stop_signals

    # pinned batches let the step copy them to the GPU with non_blocking=True (no wait for queued kernels);
    # workers ignore SIGTERM/SIGINT so that the step in flight when one arrives can finish (training/signals.py)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals if num_workers else None,
    )
