"""The accelerate training recipe (``train(config)``) and its parts: steps, checkpoints, export."""

__all__ = ["train", "TrainResult", "TrainingInterrupted"]


def __getattr__(name):
    # lazy: the run-directory and signal modules are imported without diffusers (launchers, tests, tools)
    if name in ("train", "TrainResult"):
        from t2ialign.training import loop

        return getattr(loop, name)
    if name == "TrainingInterrupted":
        from t2ialign.training.signals import TrainingInterrupted

        return TrainingInterrupted
    raise AttributeError(f"module 't2ialign.training' has no attribute {name!r}")
