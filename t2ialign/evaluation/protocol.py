"""Evaluation protocols: one published result as data (``eval/protocols/*.yaml``), validated.

A protocol names the models compared, the prompt sets, the sampler, the scorers, the comparisons, and
the published numbers with their source; ``toy:`` overrides any of these so the same protocol runs
end to end on the offline toy world. ``t2ialign.evaluation.reproduce`` runs one; ``side_by_side``
lines our measurements up with the published ones.

    name: diffusion-dpo-sdxl
    paper: "Wallace et al. 2024, Diffusion Model Alignment Using Direct Preference Optimization (arXiv:2311.12908)"
    models:
      base: {pretrained: stabilityai/stable-diffusion-xl-base-1.0}
      dpo:  {pretrained: stabilityai/stable-diffusion-xl-base-1.0, aligned: mhdang/dpo-sdxl-text2image-v1}
    prompt_sets: [partiprompts, hpsv2]
    sampler: {num_inference_steps: 50, guidance_scale: 5.0, seed: 0}
    scorers: [pickscore, hpsv21, clip, aesthetic]
    comparisons: [[dpo, base]]
    implicit_reward: {model: dpo, reference: base, dataset: yuvalkirstain/pickapic_v2, split: test, limit: 500}
    published:
      - {metric: win_rate, a: dpo, b: base, prompts: partiprompts, scorer: human, value: 0.70, source: "Fig. 2"}
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from t2ialign.config.parsing import ConfigError

METRICS = ("win_rate", "mean", "implicit_accuracy", "rlg_mean")
SAMPLER_KEYS = {"num_inference_steps", "guidance_scale", "resolution", "num_images_per_prompt", "seed", "scheduler", "dtype",
                "batch_size", "limit"}
TOP_KEYS = {"name", "title", "paper", "models", "prompt_sets", "sampler", "scorers", "comparisons", "implicit_reward",
            "rlg_sweep", "published", "notes", "toy", "stand_ins"}


@dataclass
class ModelSpec:
    pretrained: str
    aligned: Optional[str] = None  # a full UNet / LoRA (hub id or directory) on top of ``pretrained``
    guide_with: Optional[str] = None  # RL guidance with this aligned model at ``rlg_scale``
    rlg_scale: float = 1.0


@dataclass
class Published:
    metric: str  # one of METRICS
    value: float
    source: str  # paper, table / figure, row
    scorer: str = ""  # a registered scorer, or e.g. "human" (compared with nothing we measure)
    prompts: str = ""
    a: str = ""  # win_rate: model A over B; mean / implicit_accuracy / rlg_mean: the model
    b: str = ""
    model: str = ""
    w: Optional[float] = None  # rlg_mean: the guidance scale

    def key(self) -> tuple:
        return (self.metric, self.prompts, self.scorer, self.a or self.model, self.b, self.w)


@dataclass
class Protocol:
    name: str
    paper: str
    models: dict
    prompt_sets: list
    scorers: list
    comparisons: list
    sampler: dict = field(default_factory=dict)
    title: str = ""
    implicit_reward: Optional[dict] = None
    rlg_sweep: Optional[dict] = None
    published: list = field(default_factory=list)
    notes: str = ""
    path: str = ""


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _unknown(where: str, keys, allowed) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise _fail(where, f"unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def _models(where: str, raw) -> dict:
    if not isinstance(raw, dict) or not raw:
        raise _fail(where, "models: a mapping of name -> {pretrained, aligned?, guide_with?, rlg_scale?}")
    out = {}
    for name, spec in raw.items():
        spec = {"pretrained": spec} if isinstance(spec, str) else spec
        _unknown(f"{where}: models.{name}", spec, ModelSpec.__dataclass_fields__)
        if "pretrained" not in spec:
            raise _fail(where, f"models.{name}: 'pretrained' is required (a hub id or a directory)")
        out[name] = ModelSpec(**spec)
    return out


def _comparisons(where: str, raw, models) -> list:
    pairs = [tuple(c) if isinstance(c, (list, tuple)) else tuple(str(c).split(":")) for c in raw or []]
    for pair in pairs:
        if len(pair) != 2 or any(m not in models for m in pair):
            raise _fail(where, f"comparison {list(pair)} must name two of the models ({', '.join(models)})")
    return pairs


def _published(where: str, raw) -> list:
    out = []
    for i, row in enumerate(raw or []):
        _unknown(f"{where}: published[{i}]", row, Published.__dataclass_fields__)
        if row.get("metric") not in METRICS:
            raise _fail(where, f"published[{i}].metric must be one of {', '.join(METRICS)}, got {row.get('metric')!r}")
        if "value" not in row or "source" not in row:
            raise _fail(where, f"published[{i}] needs 'value' and 'source' (paper, table, row)")
        out.append(Published(**row))
    return out


def _merge(base: dict, override: dict) -> dict:
    """``override``'s top-level keys replace ``base``'s; ``sampler`` merges key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key == "sampler" and isinstance(value, dict):
            merged["sampler"] = {**merged.get("sampler", {}), **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def protocol_from_dict(raw: dict, where: str = "protocol", toy: bool = False) -> Protocol:
    """Validate ``raw``; ``toy=True`` applies its ``toy:`` block first (keeping the published numbers)."""
    if not isinstance(raw, dict):
        raise _fail(where, "a protocol file holds a YAML mapping")
    _unknown(where, raw, TOP_KEYS)
    if toy:
        if "toy" not in raw:
            raise _fail(where, "no 'toy:' block: this protocol has no toy-world version")
        raw = _merge(raw, raw["toy"])
    elif "stand_ins" in raw:
        raise _fail(where, "'stand_ins' belongs in the toy: block")
    for key in ("name", "paper", "models", "prompt_sets", "scorers"):
        if not raw.get(key):
            raise _fail(where, f"'{key}' is required")
    sampler = dict(raw.get("sampler") or {})
    _unknown(f"{where}: sampler", sampler, SAMPLER_KEYS)
    models = _models(where, raw["models"])
    return Protocol(
        name=str(raw["name"]), paper=str(raw["paper"]), title=str(raw.get("title", "")), models=models,
        prompt_sets=list(raw["prompt_sets"]), scorers=list(raw["scorers"]),
        comparisons=_comparisons(where, raw.get("comparisons"), models), sampler=sampler,
        implicit_reward=_section(where, "implicit_reward", raw, models, ("model", "reference")),
        rlg_sweep=_section(where, "rlg_sweep", raw, models, ("base", "aligned")),
        published=_with_stand_ins(where, _published(where, raw.get("published")), raw.get("stand_ins")),
        notes=str(raw.get("notes", "")),
    )


def _with_stand_ins(where: str, published: list, stand_ins: Optional[dict]) -> list:
    """Toy runs: each published number is lined up with the toy measurement that stands in for it
    (``stand_ins: {prompts: {partiprompts: "toy:heldout"}, scorers: {pickscore: toy.vividness}}``)."""
    if not stand_ins:
        return published
    _unknown(f"{where}: stand_ins", stand_ins, ("prompts", "scorers"))
    prompts, scorers = stand_ins.get("prompts", {}), stand_ins.get("scorers", {})
    return [dataclasses.replace(p, prompts=prompts.get(p.prompts, p.prompts), scorer=scorers.get(p.scorer, p.scorer),
                                source=f"{p.source} [published: {p.scorer or p.metric} on {p.prompts or 'pairs'}]")
            for p in published]


def _section(where: str, key: str, raw: dict, models: dict, model_keys) -> Optional[dict]:
    section = raw.get(key)
    if section is None:
        return None
    for k in model_keys:
        if section.get(k) not in models:
            raise _fail(where, f"{key}.{k} must name one of the models ({', '.join(models)}), got {section.get(k)!r}")
    return dict(section)


def load_protocol(path: str | Path, toy: bool = False) -> Protocol:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no protocol file {path}; the shipped ones are in eval/protocols/")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    protocol = protocol_from_dict(raw, where=str(path), toy=toy)
    protocol.path = str(path)
    return protocol
