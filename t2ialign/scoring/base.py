"""The scorer interface, the name -> loader registry and weight resolution.

A scorer maps (images, prompts) to one float per image, higher is better::

    scorer = get_scorer("pickscore")                      # hub id default, or a local path
    scorer = get_scorer("hpsv21", "/ckpt/HPS_v2.1_compressed.pt", device="cuda")
    scores = scorer.score([pil_a, pil_b], ["a cat", "a dog"])   # float32 CPU tensor (2,)

Scorers know nothing about files, CLI or training. Each one can also be built from in-memory modules
(``PickScoreScorer(model, tokenizer)`` ...), which is how the tests and the toy world pass random-weight
models, and ``FunctionScorer`` wraps any reward function.

Precision: fp32 by default (what the official numbers use). ``dtype=torch.bfloat16`` runs the towers in
bf16 and ``tf32=True`` allows TF32 matmuls on Ampere+ GPUs; the features are cast back to fp32 before
the score formula. ``scripts/bench_scorers.py --dtype bf16 --check-precision`` prints the max |delta| vs
fp32 per scorer; that measured number is the tolerance to report with bf16/TF32 results. Measured so far
only on small random-weight configs on CPU (bf16: PickScore 0.08 at a score scale of ~5, HPS 0.004 at
~0.07); real-size GPU numbers are still to be taken. Use fp32 for numbers compared with published tables.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Sequence

import torch

from t2ialign.errors import ModelNotFoundError, UserFacingError
from t2ialign.hub import fix_hint, local_only, offline_note, require_cached

from .preprocess import to_pil

logger = logging.getLogger(__name__)


def resolve_device(device=None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise UserFacingError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}") from None


class Scorer:
    """Base class: subclasses implement ``_score_batch(images, prompts) -> Tensor (B,)``."""

    name: str = "scorer"
    #: what one unit means, for reports
    scale: str = ""

    def __init__(self, device=None, dtype=torch.float32, batch_size: int = 32, tf32: bool = False):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = int(batch_size)
        self.tf32 = bool(tf32)

    # -- public API -------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, images: Sequence, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """One score per (image, prompt) pair: float32 CPU tensor of shape (N,)."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if len(images) == 0:
            return torch.zeros(0)
        bs = int(batch_size or self.batch_size)
        out = []
        with self._precision():
            for i in range(0, len(images), bs):
                batch_imgs = [to_pil(im) for im in images[i : i + bs]]
                out.append(self._score_batch(batch_imgs, list(prompts[i : i + bs])).float().cpu().reshape(-1))
        return torch.cat(out)

    __call__ = score

    def describe(self) -> dict:
        """What produced the numbers: name, weights, preprocessing, precision (goes into reports)."""
        return {"name": self.name, "scale": self.scale, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "tf32": self.tf32, **getattr(self, "info", {})}

    # -- helpers for subclasses --------------------------------------------------------------------
    def _score_batch(self, images, prompts) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def _precision(self):
        if self.device.type == "cuda" and self.tf32:
            old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        else:
            yield

    def _prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)


class FunctionScorer(Scorer):
    """Wrap ``fn(images: list[PIL.Image], prompts: list[str]) -> sequence of floats`` as a scorer."""

    def __init__(self, name: str, fn: Callable, batch_size: int = 64, scale: str = ""):
        super().__init__(device="cpu", batch_size=batch_size)
        self.name, self.fn, self.scale = name, fn, scale
        self.info = {"function": getattr(fn, "__qualname__", repr(fn))}

    def _score_batch(self, images, prompts):
        return torch.as_tensor(self.fn(images, prompts), dtype=torch.float32).reshape(-1)


# -- registry ---------------------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[Callable[..., Scorer], str]] = {}


def register_scorer(name: str, loader: Callable[..., Scorer], help: str = "") -> None:
    """``loader(path_or_id=None, device=None, dtype=torch.float32, **kwargs) -> Scorer``."""
    _REGISTRY[name.lower()] = (loader, help)


def available_scorers() -> dict[str, str]:
    return {k: v[1] for k, v in _REGISTRY.items()}


_ALIASES = {"hpsv2.1": "hpsv21", "hps": "hpsv21", "hpsv20": "hpsv2", "hpsv2.0": "hpsv2", "clipscore": "clip",
            "laionaesthetic": "aesthetic", "ir": "imagereward"}


def canonical_scorer_name(name: str) -> str:
    """``"HPS-v2.1"`` -> ``"hpsv21"`` (the name scores are stored under)."""
    if ":" in name:  # a user callable ``module:function`` (scoring/user.py): stored under the spec as written
        return name.strip()
    key = name.strip().lower().replace("-", "").replace("_", "")
    return _ALIASES.get(key, key)


def get_scorer(name: str, path_or_id: str | None = None, device=None, dtype=torch.float32, **kwargs) -> Scorer:
    """A scorer by registry name, weights from ``path_or_id`` (local path or hub id; None = official)."""
    key = canonical_scorer_name(name)
    if ":" in key:  # a user callable ``module:function`` (scoring/user.py)
        from .user import user_scorer

        return user_scorer(key, **kwargs)
    if key not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserFacingError(f"unknown scorer {name!r}{hint}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key][0](path_or_id=path_or_id, device=device, dtype=dtype, **kwargs)


def parse_scorer_list(spec: str | Sequence[str]) -> list[str]:
    """``"pickscore,hpsv21"`` -> ``["pickscore", "hpsv21"]`` (validated against the registry)."""
    names = [canonical_scorer_name(s) for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in _REGISTRY and ":" not in n]  # ':' = user callable, checked on load
    if unknown:
        raise UserFacingError(f"unknown scorer(s) {', '.join(unknown)}; available: {', '.join(sorted(_REGISTRY))}")
    if not names:
        raise UserFacingError("no scorer named; e.g. --scorers pickscore,hpsv21,clip,aesthetic,imagereward")
    return names


# -- weight resolution ------------------------------------------------------------------------------
def resolve_file(path_or_id: str, default_filename: str | None, what: str, flag_hint: str) -> str:
    """A local file for ``path_or_id``: an existing file, a directory holding ``default_filename``,
    ``owner/repo`` (+ ``default_filename``) or ``owner/repo/sub/file`` on the HF hub (cache or download).
    Raises ModelNotFoundError naming what was looked for and how to pass a local path."""
    if os.path.isfile(path_or_id):
        return path_or_id
    if os.path.isdir(path_or_id):
        cand = os.path.join(path_or_id, default_filename or "")
        if default_filename and os.path.isfile(cand):
            return cand
        raise ModelNotFoundError(f"{what}: no {default_filename} in directory {path_or_id}; {flag_hint}")
    parts = path_or_id.strip("/").split("/")
    if len(parts) >= 2 and not path_or_id.startswith((".", "/")):
        repo = "/".join(parts[:2])
        filename = "/".join(parts[2:]) or default_filename
        if filename:
            try:
                from huggingface_hub import hf_hub_download

                return hf_hub_download(repo, filename, local_files_only=local_only())  # offline: the cache only
            except Exception as exc:  # offline, missing repo/file, auth
                raise ModelNotFoundError(
                    f"{what}: {offline_note()}could not get {filename} from hub repo {repo} ({type(exc).__name__}). "
                    f"{fix_hint(repo, flag_hint, filename)}"
                ) from None
    raise ModelNotFoundError(f"{what}: {path_or_id} is not a file, a directory or a hub id; {flag_hint}")


def load_hf(cls, path_or_id: str, what: str, flag_hint: str, **kwargs):
    """``cls.from_pretrained`` with a short ModelNotFoundError when the weights are not reachable
    (offline: from the cache only, and at once when the repo is not cached)."""
    from .weights import invalid_weights, is_weights_file_error

    require_cached(path_or_id, what, flag_hint)
    kwargs.setdefault("local_files_only", local_only())
    try:
        return cls.from_pretrained(path_or_id, **kwargs)
    except Exception as exc:
        if is_weights_file_error(exc):  # transformers passes torch's text on, which suggests weights_only=False
            raise invalid_weights(_weights_files(path_or_id), what, exc) from None
        if not isinstance(exc, (OSError, ValueError)):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        fix = f"Fix: {flag_hint}" if os.path.exists(path_or_id) else fix_hint(path_or_id, flag_hint)
        raise ModelNotFoundError(f"{what}: {offline_note()}could not load {path_or_id!r} ({first}). {fix}") from None


def _weights_files(path_or_id: str) -> str:
    """The weights file(s) of a local model directory, for messages; else the path or hub id itself."""
    if not os.path.isdir(path_or_id):
        return path_or_id
    names = sorted(f for f in os.listdir(path_or_id) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
    return os.path.join(path_or_id, names[0]) if len(names) == 1 else f"{path_or_id} ({', '.join(names) or 'no weights'})"


def features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput (``pooler_output`` = projected features) from
    ``get_*_features``; transformers 4 returned the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output
