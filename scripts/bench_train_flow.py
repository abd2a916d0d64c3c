"""Flow models (SD3.5-medium / -large, FLUX.1-dev) in scripts/bench_train.py ``--estimate-memory``.

The same method as the SDXL estimate (bench_train_memory.py): the models are built from their published configs
(flow_model_configs.json, next to this file) under ``FakeTensorMode`` -- real classes, real shapes and dtypes, no
weights -- exactly as ``t2ialign train`` sets them up (``build_policy_and_reference``, ``build_optimizer``), and one
optimizer step of the trainer's own ``flow_preference_step`` runs under PyTorch's ``MemTracker``.

``cache``: with a pre-encoded cache (``t2ialign cache``) the trainer loads neither the VAE nor the text encoders and
a batch holds latents and prompt embeddings. Without one, the text encoders (CLIP-L, CLIP-G, T5-XXL for SD3; CLIP-L,
T5-XXL for FLUX) and the VAE are resident in the autocast dtype and every micro-step encodes its images and captions
(the pipeline's own ``encode_prompt``, tokenised by t2ialign's offline CLIP / T5 tokenizers; empty captions, so the
T5 sequence is padded to ``max_sequence_length`` as for any caption).

``--tiny`` builds the helper-A tiny SD3 / FLUX components instead (``t2ialign.models.tiny_flow``), so that
``--real-tensors`` can check the fake run against real CPU tensors.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import torch
from torch.distributed._tools.mem_tracker import _MemRefType

from bench_train_memory import (
    BREAKDOWN_HEADER, breakdown_cells, estimate_title,
    ALLOCATOR_SLACK, GIB, StepMemTracker, _by_category, _create_optimizer_states, _offload_optimizer_class,
    _offloaded_tensors, _tracked_optimizer_step, cuda_autocast_policy, fake_tensors,
)
from bench_train_setup import make_train_config

CONFIGS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flow_model_configs.json")
FLOW_MODELS = ("sd35-medium", "sd35-large", "flux-dev")
# LoRA on the joint-attention projections of both streams: image (to_q/k/v, to_out.0) and text (add_*_proj,
# to_add_out); the target list of diffusers' SD3 LoRA script and of Flow-DPO's released SD3.5 code (docs/FLOW.md)
FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
DEFAULT_T5_TOKENS = {"sd3": 256, "flux": 512}  # the pipelines' max_sequence_length defaults
CLIP_TOKENS = 77
_PUBLISHED: dict = {}
_TINY: dict = {}


def published_configs() -> dict:
    if not _PUBLISHED:
        with open(CONFIGS_PATH) as handle:
            _PUBLISHED.update(json.load(handle))
    return _PUBLISHED


def _tokenizer_slot(encoder_slot: str) -> str:
    return encoder_slot.replace("text_encoder", "tokenizer")


def _tokenizers(family: str, t5_tokens: int) -> dict:
    """The offline CLIP / T5 tokenizers (real tokenizer classes) for each text-encoder slot."""
    from t2ialign.models.tiny import build_clip_tokenizer
    from t2ialign.models.tiny_flow import build_t5_tokenizer

    if family == "sd3":
        return {"tokenizer": build_clip_tokenizer(CLIP_TOKENS), "tokenizer_2": build_clip_tokenizer(CLIP_TOKENS, pad_token="!"),
                "tokenizer_3": build_t5_tokenizer(t5_tokens)}
    return {"tokenizer": build_clip_tokenizer(CLIP_TOKENS), "tokenizer_2": build_t5_tokenizer(t5_tokens)}


def _tiny_components(model: str) -> dict:
    """Helper A's tiny pipeline components of the model's family, built once (real weights, outside any fake mode)."""
    if model not in _TINY:
        from t2ialign.models.tiny_flow import tiny_flux_components, tiny_sd3_components

        _TINY[model] = (tiny_sd3_components if model.startswith("sd35") else tiny_flux_components)()
    return _TINY[model]


def model_spec(model: str, tiny: bool) -> dict:
    """Family, classes and configs of the model: published (flow_model_configs.json) or the tiny stand-in."""
    if not tiny:
        configs = published_configs()
        spec = dict(configs["models"][model])
        spec["vae"] = {**configs["vae_common"]["config"], **spec["vae"]}
        spec["text_encoders"] = [(slot, cls, configs["text_encoders"][key]["config"]) for slot, cls, key in spec["text_encoders"]]
        return spec
    parts = _tiny_components(model)
    encoders = sorted(k for k in parts if k.startswith("text_encoder"))
    return {
        "pretrained": f"tiny {model}", "family": "sd3" if model.startswith("sd35") else "flux",
        "transformer_class": type(parts["transformer"]).__name__, "transformer": dict(parts["transformer"].config),
        "text_encoders": [(slot, type(parts[slot]).__name__, parts[slot].config.to_dict()) for slot in encoders],
        "vae": dict(parts["vae"].config), "scheduler": dict(parts["scheduler"].config),
    }


def _text_encoder(class_name: str, config: dict):
    import transformers

    cls = getattr(transformers, class_name)
    return cls(cls.config_class(**{k: v for k, v in config.items() if not k.startswith("_")}))


def flow_scheduler(model: str, tiny: bool):
    """The training scheduler and its (timesteps, sigmas) table, built on real tensors: the scheduler reads its own
    sigmas back (``.item()``), which a fake tensor cannot do."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from t2ialign.flow_noising import training_table

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model_spec(model, tiny)["scheduler"])
    return scheduler, training_table(scheduler)


def build_flow_components(model: str, *, tiny: bool, load_text: bool, frozen_dtype, t5_tokens: int, device, scheduler):
    """``DiffusionComponents`` as ``load_training_components`` leaves them: an fp32 transformer (setup casts it),
    and, without a cache, the text encoders and the VAE in the autocast dtype."""
    import diffusers
    from diffusers import AutoencoderKL

    from t2ialign.models.loading import DiffusionComponents

    spec = model_spec(model, tiny)
    family = spec["family"]
    with torch.device(device):  # billions of parameters: created where they live (fake: nowhere)
        transformer = getattr(diffusers, spec["transformer_class"]).from_config(spec["transformer"])
        slots = {}
        vae = None
        if load_text:
            tokenizers = _tokenizers(family, t5_tokens)
            for slot, class_name, config in spec["text_encoders"]:
                slots[slot] = _text_encoder(class_name, config).to(frozen_dtype).eval()
                slots[_tokenizer_slot(slot)] = tokenizers[_tokenizer_slot(slot)]
            vae = AutoencoderKL.from_config(spec["vae"]).to(frozen_dtype).eval()
    encoders = [slots[slot] for slot, _, _ in spec["text_encoders"] if slot in slots]
    return DiffusionComponents(
        unet=None, vae=vae, text_encoders=encoders, tokenizers=[slots[_tokenizer_slot(s)] for s, _, _ in spec["text_encoders"] if s in slots],
        noise_scheduler=scheduler, is_sdxl=False,
        prediction_type="flow", source=spec["pretrained"], vae_config=dict(spec["vae"]), family=family,
        transformer=transformer, text_slots=slots,
    )


def make_flow_batch(components, pairs: int, latent_size: int, cached: bool, t5_tokens: int, device, seed: int) -> dict:
    """A micro-batch, winners first: the cache layout (latents, prompt embeddings) or images + captions."""
    n = 2 * pairs
    gen = torch.Generator("cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    config = components.transformer.config
    if cached:
        latent_channels = components.vae_config["latent_channels"]
        text_tokens = CLIP_TOKENS + t5_tokens if components.family == "sd3" else t5_tokens
        return {
            "latents": rand(n, latent_channels, latent_size, latent_size),
            "prompt_embeds": rand(n, text_tokens, config.joint_attention_dim),
            "pooled_prompt_embeds": rand(n, config.pooled_projection_dim),
            "captions": [""] * pairs,
        }
    side = latent_size * 2 ** (len(components.vae_config["block_out_channels"]) - 1)
    captions = [""] * pairs  # DCPO reads per-image captions (captions_w / captions_l)
    return {"pixel_values": rand(n, 3, side, side).clamp(-1, 1), "captions": captions, "captions_w": captions,
            "captions_l": captions}


def build_flow_row(args, model: str, objective: str, lora_rank: int, cached: bool, device, scheduler, table) -> dict:
    """Models, optimizer, batch and the step closures of one flow row, as ``t2ialign train`` builds them."""
    import dataclasses

    from t2ialign.flow_noising import FlowTimestepSampling
    from t2ialign.objectives import get_objective, objective_params
    from t2ialign.training.flow_step import FlowSettings, flow_preference_step
    from t2ialign.training.optim import build_optimizer
    from t2ialign.training.setup import build_policy_and_reference
    from t2ialign.training.step import StepModels

    config = make_train_config(args, objective, lora_rank)
    config.lora.target_modules = list(FLOW_LORA_TARGETS)
    spec = get_objective(objective)
    params = objective_params(spec, None, {})
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    family = model_spec(model, args.tiny)["family"]
    t5_tokens = args.max_sequence_length or DEFAULT_T5_TOKENS[family]
    components = build_flow_components(model, tiny=args.tiny, load_text=not cached, frozen_dtype=autocast_dtype or torch.float32,
                                       t5_tokens=t5_tokens, device=device, scheduler=scheduler)
    components._flow_training_table = table  # what flow_preference_step reads once per run
    plain = dataclasses.replace(config, compile=False, channels_last=False)
    policy, reference, trainable = build_policy_and_reference(plain, spec, components)
    optimizer = build_optimizer(trainable, config.optim, 1e-6)
    models = StepModels(policy, policy, reference, components, lora=config.lora.enabled)
    batch = make_flow_batch(components, args.micro_batch, args.latent_size, cached, t5_tokens, device, args.seed)
    settings = FlowSettings(FlowTimestepSampling(), guidance_scale=3.5, max_sequence_length=t5_tokens)

    def autocast():
        return contextlib.nullcontext() if autocast_dtype is None else torch.autocast(device.type, dtype=autocast_dtype)

    def forward():
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with autocast():
            return flow_preference_step(models, spec, params, batch, prompt_dropout=0.0, generator=generator, settings=settings)

    def backward(output):
        with autocast():
            output.loss.backward()

    frozen = [m for m in (components.vae, *components.text_encoders) if m is not None]
    return dict(config=config, spec=spec, policy=policy, reference=reference, models=models, trainable=trainable,
                optimizer=optimizer, batch=batch, autocast=autocast, forward=forward, backward=backward, frozen=frozen,
                family=family, t5_tokens=t5_tokens,
                reference_kind="frozen copy" if reference is not None else (
                    "adapters disabled" if lora_rank > 0 and spec.needs_reference else "none"))


def estimate_flow_row(args, model: str, objective: str, lora_rank: int, cached: bool) -> dict:
    """bench_train_memory.estimate_row for a flow model: one optimizer step on fake (or real) CPU tensors."""
    from diffusers.utils import logging as diffusers_logging

    start = time.perf_counter()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" at every .to(dtype)
    if args.tiny:
        _tiny_components(model)  # real weights, built before any fake mode
    offload_class = _offload_optimizer_class() if args.offload else None
    micro_steps = min(args.grad_accum, 2)
    device = torch.device("cpu")
    scheduler, table = flow_scheduler(model, args.tiny)
    with contextlib.ExitStack() as stack:
        if not args.real_tensors:
            mode = stack.enter_context(fake_tensors())
            table = tuple(mode.from_tensor(t) for t in table)
        if args.autocast_policy == "cuda":
            stack.enter_context(cuda_autocast_policy())
        built = build_flow_row(args, model, objective, lora_rank, cached, device, scheduler, table)
        _create_optimizer_states(built["trainable"], built["optimizer"])
        offloaded = _offloaded_tensors(built["optimizer"], offload_class) if args.offload else []
        tracker = StepMemTracker(host_categories=(_MemRefType.OPT,) if args.offload else ())
        batch = [value for value in built["batch"].values() if isinstance(value, torch.Tensor)]
        tracker.track_external(built["policy"], built["reference"], built["optimizer"], *built["frozen"], *batch)
        tracker.track_optimizer_tensors(*offloaded)
        with tracker:
            persistent = tracker.get_tracker_snapshot()
            before_step = _tracked_optimizer_step(built, micro_steps, tracker)
    peak = tracker.device_peak
    frozen_params = sum(p.numel() for m in built["frozen"] for p in m.parameters())
    return {
        "model": model, "family": built["family"], "cache": cached, "t5_tokens": built["t5_tokens"],
        "objective": objective, "mode": f"lora-r{lora_rank}" if lora_rank > 0 else "full", "lora_rank": lora_rank,
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "checkpointing": args.checkpointing,
        "checkpointing_mode": args.checkpointing_mode if args.checkpointing else None, "optimizer": args.optimizer,
        "offload": args.offload, "policy_dtype": args.policy_dtype if lora_rank == 0 else "fp32",
        "mixed_precision": args.mixed_precision, "reference": built["reference_kind"],
        "params_total": sum(p.numel() for p in built["policy"].parameters()),
        "params_trainable": sum(p.numel() for p in built["trainable"]),
        "params_frozen_text_vae": frozen_params,
        "tensors": "real" if args.real_tensors else "fake", "micro_steps_tracked": micro_steps,
        "peak_bytes": peak, "peak_gib": peak / GIB, "peak_gib_with_slack": peak * ALLOCATOR_SLACK / GIB,
        "peak_breakdown_bytes": _by_category(tracker.device_peak_snapshot, tracker.host_categories),
        "persistent_bytes": _by_category(persistent, tracker.host_categories),
        "before_optimizer_step_bytes": _by_category(before_step, tracker.host_categories),
        "activations_temps_peak_bytes": tracker.transient_peak, "host_peak_bytes": tracker.host_peak,
        "estimate_s": time.perf_counter() - start,
    }


def format_flow_estimate_table(report: dict) -> str:
    lines = [estimate_title(report, "flow models"),
             f"{'model':11s} {'cache':5s} {'objective':9s} {'mode':8s} {'B':>2s} " + BREAKDOWN_HEADER]
    for r in report["rows"]:
        lines.append(f"{r['model']:11s} {'yes' if r['cache'] else 'no':5s} {r['objective']:9s} {r['mode']:8s} "
                     f"{r['micro_batch']:2d} " + breakdown_cells(r))
    return "\n".join(lines)
