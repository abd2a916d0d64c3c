"""Resume safety: the current config against the one the checkpoint was trained with, before any state loads.

Every checkpoint stores its run's config (``checkpoint-*/config.yaml``). On resume each differing setting
falls in one of three classes:

* STATE: it changes the model or what the checkpoint's tensors mean (objective, LoRA layout, base model,
  precision, optimizer type, seed, dataset). Refused: the run would silently become another run, or fail
  deep inside ``load_state_dict`` (a different LoRA rank) with a long traceback.
* FREE: bookkeeping a user changes on purpose (train longer, log or save more often). Allowed, logged.
* everything else (learning rate, batch layout, ...): allowed only with ``allow_config_change``.

All differences are reported in one error, one line each.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import yaml

from t2ialign.errors import UserFacingError
from t2ialign.training.checkpoint import CONFIG_FILE

logger = logging.getLogger(__name__)

# a key, or a section prefix: every key under it
STATE = ("objective", "lora", "model", "mixed_precision", "optim.optimizer", "seed", "data.dataset", "data.split",
         "data.cache_dir")
FREE = ("max_steps", "log_every", "checkpoint_every", "keep_last_checkpoints", "progress_bar", "report_to",
        "data.num_workers", "validation")
# where the run is and how it was started, not what it trains
IGNORED = ("output_dir", "resume", "overwrite_output_dir", "allow_config_change", "push_to_hub", "hub_private")
LEAF_DICTS = ("objective.params",)  # compared as a whole: its keys are the objective's, not config fields


class ConfigChanged(UserFacingError):
    """A resume whose config differs from the checkpoint's in ways that are not allowed."""


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in LEAF_DICTS:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _matches(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def kind_of(key: str) -> str:
    return "state" if _matches(key, STATE) else "free" if _matches(key, FREE) else "other"


def config_diff(saved: dict, current: dict) -> dict:
    """``key -> [saved, current]`` for the settings both configs know that differ. A key only one side has
    is a field added or removed between versions: its default never made a difference, so it is skipped."""
    old, new = flatten(saved), flatten(current)
    ignored = IGNORED + (("lora",) if not old.get("lora.enabled") and not new.get("lora.enabled") else ())  # unused
    return {k: [old[k], new[k]] for k in sorted(old.keys() & new.keys())
            if not _matches(k, ignored) and old[k] != new[k]}


def normalised(config) -> dict:
    """The config as it reads back from YAML (tuples -> lists, ...), so that it compares with a saved one."""
    from t2ialign.config import to_dict

    return yaml.safe_load(yaml.safe_dump(to_dict(config)))


def saved_config(checkpoint: Path) -> Optional[dict]:
    """The checkpoint's config; a checkpoint from before configs were stored falls back to its run's config.yaml."""
    for path in (Path(checkpoint) / CONFIG_FILE, Path(checkpoint).parent / CONFIG_FILE):
        if path.is_file():
            if path.parent != Path(checkpoint):
                logger.info("%s stores no config (an older version wrote it): comparing with %s", checkpoint, path)
            return yaml.safe_load(path.read_text()) or {}
    return None


def check_resume_config(config, checkpoint: Path, quiet: bool = False) -> dict:
    """Raise ConfigChanged unless every difference is allowed; returns the differences (for the run history).
    ``quiet``: no log lines (a preflight; the real check logs)."""
    saved = saved_config(checkpoint)
    if saved is None:
        if not quiet:
            logger.warning("resume: %s has no config.yaml to compare with: resuming without checking the config", checkpoint)
        return {}
    diff = config_diff(saved, normalised(config))
    by_kind = {kind: {k: v for k, v in diff.items() if kind_of(k) == kind} for kind in ("state", "free", "other")}
    refused = {**by_kind["state"], **({} if config.allow_config_change else by_kind["other"])}
    if refused:
        raise ConfigChanged(_refusal(checkpoint, by_kind, config.allow_config_change))
    for key, (old, new) in ([] if quiet else diff.items()):
        logger.info("resume: %s changed since %s: %s -> %s", key, Path(checkpoint).name, _show(old), _show(new))
    return diff


def _refusal(checkpoint: Path, by_kind: dict, allow_other: bool) -> str:
    state, other = by_kind["state"], ({} if allow_other else by_kind["other"])
    if state:
        head = (f"resume: the config differs from the one {checkpoint} was trained with; settings that change the model or "
                "its state cannot change on resume: set them back, or start a new run (another output_dir, or --overwrite)")
    else:
        head = (f"resume: the config differs from the one {checkpoint} was trained with; set these back, or pass "
                "--allow-config-change (allow_config_change: true) to resume with them")
    lines = [f"  {k}: {_show(old)} -> {_show(new)} (changes the model or its state)" for k, (old, new) in state.items()]
    lines += [f"  {k}: {_show(old)} -> {_show(new)} (needs --allow-config-change)" for k, (old, new) in other.items()]
    return "\n".join([head + ":", *lines])


def _show(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()  # a scalar document ends with "..."
