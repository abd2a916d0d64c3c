"""Which engine accelerate picks under the current launch: ``accelerate launch ... fsdp_probe.py OUT_JSON``.

Writes OUT_JSON.rank<R> with the distributed type, process count and backend (used by tests/test_fsdp_cpu.py)."""
import json
import sys


def main(out_json):
    from accelerate import Accelerator

    accelerator = Accelerator()
    state = accelerator.state
    record = {"distributed_type": str(state.distributed_type).split(".")[-1], "num_processes": state.num_processes,
              "backend": state.backend, "device": str(state.device)}
    with open(f"{out_json}.rank{state.process_index}", "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main(sys.argv[1])
