"""Image preference scorers (PickScore, HPS v2/v2.1, CLIP score, LAION aesthetic, ImageReward) and a registry.

    from t2ialign.scoring import get_scorer
    scorer = get_scorer("pickscore", device="cuda")          # or get_scorer("hpsv21", "/path/HPS_v2.1_compressed.pt")
    scores = scorer.score(images, prompts)                   # float32 CPU tensor (N,)

Preprocessing and formulas follow docs/SCORERS.md exactly (see ``preprocess`` and each scorer module).
"""
from .base import (FunctionScorer, canonical_scorer_name, Scorer, available_scorers, get_scorer, parse_scorer_list, register_scorer,
                   resolve_device, resolve_dtype)
from .clip_based import AestheticMLP, AestheticScorer, CLIPScoreScorer, PickScoreScorer
from .hps import HPSScorer
from .imagereward import ImageRewardScorer
from .mps import MPSCrossModel, MPSScorer
from .toy import toy_scorer
from .vqascore import CLIPFlanT5, VQAScoreScorer
from .hpsv3 import HPSv3Model, HPSv3Scorer
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, hps_preprocess, to_pil

__all__ = [
    "Scorer", "FunctionScorer", "canonical_scorer_name", "get_scorer", "register_scorer", "available_scorers", "parse_scorer_list",
    "resolve_device", "resolve_dtype", "PickScoreScorer", "CLIPScoreScorer", "AestheticScorer", "AestheticMLP",
    "HPSScorer", "ImageRewardScorer", "MPSScorer", "MPSCrossModel", "toy_scorer", "clip_preprocess", "hps_preprocess", "to_pil", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
]

__all__ += ["VQAScoreScorer", "CLIPFlanT5"]
__all__ += ["HPSv3Scorer", "HPSv3Model"]
