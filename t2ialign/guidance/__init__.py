"""RL guidance (RLG, docs/ALGORITHMS.md section 5): mix a base and an aligned model at sampling time.

    from t2ialign.guidance import make_rlg_pipeline
    pipe = make_rlg_pipeline(base_pipe, "runs/sdxl-dpo/final", w=1.5)   # full UNet / transformer or LoRA
    images = pipe(prompt=["a red bus"], guidance_scale=5.0).images

The same works for the rectified-flow pipelines (``StableDiffusion3Pipeline``, ``FluxPipeline``) with an
aligned transformer or a transformer LoRA. ``RLGUNet`` (SD / SDXL) and ``RLGTransformer`` (SD3 / FLUX) are the
denoiser wrappers, both ``RLGDenoiser``s; ``rlg_pipeline(SampleConfig)`` is what ``t2ialign sample --guide-with``
uses. This package knows nothing of evaluation: the sweep that samples and scores a list of scales
(``t2ialign sweep``) is ``t2ialign.evaluation.sweep.rlg_sweep``.
"""
from .denoiser import RLGDenoiser, RLGError
from .pipeline import RLG_ADAPTER_NAME, load_aligned_into, make_rlg_pipeline, rlg_pipeline
from .transformer import RLGTransformer
from .unet import RLGUNet

__all__ = ["RLGUNet", "RLGTransformer", "RLGDenoiser", "RLGError", "make_rlg_pipeline", "rlg_pipeline",
           "load_aligned_into", "RLG_ADAPTER_NAME"]


def __getattr__(name):
    if name == "rlg_sweep":  # moved; importing it from here would make guidance depend on evaluation again
        raise AttributeError("t2ialign.guidance.rlg_sweep moved: use `from t2ialign.evaluation.sweep import rlg_sweep`")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
