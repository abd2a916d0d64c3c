"""Shared fixtures: tiny real-class models and small real datasets built offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# xdist runs 2 workers on 2 cores; more threads per process (subprocesses inherit this) oversubscribe
# the cores, and OpenMP's spin-waiting then makes CPU kernels up to 50x slower
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the suite runs under xdist on 2 cores


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A standard diffusers SDXL pipeline directory with tiny random weights (32 px images)."""
    from t2ialign.models.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipeline")


@pytest.fixture(scope="session")
def pickapic_parquet(tmp_path_factory):
    """A small Pick-a-Pic v2-schema parquet (clean rows, with per-image captions)."""
    from t2ialign.data.synthetic import write_pickapic_parquet

    return write_pickapic_parquet(tmp_path_factory.mktemp("pickapic") / "train.parquet", num_rows=12, seed=0)
