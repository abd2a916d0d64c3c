"""Train through the Python API and record, per process, a checksum of the trained UNet.

Used by the multi-process test: ``accelerate launch tests/helpers/train_tiny.py CONFIG OUT_JSON [--set k=v ...]``.
"""
import hashlib
import json
import sys

import torch


def parameter_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv):
    from accelerate import PartialState

    from t2ialign.config import load_train_config
    from t2ialign.training import train

    config_path, out_json, *rest = argv
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
    result = train(load_train_config(config_path, overrides))
    rank = PartialState().process_index
    with open(f"{out_json}.rank{rank}", "w") as handle:
        json.dump({"rank": rank, "digest": parameter_digest(result.model), "step": result.final_step}, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
