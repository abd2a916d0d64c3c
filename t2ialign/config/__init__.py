"""Typed run configuration: YAML files, ``--set key=value`` overrides and validation.

Every recipe (train, cache, sample, ...) takes one of these dataclasses, so the CLI, the tests and a
notebook all drive the same code. Validation happens here, before any model is loaded, and every
failure names the offending key and the allowed values.
"""
from t2ialign.config.parsing import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from t2ialign.config.sample import COMPILE_MODES, SampleConfig, load_sample_config
from t2ialign.config.train import (
    CHOICES,
    DataConfig,
    LoRAConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    load_train_config,
    validate_train_config,
)

__all__ = [
    "CHOICES", "COMPILE_MODES", "ConfigError", "DataConfig", "LoRAConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig",
    "SampleConfig", "TrainConfig", "apply_overrides", "from_dict", "load_sample_config", "load_train_config", "load_yaml",
    "to_dict", "validate_train_config",
]
