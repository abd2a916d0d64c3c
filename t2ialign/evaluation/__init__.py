"""Evaluation: prompt sets, win rates with bootstrap CIs, reports, the score/eval recipes and the RL-guidance sweep.

Sampling (``sampling.py``, which the sweep uses) is imported on demand only, so this package stays importable
without diffusers.
"""
from .folders import METADATA, SCORES, image_path, read_metadata, read_scores
from .implicit_reward import implicit_reward_accuracy, implicit_reward_margin, preference_accuracy
from .prompts import PromptRecord, load_prompt_file, load_prompt_set
from .recipes import evaluate, parse_model_dirs, score_folder, score_rows
from .report import build_report, tables_from_arrays, write_report
from .stats import (Interval, WinRate, bootstrap_mean, bootstrap_win_rate, category_breakdown, model_means, outcomes,
                    pairwise_win_rates, per_prompt, win_rate)
from .sweep import rlg_sweep

__all__ = [
    "METADATA", "SCORES", "image_path", "read_metadata", "read_scores", "implicit_reward_accuracy", "implicit_reward_margin",
    "preference_accuracy", "PromptRecord", "load_prompt_file", "load_prompt_set", "evaluate", "parse_model_dirs",
    "score_folder", "score_rows", "build_report", "tables_from_arrays", "write_report", "Interval", "WinRate", "bootstrap_mean",
    "bootstrap_win_rate", "category_breakdown", "model_means", "outcomes", "pairwise_win_rates", "per_prompt", "win_rate",
    "rlg_sweep",
]
