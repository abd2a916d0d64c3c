"""Optimizer offload (``optim.offload: true``): fp32 master weights and optimizer states in host RAM.

The GPU keeps the model's weights and gradients only. At each optimizer step the gradients are copied
into pinned host buffers, the wrapped optimizer (AdamW, Adafactor, ...) updates fp32 master copies on the
CPU, and the new weights are copied back. This is the ZeRO-Offload layout for one process, written as a
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
                 pin_memory: bool | None = None):
        params = [p for p in params]
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
        if closure is not None:
            raise ValueError("CPUOffloadOptimizer does not support closures")
        if self._masters_stale:  # the weights were loaded (resume) after the masters were made
            self._copy_weights_to_masters()
        self._sync_hyperparameters()
        params = self._device_params()
        for param, master, buffer in zip(params, self._masters, self._grad_buffers):
            if param.grad is None:
                master.grad = None  # the inner optimizer skips it, as it would on the device
                continue
            buffer.copy_(param.grad, non_blocking=True)
            master.grad = buffer
        if any(p.is_cuda for p in params):
            torch.cuda.synchronize()  # the gradients must have landed in host memory before the CPU reads them
        self.inner.step()
        for param, master in zip(params, self._masters):
            if master.grad is not None:
                param.copy_(master, non_blocking=True)  # ordered before the next kernels on the current stream
            master.grad = None

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


def _host_buffer(param: Tensor, pin_memory: bool) -> Tensor:
    return torch.empty(param.shape, dtype=torch.float32, device="cpu", pin_memory=pin_memory)


def _hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}
