"""Two-process FSDP on CPU (gloo): same losses as DDP, and a resumed run on the uninterrupted trajectory.

Status with accelerate 1.16 / torch 2.14 (issue 21): accelerate cannot run FSDP on CPU, so this test skips with
the reason below -- only when the probe launch shows it, so it runs as soon as an accelerate release allows it.
torch itself can: FSDP2 ``fully_shard`` trains on CPU with gloo. accelerate cannot, in three ways:

* ``AcceleratorState`` switches to ``DistributedType.FSDP`` only inside its branch for accelerator devices
  (accelerate/state.py: ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`` then
  ``self.distributed_type = DistributedType.FSDP``); ``MULTI_CPU`` is not in that list, so a CPU launch with an
  FSDP config trains as plain gloo DDP, without a warning;
* ``accelerate launch --cpu`` with an FSDP config takes the single-process ``simple_launcher``
  (commands/launch.py: ``elif args.use_fsdp and not args.cpu: multi_gpu_launcher``);
* without ``--cpu`` (``use_cpu: true`` in the config) it starts 2 processes but does not export
  ``ACCELERATE_USE_CPU``, finds no accelerator, and each process runs alone (``DistributedType.NO``).

So the probe launches ``accelerate launch --config_file tests/helpers/accelerate_fsdp_cpu.yaml`` with
``ACCELERATE_USE_CPU=1`` in the environment, the one launch that gives two cooperating processes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runs import ENV, REPO, assert_same_trajectory, metrics, ok, write_config

FSDP_CPU_CONFIG = REPO / "tests/helpers/accelerate_fsdp_cpu.yaml"
ACCELERATE_CPU_FSDP_REASON = (
    "accelerate {version} does not run FSDP on CPU: with an FSDP config and ACCELERATE_USE_CPU=1 it selects "
    "DistributedType.{got} (accelerate/state.py sets DistributedType.FSDP only for accelerator devices, and "
    "MULTI_CPU is not one of them), i.e. it would train gloo DDP and call it FSDP"
)
# sharded reduce-scatter sums the gradient in a different order than DDP's all-reduce (and AdamW then runs on
# flat shards), so fp32 losses can differ in the last bits: 1e-5 relative is ~100 fp32 ulps over 4 steps
DDP_TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script: str, *args, fsdp: bool, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    if kill:
        env["T2IALIGN_TEST_KILL"] = kill
    if fsdp:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU_CONFIG),
                    "--main_process_port", str(_free_port())]
    else:  # gloo DDP, as in the other two-process tests
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(_free_port())]
    return subprocess.run([*launcher, str(REPO / "tests/helpers" / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fsdp_on_cpu(tmp_path_factory):
    """Skip (with the cause) when accelerate would not actually shard on CPU; fail on any other outcome."""
    import accelerate

    out = tmp_path_factory.mktemp("fsdp_probe") / "probe.json"
    ok(_launch("fsdp_probe.py", out, fsdp=True))
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    got = {r["distributed_type"] for r in ranks}
    if got == {"MULTI_CPU"} and all(r["num_processes"] == 2 for r in ranks):
        pytest.skip(ACCELERATE_CPU_FSDP_REASON.format(version=accelerate.__version__, got="MULTI_CPU"))
    assert got == {"FSDP"} and all(r["num_processes"] == 2 for r in ranks), f"unexpected launch: {ranks}"


@pytest.mark.slow
def test_two_process_fsdp_on_cpu_matches_ddp_and_resumes_exactly(fsdp_on_cpu, tmp_path, tiny_sdxl_dir,
                                                                  pickapic_parquet):
    common = dict(train_batch_size=1, checkpoint_every=2)
    runs = {name: write_config(tmp_path / f"{name}.yaml", tiny_sdxl_dir, pickapic_parquet, tmp_path / name, **common)
            for name in ("ddp", "fsdp", "resumed")}
    ok(_launch("train_tiny.py", runs["ddp"], tmp_path / "ddp.json", fsdp=False))
    ok(_launch("train_tiny.py", runs["fsdp"], tmp_path / "fsdp.json", fsdp=True))
    ddp, fsdp = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [1, 2, 3, 4]
    for a, b in zip(ddp, fsdp):
        assert abs(a["loss"] - b["loss"]) <= DDP_TOLERANCE * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])

    # stop after the step-2 checkpoint (max_steps=2), then resume to 4: the uninterrupted FSDP trajectory exactly
    ok(_launch("train_tiny.py", runs["resumed"], tmp_path / "resumed.json", "--set", "max_steps=2", fsdp=True))
    ok(_launch("train_tiny.py", runs["resumed"], tmp_path / "resumed.json", "--set", "resume=latest", fsdp=True))
    assert_same_trajectory(fsdp, metrics(tmp_path / "resumed"))
