"""t2ialign: align text-to-image diffusion models with human preferences."""
import os

# One matmul path for every 3-D linear input, whatever requires grad. Without it ATen's `linear` on a
# non-contiguous 3-D input (e.g. a transformer block's `proj_in` after the NCHW -> tokens permute) folds
# the batch into one `mm` when the weight requires grad and runs a `bmm` when it does not. The two round
# differently in half precision, so the frozen reference (no grad) and the policy it was copied from
# would disagree at initialisation, and Diffusion-DPO's first loss would not be ln 2. ATen reads this
# variable once, at the first linear call of the process, so it is set on import.
os.environ.setdefault("TORCH_LINEAR_FLATTEN_3D", "1")

__version__ = "0.1.0"
