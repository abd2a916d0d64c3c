"""Optimizer offload (``optim.offload: true``): fp32 master weights and optimizer states in host RAM.

The GPU keeps the model's weights and gradients only. At each optimizer step the gradients are copied
into pinned host buffers, the wrapped optimizer (AdamW, Adafactor, ...) updates fp32 master copies on the
CPU, and the new weights are copied back, in ~256 MiB buckets so that on a GPU the copies of one bucket
(on side streams) overlap the CPU update of another. This is the ZeRO-Offload layout for one process, written as a
plain ``torch.optim.Optimizer`` so that the LR scheduler, gradient clipping, accelerate's wrapper and the
checkpoint code treat it like any other optimizer.

SDXL full fine-tune (2.57 B parameters): AdamW states (20.5 GB) leave the GPU; host RAM holds 41 GB per
process (masters 10.3 + gradient buffers 10.3 + states 20.5). The price is the host side of every optimizer
step: two PCIe transfers of the weights' size and an AdamW pass over 2.57 B parameters on the CPU, paid once
per optimizer step, so it is amortised over ``gradient_accumulation_steps``; docs/PERFORMANCE_RESULTS.md has
the measured cost.

Because the masters are fp32, the update keeps fp32 precision even when the GPU weights are bf16: small
updates accumulate in the masters instead of being rounded away on the device.

Not for DeepSpeed or FSDP: they shard the optimizer and have their own offload (``offload_optimizer_device``,
``fsdp_offload_params`` in their accelerate config).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import Tensor


class CPUOffloadOptimizer(torch.optim.Optimizer):
    """Run ``make_inner(masters)`` on fp32 CPU copies of ``params``; ``params`` may live on any device.

    ``param_groups`` are those of the device parameters (what schedulers and clipping see); their
    hyperparameters (lr, betas, weight decay, ...) are copied to the inner optimizer before each step.
    ``state_dict()`` is the inner optimizer's, so a checkpoint has the same layout as without offload.
    """

    def __init__(self, params: Iterable[Tensor], make_inner: Callable[[list[Tensor]], torch.optim.Optimizer],
                 pin_memory: bool | None = None, bucket_bytes: int = 256 * 2**20):
        params = [p for p in params]
        self._buckets = _buckets_by_size(params, bucket_bytes)
        self._streams = None  # (download, upload) CUDA streams, made at the first step on a GPU
        if pin_memory is None:  # pinned host memory is what makes the copies asynchronous; CPU params need none
            pin_memory = any(p.is_cuda for p in params)
        self._masters = [_host_buffer(p, pin_memory) for p in params]
        self._grad_buffers = [_host_buffer(p, pin_memory) for p in params]
        self.inner = make_inner(self._masters)
        if len(self.inner.param_groups) != 1:
            raise ValueError("CPUOffloadOptimizer: make_inner must build one parameter group over the masters it is given")
        super().__init__(params, _hyperparameters(self.inner.param_groups[0]))
        self._copy_weights_to_masters()

    @torch.no_grad()
    def _copy_weights_to_masters(self) -> None:
        for param, master in zip(self._device_params(), self._masters):
            master.copy_(param.detach())
        self._masters_stale = False

    def _device_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _sync_hyperparameters(self) -> None:
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            inner_group.update(_hyperparameters(group))

    @torch.no_grad()
    def step(self, closure=None):
        """Bucket by bucket: wait for its gradients to reach host memory, update its masters, send its weights
        back. On a GPU the copies run on side streams, so the transfer of one bucket overlaps the CPU update of
        another. Stepping the inner optimizer once per bucket, with only that bucket's gradients set, is one
        ordinary step: optimizers skip parameters whose gradient is None (and do not count a step for them)."""
        if closure is not None:
            raise ValueError("CPUOffloadOptimizer does not support closures")
        if self._masters_stale:  # the weights were loaded (resume) after the masters were made
            self._copy_weights_to_masters()
        self._sync_hyperparameters()
        params = self._device_params()
        on_gpu = any(p.is_cuda for p in params)
        arrived = self._download_gradients(params, on_gpu)
        for bucket, event in zip(self._buckets, arrived):
            if event is not None:
                event.synchronize()  # this bucket's gradients are in host memory; later buckets still travel
            for i in bucket:
                self._masters[i].grad = self._grad_buffers[i] if params[i].grad is not None else None
            self.inner.step()
            self._upload_weights(params, bucket, on_gpu)
            for i in bucket:
                self._masters[i].grad = None
        if on_gpu:  # the next forward reads the new weights
            torch.cuda.current_stream().wait_stream(self._streams[1])

    def _download_gradients(self, params: list[Tensor], on_gpu: bool) -> list:
        """Start every bucket's gradient copy; returns one CUDA event per bucket (None on the CPU)."""
        if not on_gpu:
            for i, param in enumerate(params):
                if param.grad is not None:
                    self._grad_buffers[i].copy_(param.grad)
            return [None] * len(self._buckets)
        if self._streams is None:
            self._streams = (torch.cuda.Stream(params[0].device), torch.cuda.Stream(params[0].device))
        download = self._streams[0]
        download.wait_stream(torch.cuda.current_stream())  # the backward and the clipping have written the gradients
        events = []
        with torch.cuda.stream(download):
            for bucket in self._buckets:
                for i in bucket:
                    if params[i].grad is not None:
                        self._grad_buffers[i].copy_(params[i].grad, non_blocking=True)
                event = torch.cuda.Event()
                event.record(download)
                events.append(event)
        return events

    def _upload_weights(self, params: list[Tensor], bucket: list[int], on_gpu: bool) -> None:
        upload = self._streams[1] if on_gpu else None
        with torch.cuda.stream(upload) if on_gpu else contextlib.nullcontext():
            for i in bucket:
                if self._masters[i].grad is not None:
                    params[i].copy_(self._masters[i], non_blocking=on_gpu)

    def state_dict(self) -> dict:
        """The inner optimizer's state; plus the masters when the device weights are not fp32 (bf16 weights
        cannot give them back exactly, and an exact resume needs them)."""
        self._sync_hyperparameters()
        state = self.inner.state_dict()
        if self._masters_carry_precision():
            state["master_weights"] = list(self._masters)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        self.inner.load_state_dict(state_dict)  # moves the states to the masters' device (the CPU)
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            group.update(_hyperparameters(inner_group))
        if masters is not None:
            with torch.no_grad():
                for master, saved in zip(self._masters, masters):
                    master.copy_(saved)
        self._masters_stale = masters is None

    def _masters_carry_precision(self) -> bool:
        return any(p.dtype != torch.float32 for p in self._device_params())

    @torch.no_grad()
    def load_masters_into_params(self) -> None:
        """Give the device parameters the fp32 master values, and the fp32 dtype (the final export of a run
        with bf16 weights, so that it holds the updates that bf16 rounds away)."""
        if self._masters_stale:
            return
        for param, master in zip(self._device_params(), self._masters):
            param.data = master.to(param.device, copy=True)


def _buckets_by_size(params: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices, ~``bucket_bytes`` of fp32 masters per bucket."""
    buckets, current, size = [], [], 0
    for i, param in enumerate(params):
        current.append(i)
        size += 4 * param.numel()
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    return buckets + [current] if current else buckets


def _host_buffer(param: Tensor, pin_memory: bool) -> Tensor:
    return torch.empty(param.shape, dtype=torch.float32, device="cpu", pin_memory=pin_memory)


def _hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}
