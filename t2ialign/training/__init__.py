"""The accelerate training recipe (``train(config)``) and its parts: steps, checkpoints, export."""
from t2ialign.training.loop import TrainResult, train

__all__ = ["train", "TrainResult"]
