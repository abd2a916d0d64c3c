"""``TrainConfig`` (``t2ialign train`` / ``cache``) and its validation, done before any model is loaded."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from t2ialign.config.parsing import ConfigError, _check_choice, _get, _suggest, apply_overrides, from_dict, load_yaml


@dataclass
class ModelConfig:
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"  # hub id or local diffusers directory
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" to read *.fp16.safetensors
    vae: Optional[str] = None  # override, e.g. "madebyollin/sdxl-vae-fp16-fix"
    reference_dtype: str = "bf16"  # precision of the frozen reference UNet (full fine-tune)
    # precision of the trained UNet's weights on the GPU (full fine-tune). "bf16" halves weights and gradients and
    # drops autocast's per-forward weight casts; the fp32 master weights live in host RAM (needs optim.offload)
    policy_dtype: str = "fp32"
    attention: str = "sdpa"  # "sdpa" (PyTorch fused kernels) or "xformers"
    local_files_only: bool = False


@dataclass
class DataConfig:
    dataset: str = "yuvalkirstain/pickapic_v2"  # hub id, or a local parquet/arrow file or directory
    split: str = "train"
    streaming: bool = False
    caption_column: str = "caption"
    image_columns: list = field(default_factory=lambda: ["jpg_0", "jpg_1"])
    label_columns: list = field(default_factory=lambda: ["label_0", "label_1"])
    # per-image captions (DCPO); caption_columns[i] describes image_columns[i]
    image_caption_columns: list = field(default_factory=lambda: ["caption_0", "caption_1"])
    resolution: int = 1024
    random_crop: bool = False
    random_flip: bool = True
    # SDXL micro-conditioning of training images (t2ialign.models.text_encoding.sdxl_time_ids): "measured" =
    # [orig_h, orig_w, crop_top, crop_left, R, R] (diffusers scripts, MaPO); "fixed" = [R, R, 0, 0, R, R] for
    # every image (the released Diffusion-DPO / DCPO / DDIM-InPO SDXL trainers). A cache serves both.
    time_ids: str = "measured"
    drop_ties: bool = True
    max_rows: Optional[int] = None
    min_image_size: int = 0  # shortest side below this -> bad row; below 8 px always (badrows.MIN_IMAGE_SIDE, the VAE factor)
    model_names: Optional[list] = None  # keep rows whose model_0 and model_1 are in this list
    drop_duplicates: bool = True
    shuffle_seed: int = 0
    strict: bool = False  # stop at the first bad row instead of skipping and counting
    prompt_dropout: float = 0.0  # probability of replacing a pair's caption by "" (recipe: 0.2)
    num_workers: int = 0
    cache_dir: Optional[str] = None  # pre-encoded latents/text (``t2ialign cache``); then no VAE/text encoders
    # ``t2ialign cache`` (t2ialign.data.cache): what is stored per pair and how the build is chunked
    cache_variants: int = 1  # augmentation draws stored per pair: variant v = epoch v's crop/flip; epoch e reads e % N
    cache_dtype: str = "fp16"  # storage of latents and text embeddings: fp32 | fp16 | bf16 (fp32 = bit-exact)
    cache_latent_std: bool = True  # keep the VAE posterior std: training samples latents as the image path does
    cache_shard_size: int = 256  # pairs per shard file (the unit of resume and of the multi-process split)
    cache_batch_size: int = 8  # pairs per VAE batch while caching (x2 images x cache_variants)


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 8
    alpha: Optional[float] = None  # defaults to rank
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ObjectiveConfig:
    name: str = "dpo"  # dpo | mapo | dcpo | inpo | sft (see t2ialign.objectives.OBJECTIVES)
    beta: Optional[float] = None  # None: the objective's published default
    params: dict = field(default_factory=dict)  # extra keyword arguments (e.g. snr_value for MaPO)


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adamw8bit | adafactor
    learning_rate: float = 1e-8
    scale_lr: bool = False  # multiply by total pairs per optimizer step (the Diffusion-DPO convention)
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"  # constant | constant_with_warmup | linear | cosine
    warmup_steps: int = 0
    # optimizer offload (t2ialign.training.offload): fp32 master weights and optimizer states live in host RAM
    # and the update runs on the CPU; the GPU keeps weights and gradients only (AdamW states: -20.5 GB on SDXL)
    offload: bool = False


@dataclass
class AlarmConfig:
    """Over-optimisation alarm (t2ialign.training.validation): the training objective improves over the last
    ``window`` validations while the held-out score ``scorer`` has fallen more than ``threshold`` below its best."""

    enabled: bool = True
    scorer: Optional[str] = None  # a validation key without "val/" (a scorer name or "implicit_acc"); None: the first scorer
    train_metric: str = "loss"  # a metrics.jsonl training key; "loss" improves by falling, any other by rising
    window: int = 3  # validations the training metric is compared over
    min_improvement: float = 0.0  # the training metric must improve by more than this over the window
    threshold: float = 0.0  # the score must fall more than this below its best (absolute, in the scorer's units)
    stop: bool = False  # stop training at the alarm (checkpoint + export, as at the end of a run)


@dataclass
class ValidationConfig:
    """Sampling fixed prompts with fixed seeds from the current policy every ``every`` optimizer steps (and from the
    base at step 0), scored by ``scorers``; written to ``output_dir/validation/step-XXXXXXXX/`` and the trackers."""

    every: int = 0  # optimizer steps; 0 = no validation
    prompts: Optional[object] = None  # a list of prompts, or a prompt-set name / file (t2ialign.evaluation.prompts)
    limit: Optional[int] = None  # first N prompts of a prompt set
    num_images: int = 1  # images per prompt
    seed: int = 0  # image k of prompt i starts from seed + i * num_images + k (as `t2ialign sample`)
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    resolution: Optional[int] = None  # default: the model's native size
    batch_size: int = 8
    scorers: list = field(default_factory=list)  # scorer names (t2ialign.scoring), e.g. [pickscore] or [toy.fidelity]
    log_images: int = 16  # images sent to tensorboard / wandb per validation (all are written to disk)
    max_time_share: float = 0.2  # warn (once) when validation takes more than this share of the run's wall time
    # implicit-reward accuracy of the live policy on a held-out split of data.dataset (needs a reference model)
    preference_split: Optional[str] = None
    max_pairs: int = 64
    alarm: AlarmConfig = field(default_factory=AlarmConfig)


@dataclass
class FlowConfig:
    """Rectified-flow models (SD3 / SD3.5, FLUX; docs/FLOW.md). Ignored for UNet models. Defaults: diffusers' SD3 /
    FLUX training scripts (t2ialign.flow_noising)."""

    weighting_scheme: str = "logit_normal"  # timestep density: logit_normal | mode | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"  # per-sample weight of the velocity error: none | sigma_sqrt | cosmap
    guidance_scale: float = 3.5  # FLUX.1-dev's distilled guidance input during training (models with guidance_embeds)
    max_sequence_length: Optional[int] = None  # T5 tokens; null = the pipeline default (SD3: 256, FLUX: 512)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = "runs/dpo"
    seed: int = 0
    max_steps: int = 2000  # optimizer steps
    train_batch_size: int = 1  # preference pairs per micro-batch per process
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    # "full": recompute each checkpointed block's forward in the backward (least memory); "selective": keep the
    # outputs of matmuls, convolutions and attention, recompute only the cheap elementwise/normalisation ops
    gradient_checkpointing_mode: str = "full"
    checkpoint_every: int = 500  # optimizer steps; 0 disables periodic checkpoints
    keep_last_checkpoints: int = 2
    resume: Optional[str] = None  # "latest" or a checkpoint directory
    # a new run (no resume) into an output_dir that holds another run is refused unless this is true; then the old
    # run's checkpoints, final/, metrics.jsonl, config.yaml and logs/ are deleted first (t2ialign.training.run_dir)
    overwrite_output_dir: bool = False
    # resume with settings that differ from the checkpoint's config beyond the always-allowed ones (max_steps,
    # log_every, ...); settings that change the model or its state are refused even then (training/config_check.py)
    allow_config_change: bool = False
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    allow_tf32: bool = True
    progress_bar: bool = True
    # speed levers (t2ialign.models.speed): torch.compile of the UNet(s), with a persistent compile cache
    # (default $TORCHINDUCTOR_CACHE_DIR or ~/.cache/t2ialign/torchinductor), and channels-last convolutions
    compile: bool = False
    compile_cache_dir: Optional[str] = None
    channels_last: bool = False
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    # USER/NAME: after training, write output_dir/share (export, config, model card) and upload it, as
    # `t2ialign push` does; a failed upload (offline, auth) is logged with the `hf upload` command to retry
    push_to_hub: Optional[str] = None
    hub_private: bool = False


CHOICES: dict[str, tuple] = {
    "model.reference_dtype": ("fp32", "fp16", "bf16"),
    "model.attention": ("sdpa", "xformers"),
    "data.time_ids": ("measured", "fixed"),  # = t2ialign.models.text_encoding.TIME_IDS_MODES
    "model.policy_dtype": ("fp32", "bf16"),
    "optim.optimizer": ("adamw", "adamw8bit", "adafactor"),
    "optim.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
    "gradient_checkpointing_mode": ("full", "selective"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "report_to": ("tensorboard", "wandb", "none"),
    "flow.weighting_scheme": ("logit_normal", "mode", "uniform"),  # = t2ialign.flow_noising.WEIGHTING_SCHEMES
    "flow.loss_weighting": ("none", "sigma_sqrt", "cosmap"),  # = t2ialign.flow_noising.LOSS_WEIGHTINGS
}


POSITIVE = ("max_steps", "train_batch_size", "gradient_accumulation_steps", "data.resolution", "lora.rank",
            "optim.learning_rate", "log_every", "optim.max_grad_norm", "optim.adam_epsilon")
NON_NEGATIVE = ("checkpoint_every", "optim.warmup_steps", "optim.weight_decay", "data.num_workers", "data.min_image_size",
                "lora.dropout")
STRING_LISTS = ("data.image_columns", "data.label_columns", "data.image_caption_columns", "lora.target_modules",
                "data.model_names")


def _check_bf16_policy(config: TrainConfig) -> None:
    if config.lora.enabled:
        raise ConfigError("model.policy_dtype: bf16 is for full fine-tunes; with LoRA the base is already frozen in half "
                          "precision and the adapters stay fp32. Remove model.policy_dtype or set lora.enabled=false")
    if not config.optim.offload:
        raise ConfigError("model.policy_dtype: bf16 weights need fp32 master weights for the update, which t2ialign keeps "
                          "in host RAM; set optim.offload=true (or keep model.policy_dtype=fp32 with bf16 autocast)")
    if config.mixed_precision != "bf16":
        raise ConfigError(f"model.policy_dtype: bf16 needs mixed_precision=bf16, got {config.mixed_precision!r}")


def validate_train_config(config: TrainConfig) -> TrainConfig:
    """Everything that can be checked without touching a model file; one ConfigError naming the key."""
    from t2ialign.objectives import get_objective, objective_params  # objectives are torch-only and cheap to import

    for dotted, allowed in CHOICES.items():
        _check_choice(config, dotted, allowed)
    if config.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("report_to: wandb is not installed; run `pip install 't2ialign[wandb]'` (or set report_to=tensorboard)")
    if config.push_to_hub is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", config.push_to_hub):
        raise ConfigError(f"push_to_hub: {config.push_to_hub!r} is not a hub repo id; give USER/NAME (or ORG/NAME)")
    try:
        spec = get_objective(config.objective.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for section in dataclasses.fields(config):  # every float anywhere must be a real number (no nan / inf)
        value = getattr(config, section.name)
        inner = [(f"{section.name}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)] \
            if dataclasses.is_dataclass(value) else [(section.name, value)]
        for key, item in inner:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}: must be a finite number, got {item}")
    for key in POSITIVE:
        if _get(config, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(config, key)}")
    for key in NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(config, key)}")
    for key in STRING_LISTS:
        value = _get(config, key)
        if value is not None and not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: must be a list of non-empty strings (column / module names), got {value!r}")
    for key in ("model.pretrained", "output_dir", "data.dataset"):
        if not str(_get(config, key)).strip():
            raise ConfigError(f"{key}: must not be empty")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed: must be in [0, 2**32), got {config.seed}")
    if config.data.resolution % 8:
        raise ConfigError(f"data.resolution: must be a multiple of 8 (the VAE downsamples by 8), got {config.data.resolution}")
    if not 0.0 <= config.data.prompt_dropout < 1.0:
        raise ConfigError(f"data.prompt_dropout: must be in [0, 1), got {config.data.prompt_dropout}")
    if not 0.0 <= config.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {config.lora.dropout}")
    if config.lora.alpha is not None and config.lora.alpha <= 0:
        raise ConfigError(f"lora.alpha: must be positive (or null for alpha = rank), got {config.lora.alpha}")
    if config.lora.enabled and not config.lora.target_modules:
        raise ConfigError("lora.target_modules: must name at least one module when lora.enabled is true (e.g. to_q, to_k, to_v, to_out.0)")
    for key in ("optim.adam_beta1", "optim.adam_beta2"):
        if not 0.0 <= _get(config, key) < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {_get(config, key)}")
    if config.data.max_rows is not None and config.data.max_rows <= 0:
        raise ConfigError(f"data.max_rows: must be positive (or null for all rows), got {config.data.max_rows}")
    if config.optim.offload and config.optim.optimizer == "adamw8bit":
        raise ConfigError(
            "optim.offload: bitsandbytes' 8-bit AdamW runs on the GPU only; use optim.optimizer=adamw (or adafactor) "
            "with optim.offload=true, or adamw8bit without offload"
        )
    if config.model.policy_dtype == "bf16":
        _check_bf16_policy(config)
    if config.overwrite_output_dir and config.resume:
        raise ConfigError(f"overwrite_output_dir: true deletes the run that resume={config.resume!r} would continue; "
                          "use one of them (--overwrite or --set resume=...)")
    if config.keep_last_checkpoints < 1:
        raise ConfigError(f"keep_last_checkpoints: must be at least 1, got {config.keep_last_checkpoints}")
    _check_validation(config.validation)
    _check_flow(config.flow)
    if config.max_bad_steps < 1:
        raise ConfigError(f"max_bad_steps: must be at least 1, got {config.max_bad_steps}")
    if len(config.data.image_columns) != 2 or len(config.data.label_columns) != 2:
        raise ConfigError("data.image_columns and data.label_columns: need exactly two entries each (image 0, image 1)")
    if not spec.needs_reference and "reference_dtype" in getattr(config, "_explicit_keys", set()):
        raise ConfigError(
            f"model.reference_dtype: objective '{spec.name}' is reference-free and loads no reference model; remove the key "
            f"(objectives with a reference model: {', '.join(sorted(n for n, s in _objectives().items() if s.needs_reference))})"
        )
    unknown = set(config.objective.params) - set(spec.param_names)
    if unknown:
        name = sorted(unknown, key=str)[0]
        raise ConfigError(
            f"objective.params.{name}: not a parameter of '{spec.name}'{_suggest(str(name), spec.param_names)}; "
            f"allowed: {', '.join(spec.param_names) or '(none)'}"
        )
    for name, value in {**config.objective.params, **({"beta": config.objective.beta} if config.objective.beta is not None else {})}.items():
        default = spec.defaults.get(name)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            key = "objective.beta" if name == "beta" and config.objective.beta is not None else f"objective.params.{name}"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number for '{spec.name}', got {value!r}")
            if name == "beta" and value <= 0:
                raise ConfigError(f"{key}: must be positive, got {value}")
        if name == "inversion_first_timestep":
            from t2ialign.inversion import FIRST_TIMESTEP_CHOICES

            if value not in FIRST_TIMESTEP_CHOICES:
                raise ConfigError(f"objective.params.{name}: expected one of {', '.join(FIRST_TIMESTEP_CHOICES)} "
                                  f"('authors' feeds the UNet -99 at the first inverse step, as the authors' code), got {value!r}")
    try:
        objective_params(spec, config.objective.beta, config.objective.params)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return config


def _check_flow(flow: FlowConfig) -> None:
    if flow.logit_std <= 0:
        raise ConfigError(f"flow.logit_std: must be positive, got {flow.logit_std}")
    if flow.guidance_scale < 0:
        raise ConfigError(f"flow.guidance_scale: must be >= 0, got {flow.guidance_scale}")
    if flow.max_sequence_length is not None and not 0 < flow.max_sequence_length <= 512:
        raise ConfigError(f"flow.max_sequence_length: T5 tokens in (0, 512] (or null for the pipeline default), "
                          f"got {flow.max_sequence_length}")


def _check_validation(val: ValidationConfig) -> None:
    if val.every < 0:
        raise ConfigError(f"validation.every: must be >= 0 (0 = no validation), got {val.every}")
    for key in ("num_images", "num_inference_steps", "batch_size", "max_pairs", "alarm.window"):
        if _get(val, key) <= 0:
            raise ConfigError(f"validation.{key}: must be positive, got {_get(val, key)}")
    if val.log_images < 0:
        raise ConfigError(f"validation.log_images: must be >= 0, got {val.log_images}")
    if not 0 < val.max_time_share <= 1:
        raise ConfigError(f"validation.max_time_share: a share of the run's time in (0, 1], got {val.max_time_share}")
    if val.limit is not None and val.limit <= 0:
        raise ConfigError(f"validation.limit: must be positive (or null for all prompts), got {val.limit}")
    if val.resolution is not None and (val.resolution <= 0 or val.resolution % 8):
        raise ConfigError(f"validation.resolution: must be a positive multiple of 8, got {val.resolution}")
    prompts = val.prompts
    if not (prompts is None or (isinstance(prompts, str) and prompts.strip())
            or (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts))):
        raise ConfigError(f"validation.prompts: a list of prompts or a prompt-set name / file, got {prompts!r}")
    if not all(isinstance(s, str) and s for s in val.scorers):
        raise ConfigError(f"validation.scorers: must be a list of scorer names, got {val.scorers!r}")
    if val.every and prompts is None and val.scorers:
        raise ConfigError("validation.scorers: the scorers score sampled images; set validation.prompts too")
    if val.every and prompts is None and not val.preference_split:
        raise ConfigError("validation.every: nothing to validate; set validation.prompts (and scorers) and/or "
                          "validation.preference_split")
    for key in ("alarm.threshold", "alarm.min_improvement"):
        value = _get(val, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"validation.{key}: must be a finite number >= 0, got {value}")
    if val.every and val.alarm.enabled:
        names = [*val.scorers, *(["implicit_acc"] if val.preference_split else [])]
        scorer = val.alarm.scorer
        if scorer is not None and scorer.removeprefix("val/") not in names:
            raise ConfigError(f"validation.alarm.scorer: {scorer!r} is not validated; choose one of: {', '.join(names) or '(none)'}")


def _objectives() -> dict:
    from t2ialign.objectives import OBJECTIVES

    return OBJECTIVES


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None) -> TrainConfig:
    """YAML file (or dict) + overrides -> validated TrainConfig."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a mapping of keys to values, got {type(data).__name__}")
    raw = dict(data or {})
    if path is not None:
        raw = load_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    config = from_dict(TrainConfig, raw)
    # remembered so validation can reject options the user set that the objective cannot use
    config._explicit_keys = set(raw.get("model") or {})
    return validate_train_config(config)
