"""The peak-memory estimate of scripts/bench_train.py (``--estimate-memory``): one optimizer step of a row built
under ``FakeTensorMode`` (or on real CPU tensors, ``--real-tensors``), followed by PyTorch's ``MemTracker``.

What is tracked, what is reported and what is left out: the docstring of scripts/bench_train.py.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

from bench_train_setup import build_row, describe, tiny_unet

GIB = 2**30
ALLOCATOR_SLACK = 1.10  # CUDA caching allocator: fragmentation and cached-but-free blocks, typically +5-10 %
# aten ops that CUDA autocast runs in fp32 (AT_FORALL_FP32, aten/src/ATen/autocast_mode.h). CPU autocast leaves
# most of them in bf16, so without this a CPU run would save bf16 norm outputs where the GPU saves fp32 ones.
CUDA_AUTOCAST_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss",
    "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
CATEGORIES = {  # MemTracker's reference types -> report keys
    _MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "gradients",
    _MemRefType.ACT: "activations", _MemRefType.TEMP: "temps", _MemRefType.OPT: "optimizer_states",
    _MemRefType.OTH: "other", _TOTAL_KEY: "total",
}


def _fp32_kernel(op):
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def upcast(value):
        return value.float() if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16) else value

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):  # as CUDA autocast: cast, then run without autocast
            args, kwargs = torch.utils._pytree.tree_map(upcast, (args, kwargs))
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy():
    """CPU autocast with CUDA's fp32 list: group/layer norms and upsampling give fp32 outputs, as on the GPU.
    (CPU and CUDA agree on what runs in bf16: matmuls, convolutions, attention.)"""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    library = torch.library.Library("aten", "IMPL")
    try:
        for name in CUDA_AUTOCAST_FP32_OPS:
            if has_kernel(f"aten::{name}", "AutocastCUDA") and not has_kernel(f"aten::{name}", "AutocastCPU"):
                packet, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, packet), overload or "default")
                library.impl(name, _fp32_kernel(op), "AutocastCPU")
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def fake_tensors():
    """A FakeTensorMode in which the trainer's model building (``copy.deepcopy``, ``.to(dtype)``) works."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    # Module.to() swaps fake parameters in place, which torch refuses for a tensor with weak references, and the
    # mode's memo holds one to every fake tensor (it only serves real -> fake conversions, identity of the same real)
    mode.fake_tensor_converter.set_tensor_memo = lambda tensor, fake: None
    # copy.deepcopy(module) copies each fake tensor's __dict__, fake_mode included: tensors of a copied mode cannot mix
    mode.__deepcopy__ = lambda memo: mode
    with warnings.catch_warnings(), mode:
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # Tensor.__deepcopy__ probes it
        yield mode


class StepMemTracker(MemTracker):
    """MemTracker for a training step: the peak of the bytes on the device and the breakdown at that moment.

    With optimizer offload, optimizer states (fp32 masters, gradient buffers, states and the step's temporaries)
    live in host RAM: ``host_categories=(OPT,)`` counts them apart from the device peak.
    """

    def __init__(self, host_categories=()):
        super().__init__()
        self.host_categories = tuple(host_categories)
        self.device_peak, self.device_peak_snapshot = 0, {}
        self.host_peak = 0
        self.transient_peak = 0  # activations + temps, whenever they peak
        self.ops = set()

    def track_optimizer_tensors(self, *tensors) -> None:
        for tensor in tensors:
            self._update_and_maybe_create_winfos(tensor, _MemRefType.OPT)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        # MemTracker hooks every parameter of a module it sees run; frozen ones (reference, LoRA base) refuse hooks
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for param in module.parameters() if install_grad_hooks else ():
            if param.requires_grad and param not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(self._track_grad),
                    param.register_post_accumulate_grad_hook(lambda p: self._track_grad(p.grad)),
                )
        return memory

    def _track_grad(self, grad) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _pre_fw_hook(self, module, inputs) -> None:
        # the policy runs once per micro-step (twice in one with LoRA: adapters off is the reference); MemTracker's
        # per-module statistics refuse a second forward of a root module, and only the global peak is used here
        if not self._mod_tracker.is_bw:
            self.memory_tracking.pop(module, None)
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:
        # global peak only: MemTracker's per-module peaks cost a pass over every module per op
        for device, snapshot in self._curr_mem_snap.items():
            host = sum(snapshot[category] for category in self.host_categories)
            self.host_peak = max(self.host_peak, host)
            self.transient_peak = max(self.transient_peak, snapshot[_MemRefType.ACT] + snapshot[_MemRefType.TEMP])
            if snapshot[_TOTAL_KEY] - host > self.device_peak:
                self.device_peak = snapshot[_TOTAL_KEY] - host
                self.device_peak_snapshot = {device: dict(snapshot)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _by_category(snapshot: dict, host_categories=()) -> dict:
    """Bytes per report key; ``host_categories`` (offload) are left out: they are not on the device."""
    out = dict.fromkeys(CATEGORIES.values(), 0)
    for device_snapshot in snapshot.values():
        for category, nbytes in device_snapshot.items():
            if category in host_categories:
                out["total"] -= nbytes
            else:
                out[CATEGORIES[category]] += nbytes
    return out


def _offload_optimizer_class():
    try:
        from t2ialign.training.offload import CPUOffloadOptimizer
    except ImportError:
        raise NotImplementedError("--offload: t2ialign.training.offload is not in this checkout yet; "
                                  "estimate without --offload") from None
    return CPUOffloadOptimizer


def _offloaded_tensors(optimizer, offload_class) -> list:
    """What the offload optimizer keeps in host RAM: fp32 masters, gradient buffers, the inner optimizer's states."""
    if not isinstance(optimizer, offload_class):
        raise NotImplementedError(f"--offload: build_optimizer returned {type(optimizer).__name__}, not {offload_class.__name__}")
    states = [t for state in optimizer.inner.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return [*optimizer._masters, *optimizer._grad_buffers, *states]


def _create_optimizer_states(trainable, optimizer) -> None:
    """AdamW and Adafactor make their states at the first step(): one untracked step on zero gradients, so the tracked
    step is a steady-state one (states held from its first micro-step on)."""
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _tracked_optimizer_step(built: dict, micro_steps: int, tracker) -> dict:
    """One optimizer step as the trainer runs it (loop._run_steps): each micro-step in one autocast region, whose
    bf16 weight-cast cache lives until the region ends, and the optimizer step inside the last one.
    Returns the snapshot taken after the last backward, before the optimizer step."""
    trainable, optimizer = built["trainable"], built["optimizer"]
    for micro_step in range(micro_steps):
        with built["autocast"]():
            output = built["forward"]()
            built["backward"](output)
            del output
            if micro_step == micro_steps - 1:
                before_step = tracker.get_tracker_snapshot()
                torch.nn.utils.clip_grad_norm_(trainable, built["config"].optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return before_step


def estimate_row(args, objective: str, lora_rank: int, device) -> dict:
    """The real code path of one optimizer step on fake CPU tensors (nothing is computed or allocated), under
    MemTracker: the peak tensor bytes a GPU run would hold, and what they are (see bench_train.py's docstring)."""
    start = time.perf_counter()
    if args.tiny:
        tiny_unet()  # real weights, built before any fake mode
    offload_class = _offload_optimizer_class() if args.offload else None
    micro_steps = min(args.grad_accum, 2)  # from the second micro-step on, all gradients are held: later ones repeat it
    with contextlib.ExitStack() as stack:
        if not args.real_tensors:
            stack.enter_context(fake_tensors())
        if args.autocast_policy == "cuda":
            stack.enter_context(cuda_autocast_policy())
        built = build_row(args, objective, lora_rank, torch.device("cpu"))
        _create_optimizer_states(built["trainable"], built["optimizer"])
        offloaded = _offloaded_tensors(built["optimizer"], offload_class) if args.offload else []
        tracker = StepMemTracker(host_categories=(_MemRefType.OPT,) if args.offload else ())
        batch = [value for value in built["batch"].values() if isinstance(value, torch.Tensor)]
        tracker.track_external(built["policy"], built["reference"], built["optimizer"], *batch)
        tracker.track_optimizer_tensors(*offloaded)
        with tracker:
            persistent = tracker.get_tracker_snapshot()
            before_step = _tracked_optimizer_step(built, micro_steps, tracker)
    peak = tracker.device_peak
    return {
        **describe(args, objective, lora_rank, built),
        "tensors": "real" if args.real_tensors else "fake",
        "autocast_policy": args.autocast_policy if args.mixed_precision != "no" else None,
        "micro_steps_tracked": micro_steps,
        "peak_bytes": peak,
        "peak_gib": peak / GIB,
        "peak_gib_with_slack": peak * ALLOCATOR_SLACK / GIB,
        "peak_breakdown_bytes": _by_category(tracker.device_peak_snapshot, tracker.host_categories),
        "persistent_bytes": _by_category(persistent, tracker.host_categories),
        "before_optimizer_step_bytes": _by_category(before_step, tracker.host_categories),
        "activations_temps_peak_bytes": tracker.transient_peak,
        "host_peak_bytes": tracker.host_peak,
        "attention_ops": sorted(op for op in tracker.ops if "attention" in op or "softmax" in op),
        "estimate_s": time.perf_counter() - start,
    }


def estimate_meta(meta: dict, args) -> dict:
    """The report header of ``--estimate-memory``: what its numbers are and what they leave out."""
    meta = {k: v for k, v in meta.items() if k not in ("load_average", "warmup_optimizer_steps", "peak_flops", "peak_flops_source")}
    if not args.real_tensors:
        meta["device"] = "none (fake CPU tensors: shapes and dtypes tracked, nothing computed or allocated)"
    return {
        **meta,
        "estimate_memory": True,
        "smoke_test": bool(args.tiny),  # an estimate of the real configuration, not a CPU stand-in for it
        "peak_memory_kind": ("tensor bytes at the peak of one optimizer step (torch MemTracker); not included: the CUDA "
                             "context (~0.5-1 GiB), cuBLAS/cuDNN workspaces, allocator fragmentation (peak_gib_with_slack)"),
        "allocator_slack": ALLOCATOR_SLACK,
    }


BREAKDOWN_HEADER = (f"{'ckpt':>9s} {'optimizer':>14s} {'peak GiB':>8s} {'+slack':>6s} | {'params':>6s} {'grads':>6s} "
                    f"{'optim':>6s} {'activ':>6s} {'temps':>6s} {'other':>5s} | {'host':>5s} {'s':>4s}")


def breakdown_cells(r: dict) -> str:
    """The columns every estimate table shares (checkpointing .. seconds), for one row."""
    at_peak = {k: v / GIB for k, v in r["peak_breakdown_bytes"].items()}
    ckpt = r["checkpointing_mode"] if r["checkpointing"] else "no"
    optimizer = r["optimizer"] + ("+offload" if r["offload"] else "")
    return (f"{ckpt:>9s} {optimizer:>14s} {r['peak_gib']:8.2f} {r['peak_gib_with_slack']:6.2f} | "
            f"{at_peak['parameters'] + at_peak['buffers']:6.2f} {at_peak['gradients']:6.2f} "
            f"{at_peak['optimizer_states']:6.2f} {at_peak['activations']:6.2f} {at_peak['temps']:6.2f} {at_peak['other']:5.2f} | "
            f"{r['host_peak_bytes'] / GIB:5.1f} {r['estimate_s']:4.0f}")


def estimate_title(report: dict, what: str) -> str:
    slack = round(100 * (report["allocator_slack"] - 1))
    return (f"{what}, {report['resolution']} px, torch {report['torch']}: peak tensor GiB of one optimizer step "
            f"(+slack: +{slack}% allocator fragmentation; CUDA context and workspaces not included). Breakdown at the peak:")


def format_estimate_table(report: dict) -> str:
    lines = [estimate_title(report, report["unet"]), f"{'objective':9s} {'mode':9s} {'B':>2s} " + BREAKDOWN_HEADER]
    for r in report["rows"]:
        lines.append(f"{r['objective']:9s} {r['mode']:9s} {r['micro_batch']:2d} " + breakdown_cells(r))
    return "\n".join(lines)
