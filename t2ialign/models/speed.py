"""Speed levers for training and sampling, as reusable functions (``TrainConfig.compile`` / ``channels_last``).

What each lever buys on one H100 (docs/PERFORMANCE_RESULTS.md, docs/PERFORMANCE.md):

- ``compile_unet``: ``torch.compile`` of the UNet forward (Inductor). +25-30 % pairs/s on SDXL in the
  reference measurements, at the price of a first compilation of ~5 minutes. The compiled artefacts are
  cached on disk (Inductor's FX-graph cache, AOTAutograd's cache, Triton kernels), all under one directory
  (``TORCHINDUCTOR_CACHE_DIR``) that this module points at a persistent place, so a restarted or resumed
  run with the same shapes loads them in seconds instead of compiling again. Default location:
  ``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/t2ialign/torchinductor`` (``~/.cache/...``).
  PyTorch's own default is ``/tmp/torchinductor_$USER``, which a fresh container or a cleaned ``/tmp``
  loses. Give ``cache_dir`` (e.g. under the run's output directory) to keep the cache with the run. The
  cache is keyed on the graph, shapes, dtypes, the torch/triton versions and the GPU, so it is safe to share
  between runs; a changed micro-batch or resolution compiles once more (and is cached too).
  The compilation is done in place (``nn.Module.compile``): the module object, its ``state_dict`` keys
  (no ``_orig_mod.`` prefix), checkpoints and exports are unchanged, and ``adapters_disabled`` on a LoRA
  UNet still works (it triggers one more graph for the adapters-off variant).
- ``to_channels_last``: NHWC memory format for the convolutions (cuDNN's fastest layout for bf16 convs
  on tensor cores); the attention layers are unaffected. Inputs may stay NCHW: the first conv converts.
- fused AdamW: ``t2ialign.training.optim.build_optimizer`` already asks for ``fused=True`` on CUDA (one
  kernel for the whole update instead of one per parameter group; the reference measured an unfused step
  over 2.57 B parameters as slow as a micro-step).
- TF32 matmuls for the fp32 parts (``TrainConfig.allow_tf32``, default on).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_COMPILED_FLAG = "_t2ialign_compiled"


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP / accelerate wrapper
    return getattr(model, "_orig_mod", model)  # an OptimizedModule from torch.compile(model)


def default_compile_cache_dir() -> Path:
    """``$TORCHINDUCTOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/t2ialign/torchinductor`` (``~/.cache`` by default)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "t2ialign" / "torchinductor"


def configure_compile_cache(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Point every on-disk compile cache at ``cache_dir`` and switch the caches on; returns the directory.

    Must run before the first compilation of the process (Inductor reads the variable when it first
    compiles). Sets ``TORCHINDUCTOR_CACHE_DIR`` (FX-graph cache, AOTAutograd cache, and Triton's kernels,
    which live in its ``triton/`` subfolder unless ``TRITON_CACHE_DIR`` says otherwise).
    """
    directory = Path(cache_dir).expanduser() if cache_dir else default_compile_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    directory = directory.resolve()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    # the local FX-graph and AOTAutograd caches are on by default in recent PyTorch; make sure of it (an explicit
    # TORCHINDUCTOR_FX_GRAPH_CACHE=0 / TORCHINDUCTOR_AUTOGRAD_CACHE=0 from the user still wins). Through the
    # environment when the config modules are not imported yet (importing them costs seconds), else directly.
    for variable, module_name, attribute in (
        ("TORCHINDUCTOR_FX_GRAPH_CACHE", "torch._inductor.config", "fx_graph_cache"),
        ("TORCHINDUCTOR_AUTOGRAD_CACHE", "torch._functorch.config", "enable_autograd_cache"),
    ):
        enabled = os.environ.setdefault(variable, "1") != "0"
        module = sys.modules.get(module_name)
        if enabled and module is not None and hasattr(module, attribute):
            setattr(module, attribute, True)
    return directory


def compile_unet(unet, cache_dir: Optional[str | os.PathLike] = None, *, mode: Optional[str] = None,
                 dynamic: Optional[bool] = None, fullgraph: bool = False):
    """``torch.compile`` the UNet's forward in place, with a persistent compile cache; returns the same module.

    Idempotent (a second call does nothing). ``mode``: ``None`` (default Inductor), ``"max-autotune-no-cudagraphs"``
    (slower first compile, sometimes faster kernels). ``dynamic=None`` lets PyTorch mark a dimension dynamic
    after it sees it change (DDIM-InPO's inversion runs on a varying number of rows). The first micro-steps
    after this call are slow (compilation of the forward, then of the backward).
    """
    module = _unwrap(unet)
    if getattr(module, _COMPILED_FLAG, False):
        return unet
    directory = configure_compile_cache(cache_dir)
    kwargs = {"dynamic": dynamic, "fullgraph": fullgraph}
    if mode is not None:
        kwargs["mode"] = mode
    module.compile(**kwargs)
    setattr(module, _COMPILED_FLAG, True)
    logger.info("torch.compile on %s (cache: %s)", type(module).__name__, directory)
    return unet


def is_compiled(unet) -> bool:
    return bool(getattr(_unwrap(unet), _COMPILED_FLAG, False))


def to_channels_last(unet):
    """Convert the UNet's 4-D weights (the convolutions) to the channels-last memory format, in place."""
    module = _unwrap(unet)
    module.to(memory_format=torch.channels_last)
    return unet


def apply_speed_settings(config, policy, reference=None, cache_dir: Optional[str | os.PathLike] = None):
    """Apply ``config.channels_last`` and ``config.compile`` (a ``TrainConfig`` or ``SampleConfig``) to the models.

    Training: call after LoRA adapters are attached and gradient checkpointing is set (compilation traces the
    module as it is then), before ``accelerate.prepare``. ``cache_dir`` defaults to ``config.compile_cache_dir``
    and then to ``default_compile_cache_dir()``; ``config.compile_mode`` (if the config has one) picks the
    Inductor mode, e.g. ``"reduce-overhead"`` (CUDA graphs) for sampling. Safe to call twice.
    """
    models = [m for m in (policy, reference) if m is not None]
    if getattr(config, "channels_last", False):
        for model in models:
            to_channels_last(model)
    if getattr(config, "compile", False):
        cache_dir = cache_dir or getattr(config, "compile_cache_dir", None)
        for model in models:
            compile_unet(model, cache_dir, mode=getattr(config, "compile_mode", None))
    return policy, reference
