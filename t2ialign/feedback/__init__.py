"""AI-feedback preference pairs: sample N images per prompt from any model the package samples from, score
them with a scorer or a z-normalised weighted ensemble, and write Pick-a-Pic-schema pairs that
``t2ialign train`` reads unchanged; or relabel an existing preference dataset with such scorers; or run
on-policy rounds of pairs -> train -> evaluate (``run_rounds``).

    from t2ialign.feedback import PairsConfig, build_pairs, relabel_dataset
    build_pairs(PairsConfig(sample=SampleConfig(pretrained=..., prompts="partiprompts", num_images_per_prompt=4),
                            scorers=["pickscore", "hpsv21"], weights=[0.7, 0.3], out_dir="pairs/run1"))

See docs/FEEDBACK.md.
"""
from .build import PairsConfig, build_pairs
from .ensemble import ensemble_scores, parse_weights, zscore
from .relabel import relabel_dataset
from .rounds import RoundsRecipe, load_recipe, run_rounds
from .strategies import STRATEGIES, Pair, make_pairs

__all__ = ["PairsConfig", "build_pairs", "ensemble_scores", "parse_weights", "zscore", "relabel_dataset", "STRATEGIES",
           "Pair", "make_pairs", "RoundsRecipe", "load_recipe", "run_rounds"]
