"""The frozen reference UNet of a full fine-tune: a copy of the policy that computes what the policy computes.

Diffusion-DPO's loss at initialisation is ln 2 only if the reference's per-sample errors equal the
policy's. A plain half-precision copy (what the authors' trainer does: ``ref_unet.to(weight_dtype)``)
breaks that under mixed precision. Autocast runs matmuls and convolutions in half precision, but every
other op (norms, residual adds, embeddings) runs in the dtype of its inputs and parameters, so an fp32
policy and its bf16 copy round differently. On the toy model that moved DPO's first loss from ln 2 to
0.73, at beta 5000 the same order as the preference signal.

The exact alternative keeps memory low. The weights of every ``Linear`` / ``Conv`` layer are stored in
the autocast dtype and upcast to the policy's dtype just for that layer's forward, with diffusers'
layerwise casting hooks. Everything else (norms, embeddings, biases of other layers) keeps the policy's
dtype. Autocast then casts those weights back to its dtype: ``bf16(fp32(bf16(w))) == bf16(w)``, which is
exactly the cast it applies to the policy's fp32 weight. The reference's errors therefore equal the
policy's bit for bit at initialisation, at about half the memory of an fp32 copy (tested in
tests/test_reference.py).

Equal values are not enough: ATen must also pick the same kernels for the policy (weights that require
grad) and the reference (frozen). ``t2ialign/__init__.py`` sets ``TORCH_LINEAR_FLATTEN_3D=1`` for that
(without it a non-contiguous 3-D ``linear`` input goes to ``mm`` or ``bmm`` depending on requires-grad).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["SharedGraphReference", "frozen_reference", "reference_compute_dtype", "shared_graph_reference"]


def _floating_dtype(module: nn.Module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def frozen_reference(policy: nn.Module, storage_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> nn.Module:
    """A frozen, eval-mode copy of ``policy`` (taken as the policy computes now) stored in ``storage_dtype``.

    Exact (the same outputs as the policy for the same inputs) when ``storage_dtype`` is at least the
    policy's dtype, or equals ``autocast_dtype`` (the mixed-precision dtype the forward runs under).
    Otherwise it falls back to a plain cast and logs that the reference rounds differently.
    """
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    policy_dtype = _floating_dtype(policy)
    if storage_dtype == policy_dtype or storage_dtype.itemsize >= policy_dtype.itemsize:
        # a wider copy of a half-precision policy would only hold the same values in more bytes
        return reference
    if storage_dtype == autocast_dtype:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(
            reference, storage_dtype=storage_dtype, compute_dtype=policy_dtype,
            skip_modules_pattern=(),  # every Linear / Conv: autocast rounds their weights to storage_dtype anyway
            skip_modules_classes=(nn.Embedding,),  # lookups are not autocast ops: they read the weight as stored
            non_blocking=True,
        )
        return reference
    logger.warning(
        "model.reference_dtype (%s) is neither the policy's dtype (%s) nor the mixed-precision dtype (%s): the "
        "reference rounds differently from the policy, and DPO's first loss is not exactly ln 2. Set "
        "model.reference_dtype to %s or to the mixed_precision dtype for an exact reference.",
        storage_dtype, policy_dtype, autocast_dtype, policy_dtype,
    )
    return reference.to(dtype=storage_dtype)


def reference_compute_dtype(reference: nn.Module) -> torch.dtype:
    """The dtype the reference's inputs must have: the compute dtype of layerwise casting, else its weights'."""
    dtype = getattr(reference, "dtype", None)  # diffusers ModelMixin: the layerwise-casting compute dtype
    return dtype if isinstance(dtype, torch.dtype) else _floating_dtype(reference)


@dataclass
class SharedGraphReference:
    """The reference as parameters swapped into the policy's own call (``torch.func.functional_call``).

    Used with ``compile: true``. Inductor compiles the policy's training graph and a separate reference's
    no-grad graph differently (fusion, what is kept in fp32 registers), so the two round differently. On
    the tiny UNet that moved DPO's first loss by more than 0.1 at beta 5000. Run through the policy's own
    compiled training graph, the reference computes exactly what the policy computes at initialisation.
    Full fine-tune: a frozen copy of every parameter, in the policy's dtype (the graph is specialised on
    it). LoRA: zeros for every ``lora_B``, so each adapter adds exactly 0 and the base model remains.
    The tensors require grad only so that the call takes the same (training) graph. No gradient ever
    reaches them: the output is detached, and its saved activations are freed with it.
    """

    params: dict

    def to(self, device) -> "SharedGraphReference":
        self.params = {name: t.detach().to(device).requires_grad_() for name, t in self.params.items()}
        return self

    def predict(self, policy: nn.Module, *args, **kwargs) -> Tensor:
        with torch.enable_grad():
            output = torch.func.functional_call(policy, self.params, args, kwargs, strict=False)
        return output.sample.detach()


def shared_graph_reference(policy: nn.Module, lora: bool) -> SharedGraphReference:
    """Call after every lever that changes the policy's parameters (dtype, LoRA, channels-last)."""
    if lora:
        params = {n: torch.zeros_like(p).requires_grad_() for n, p in policy.named_parameters() if "lora_B" in n}
    else:
        params = {n: p.detach().clone().requires_grad_() for n, p in policy.named_parameters()}
    return SharedGraphReference(params)
