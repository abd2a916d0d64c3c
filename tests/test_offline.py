"""Without network: the hub is detected unreachable once, hub loads fail at once with one line naming `hf download`,
and local models still load. The offline variables CI sets are removed here, so the detection itself is tested;
HF_ENDPOINT points at a closed local port, so "unreachable" is deterministic."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# hub retries took 56 s for one scorer before the probe existed; imports alone take ~5-10 s on 2 busy cores
NO_RETRIES_S = 30


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_network_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env.update(HF_HOME=str(tmp_path / "empty-hf-home"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", OMP_NUM_THREADS="1")
    return env


def _cli(args, env, cwd):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "t2ialign", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    return done, time.perf_counter() - started


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def _sample_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "samples"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "images" / "0000_0.png")
    (folder / "metadata.jsonl").write_text('{"prompt": "a red square", "prompt_index": 0, "seed": 0, "file": "images/0000_0.png"}\n')
    return folder


def test_score_with_a_hub_scorer_fails_at_once_naming_hf_download(no_network_env, tmp_path):
    done, seconds = _cli(["score", str(_sample_folder(tmp_path)), "--scorers", "pickscore"], no_network_env, tmp_path)
    assert done.returncode != 0
    line = _error_line(done.stderr)
    assert "cannot reach the hub" in line and "hf download yuvalkirstain/PickScore_v1" in line, line
    assert seconds < NO_RETRIES_S, seconds


def test_sample_with_a_hub_model_fails_at_once_naming_hf_download(no_network_env, tmp_path):
    done, seconds = _cli(["sample", "--model", "stabilityai/stable-diffusion-xl-base-1.0", "--limit", "1", "--out",
                          str(tmp_path / "out")], no_network_env, tmp_path)
    assert done.returncode != 0
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in _error_line(done.stderr)
    assert seconds < NO_RETRIES_S, seconds


def test_the_named_download_command_exists_in_the_installed_huggingface_hub():
    hf = shutil.which("hf", path=os.path.dirname(sys.executable)) or shutil.which("hf")
    assert hf, "huggingface_hub's `hf` command is not installed next to this Python"
    done = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--local-dir" in done.stdout


def test_local_models_still_load_when_the_hub_is_unreachable(no_network_env, tiny_sdxl_dir):
    code = ("from t2ialign.hub import use_offline_mode_if_unreachable as go; assert go(); "
            "import os; assert os.environ['HF_HUB_OFFLINE'] == '1'; "
            "from t2ialign.models.loading import load_components; "
            f"c = load_components({str(tiny_sdxl_dir)!r}); assert c.unet is not None and c.is_sdxl")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=no_network_env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_reachable_endpoint_is_not_mistaken_for_offline(monkeypatch):
    """A listening local endpoint: the probe connects, so nothing is switched off."""
    from t2ialign import hub

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        hub.hub_reachable.cache_clear()
        try:
            assert hub.hub_reachable()
        finally:
            hub.hub_reachable.cache_clear()
