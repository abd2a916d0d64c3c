"""Load SDXL / SD1.x / SD2.x / SD3 / FLUX components from a hub id or a local diffusers pipeline directory.

Only the pieces a recipe needs are loaded (a cached-latent run needs neither VAE nor text encoders),
frozen parts are put in eval mode without gradients, and every "not found" — missing folder, missing
file, no network — becomes one ``ModelNotFoundError`` line that says how to fix it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from t2ialign.errors import ModelNotFoundError, UserFacingError
from t2ialign.hub import fix_hint, local_only, offline_note

try:  # in huggingface_hub 1.x+ EntryNotFoundError no longer derives from OSError
    from huggingface_hub.errors import EntryNotFoundError as _EntryNotFoundError
except ImportError:  # pragma: no cover
    _EntryNotFoundError = OSError

# Everything the hub / from_pretrained raise for "not there" or "not reachable".
# (OSError covers EnvironmentError, HTTP errors and offline mode; ValueError covers bad repo ids.)
_NOT_FOUND_ERRORS = (OSError, ValueError, _EntryNotFoundError)


# model families: UNet + DDPM-style forward process, or a rectified-flow transformer (docs/FLOW.md)
UNET_FAMILIES = ("sd", "sdxl")
FLOW_FAMILIES = ("sd3", "flux")
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}

@dataclass
class DiffusionComponents:
    unet: Any
    vae: Any
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    noise_scheduler: Any = None
    is_sdxl: bool = False
    prediction_type: str = "epsilon"
    source: str = ""
    # The VAE's config even when its weights were not loaded (cached-latent runs still need its shape).
    vae_config: Optional[dict] = None
    family: str = "sd"  # "sd" | "sdxl" | "sd3" | "flux"
    transformer: Any = None  # the denoiser of a flow family (unet is None then)
    # flow families: text encoders / tokenizers by their pipeline slot name (None where the pipeline has none,
    # e.g. SD3 without T5), as the pipeline's own encode_prompt reads them
    text_slots: dict = field(default_factory=dict)

    @property
    def is_flow(self) -> bool:
        return self.family in FLOW_FAMILIES

    @property
    def denoiser(self):
        """The trained network: the UNet, or the flow transformer."""
        return self.transformer if self.is_flow else self.unet

    @denoiser.setter
    def denoiser(self, module) -> None:
        if self.is_flow:
            self.transformer = module
        else:
            self.unet = module

    def _vae_config(self) -> Optional[dict]:
        return dict(self.vae.config) if self.vae is not None else self.vae_config

    @property
    def vae_scale_factor(self) -> int:
        config = self._vae_config()
        if config is not None:
            return 2 ** (len(config["block_out_channels"]) - 1)
        return 8  # every released SD / SDXL VAE downsamples by 8

    @property
    def latent_channels(self) -> int:
        config = self._vae_config()
        if config is not None:
            return config["latent_channels"]
        return self.denoiser.config.in_channels // (4 if self.family == "flux" else 1)

    @property
    def latent_shift_and_scale(self) -> tuple[float, float]:
        """``latents = (vae_latents - shift) * scale`` (SD3 / FLUX have a shift; SD / SDXL none)."""
        config = self._vae_config() or {}
        shift = config.get("shift_factor")
        return float(shift or 0.0), float(config.get("scaling_factor", 0.18215))


# ---------------------------------------------------------------- errors

def _first_sentence(error: BaseException, limit: int = 140) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    sentence = text.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _hint(what: str, where: str) -> str:
    if _looks_like_path(where):
        return "Fix: check the path; it should be a diffusers pipeline directory (model_index.json, unet/, vae/, ...)"
    key = "model.vae" if what == "VAE" else "model.pretrained"
    return fix_hint(where, f"set {key}=DIR (or pass DIR where the hub id was)")


def _not_found(what: str, where: str, subfolder: Optional[str], cause: BaseException) -> ModelNotFoundError:
    location = f"{where}" + (f" (subfolder '{subfolder}')" if subfolder else "")
    offline = "" if _looks_like_path(where) else offline_note()
    return ModelNotFoundError(
        f"Could not load the {what} from {location}: {offline}{_first_sentence(cause)}. {_hint(what, where)}."
    )


def _require_existing_dir(name: str, what: str) -> None:
    """Fail fast, with a short message, for a path that plainly is not there (no hub lookup)."""
    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ModelNotFoundError(f"{what} directory {name} does not exist. Fix: check the path.")


@contextlib.contextmanager
def _translate_not_found(what: str, where: str, subfolder: Optional[str]):
    try:
        yield
    except ModelNotFoundError:
        raise
    except _NOT_FOUND_ERRORS as error:
        raise _not_found(what, where, subfolder, error) from None


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1


# ---------------------------------------------------------------- pipeline layout

def _read_model_index(pretrained: str, *, revision=None, local_files_only=False) -> dict:
    local = Path(pretrained).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(
                f"{pretrained} is not a diffusers pipeline directory (no model_index.json). "
                "Fix: pass the directory that holds model_index.json, unet/, vae/, text_encoder/, ..."
            )
        return json.loads(index.read_text())
    _require_existing_dir(pretrained, "Model")
    from huggingface_hub import hf_hub_download

    with _translate_not_found("pipeline index (model_index.json)", pretrained, None):
        path = hf_hub_download(pretrained, "model_index.json", revision=revision, local_files_only=local_files_only)
    return json.loads(Path(path).read_text())


def _has_component(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and entry[0] is not None and entry[1] is not None


def pipeline_family(index: dict, where: str = "") -> str:
    """"sd", "sdxl", "sd3" or "flux" from a pipeline's model_index.json; other transformer pipelines are refused."""
    class_name = str(index.get("_class_name", ""))
    if class_name in FLOW_PIPELINES:
        return FLOW_PIPELINES[class_name]
    if _has_component(index, "transformer") and not _has_component(index, "unet"):
        raise UserFacingError(
            f"{where or 'the model'} is a {class_name or 'transformer pipeline'}; t2ialign trains UNet pipelines "
            f"(SD 1.x / 2.x / SDXL) and the flow pipelines {', '.join(FLOW_PIPELINES)}. Fix: give one of those"
        )
    return "sdxl" if _has_component(index, "text_encoder_2") or "XL" in class_name else "sd"


def _resolve(pretrained: str) -> str:
    local = Path(pretrained).expanduser()
    return str(local) if local.is_dir() else pretrained


def _freeze(module):
    module.requires_grad_(False)
    return module.eval()


def _transformers_class(index: dict, name: str, default: str):
    entry = index.get(name)
    class_name = entry[1] if _has_component(index, name) else default
    return getattr(transformers, class_name, getattr(transformers, default))


# ---------------------------------------------------------------- loaders

def _load_model(cls, what: str, pipeline_subfolder: str, pretrained: str, subfolder, *, hub_uses_subfolder: bool,
                dtype, device, revision, variant, local_files_only):
    """One diffusers model from a bare export (config.json at the root) or a pipeline's subfolder.

    ``subfolder=None`` picks: a directory with its own config.json is a bare export; any other
    directory is a pipeline. A hub id is read from the pipeline subfolder when ``hub_uses_subfolder``
    (UNets), and from its root otherwise (standalone VAEs such as an fp16-fix VAE).
    """
    pretrained = str(pretrained)
    _require_existing_dir(pretrained, what)
    location = _resolve(pretrained)
    if subfolder is None and (hub_uses_subfolder or Path(location).is_dir()):
        subfolder = None if (Path(location) / "config.json").is_file() else pipeline_subfolder
    with _translate_not_found(what, pretrained, subfolder):
        model = cls.from_pretrained(
            location, subfolder=subfolder, revision=revision, variant=variant, dtype=dtype,
            local_files_only=local_files_only,
        )
    return model.to(device)


def load_unet(
    pretrained_or_unet_dir: str,
    *,
    subfolder: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    revision=None,
    variant=None,
    local_files_only: bool = False,
) -> UNet2DConditionModel:
    """Load a UNet from a pipeline (``unet/`` subfolder) or from a bare UNet export directory."""
    return _load_model(
        UNet2DConditionModel, "UNet", "unet", pretrained_or_unet_dir, subfolder, hub_uses_subfolder=True,
        dtype=dtype, device=device, revision=revision, variant=variant, local_files_only=local_only(local_files_only),
    )


def load_vae(
    pretrained: str,
    *,
    subfolder: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    revision=None,
    variant=None,
    local_files_only: bool = False,
) -> AutoencoderKL:
    """A frozen AutoencoderKL: a standalone VAE (config.json at the root) or a pipeline's ``vae/``."""
    vae = _load_model(
        AutoencoderKL, "VAE", "vae", pretrained, subfolder, hub_uses_subfolder=False,
        dtype=dtype, device=device, revision=revision, variant=variant, local_files_only=local_only(local_files_only),
    )
    return _freeze(vae)


def _load_text_encoder(cls, location, subfolder, *, dtype, device, revision, variant, local_files_only):
    with _translate_not_found("text encoder", location, subfolder):
        encoder = cls.from_pretrained(
            location,
            subfolder=subfolder,
            revision=revision,
            variant=variant,
            dtype=dtype,  # transformers v5 name (was torch_dtype)
            local_files_only=local_files_only,
        )
    return _freeze(encoder.to(device))


def _load_tokenizer(location, subfolder, *, revision, local_files_only):
    with _translate_not_found("tokenizer", location, subfolder):
        return transformers.AutoTokenizer.from_pretrained(
            location, subfolder=subfolder, revision=revision, local_files_only=local_files_only
        )


def _text_stack(
    index: dict, location: str, *, dtype, device, revision, variant, local_files_only, load_encoders, load_tokenizers
):
    """Tokenizers and encoders, each if asked, in SDXL order (encoder 1 then encoder 2)."""
    encoders, tokenizers = [], []
    slots = [
        ("text_encoder", "tokenizer", "CLIPTextModel"),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
    ]
    for encoder_name, tokenizer_name, default_class in slots:
        if not _has_component(index, encoder_name):
            continue  # SD1.x has no encoder 2; the SDXL refiner has no encoder 1
        if load_tokenizers:
            tokenizers.append(
                _load_tokenizer(location, tokenizer_name, revision=revision, local_files_only=local_files_only)
            )
        if load_encoders:
            cls = _transformers_class(index, encoder_name, default_class)
            encoders.append(
                _load_text_encoder(
                    cls, location, encoder_name, dtype=dtype, device=device, revision=revision,
                    variant=variant, local_files_only=local_files_only,
                )
            )
    return encoders, tokenizers


def load_noise_scheduler(pretrained: str, *, revision=None, local_files_only: bool = False, family: str = "sd"):
    """The training-time forward process: DDPM with the pipeline's own betas and prediction type, or (flow
    families) the pipeline's FlowMatchEulerDiscreteScheduler, whose sigma table carries the model's shift."""
    if family in FLOW_FAMILIES:
        from diffusers import FlowMatchEulerDiscreteScheduler

        with _translate_not_found("scheduler config", pretrained, "scheduler"):
            return FlowMatchEulerDiscreteScheduler.from_pretrained(
                _resolve(pretrained), subfolder="scheduler", revision=revision, local_files_only=local_only(local_files_only))
    with _translate_not_found("scheduler config", pretrained, "scheduler"):
        return DDPMScheduler.from_pretrained(
            _resolve(pretrained), subfolder="scheduler", revision=revision, local_files_only=local_only(local_files_only)
        )


def load_components(
    pretrained: str,
    *,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    vae: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    load_unet: bool = True,
    load_vae: bool = True,
    load_text_encoders: bool = True,
    local_files_only: bool = False,
    load_tokenizers: Optional[bool] = None,
    frozen_dtype: Optional[torch.dtype] = None,
    frozen_denoiser_dtype: Optional[torch.dtype] = None,
) -> DiffusionComponents:
    """Load the parts of a SD / SDXL pipeline a recipe needs; ``vae`` overrides the pipeline's VAE.

    ``load_tokenizers`` defaults to ``load_text_encoders`` (a v5 CLIP tokenizer takes ~1 s to build).
    ``frozen_dtype`` (flow families): the text encoders and the VAE are read straight into it, so that the
    4.8 B-parameter T5 never sits on the device in fp32 (FLUX.1-dev's loading peak would exceed its training step's);
    ``frozen_denoiser_dtype`` (flow families, LoRA runs): the same for the frozen base transformer.
    """
    pretrained = str(pretrained)
    local_files_only = local_only(local_files_only)  # offline: the cache only, no retries
    if vae is not None:
        _require_existing_dir(str(vae), "VAE")  # fail before loading anything heavy
    index = _read_model_index(pretrained, revision=revision, local_files_only=local_files_only)
    location = _resolve(pretrained)
    family = pipeline_family(index, pretrained)
    hub = dict(revision=revision, local_files_only=local_files_only)
    if family in FLOW_FAMILIES:
        from t2ialign.models.flow_loading import load_flow_components

        return load_flow_components(
            index, location, pretrained, family, vae=vae, dtype=dtype, device=device, variant=variant,
            load_denoiser=load_unet, load_vae=load_vae, load_text_encoders=load_text_encoders,
            load_tokenizers=load_text_encoders if load_tokenizers is None else load_tokenizers,
            frozen_dtype=frozen_dtype or dtype, denoiser_dtype=frozen_denoiser_dtype or dtype, **hub)
    is_sdxl = family == "sdxl"

    noise_scheduler = load_noise_scheduler(pretrained, **hub)
    unet = (
        _load_unet_from_pipeline(location, pretrained, dtype=dtype, device=device, variant=variant, **hub)
        if load_unet
        else None
    )
    vae_model = (
        _load_vae_for(location, vae, dtype=dtype, device=device, variant=variant, **hub) if load_vae else None
    )
    vae_config = dict(vae_model.config) if vae_model is not None else _vae_config_or_none(location, vae, **hub)
    encoders, tokenizers = _text_stack(
        index, location, dtype=dtype, device=device, variant=variant, load_encoders=load_text_encoders,
        load_tokenizers=load_text_encoders if load_tokenizers is None else load_tokenizers, **hub
    )
    return DiffusionComponents(
        unet=unet,
        vae=vae_model,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=noise_scheduler,
        is_sdxl=is_sdxl,
        prediction_type=noise_scheduler.config.prediction_type,
        source=pretrained,
        vae_config=vae_config,
        family=family,
    )


def _vae_config_or_none(location, override, *, revision, local_files_only) -> Optional[dict]:
    """The VAE's config.json alone (no weights); None when it cannot be read."""
    source, subfolder = (location, "vae") if override is None else (_resolve(override), None)
    if override is not None and Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        subfolder = "vae"
    try:
        return dict(AutoencoderKL.load_config(source, subfolder=subfolder, local_files_only=local_files_only,
                                              revision=None if override else revision))
    except _NOT_FOUND_ERRORS:
        return None


def _load_unet_from_pipeline(location, pretrained, *, dtype, device, variant, revision, local_files_only):
    with _translate_not_found("UNet", pretrained, "unet"):
        unet = UNet2DConditionModel.from_pretrained(
            location, subfolder="unet", revision=revision, variant=variant, dtype=dtype,
            local_files_only=local_files_only,
        )
    return unet.to(device)


def _load_vae_for(location, override, *, dtype, device, variant, revision, local_files_only):
    if override is None:
        return load_vae(location, subfolder="vae", dtype=dtype, device=device, revision=revision,
                        variant=variant, local_files_only=local_files_only)
    # An override VAE comes from another repo: the pipeline's revision / variant do not apply to it.
    return load_vae(override, dtype=dtype, device=device, local_files_only=local_files_only)


# ---------------------------------------------------------------- attention

ATTENTION_BACKENDS = ("sdpa", "xformers")


def set_attention_backend(unet, backend: str = "sdpa") -> None:
    """Route the UNet's attention through PyTorch SDPA (default) or xformers' memory-efficient kernels."""
    unet = getattr(unet, "module", unet)
    if backend == "sdpa" and not isinstance(unet, UNet2DConditionModel):
        return  # SD3 / FLUX transformers: their default (joint) attention processors already call SDPA
    if backend == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    elif backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise UserFacingError(
                "model.attention is 'xformers' but xformers is not installed. "
                "Fix: `pip install xformers` (matching your torch build) or set model.attention=sdpa."
            )
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise UserFacingError(f"Unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}.")
