"""The toy base shipped with the package (t2ialign/toy/base): what it holds, that it materialises into the
pipeline pretraining would write, and that pretraining is deterministic enough to byte-check it
(`t2ialign toy pretrain --verify-shipped` does the full 14-minute check)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from t2ialign.toy import shipped
from t2ialign.toy.pretrain import PretrainConfig

TINY = dict(num_images=64, vae_steps=2, vae_batch_size=8, unet_steps=2, unet_batch_size=8, heldout_images=8)


def _weights(directory, component):
    return (directory / component / shipped.DIFFUSERS_WEIGHTS).read_bytes()


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory, one_thread):
    return shipped.pretrain_fresh(tmp_path_factory.mktemp("tiny"), PretrainConfig(**TINY))


@pytest.fixture(scope="module")
def materialised(tmp_path_factory):
    return shipped.materialise(tmp_path_factory.mktemp("shipped") / "pipeline", PretrainConfig())


def test_a_short_pretrain_is_byte_identical_run_to_run(tiny_pretrained, tmp_path, one_thread):
    again = shipped.pretrain_fresh(tmp_path, PretrainConfig(**TINY))
    for component in shipped.WEIGHT_FILES:
        assert _weights(again, component) == _weights(tiny_pretrained, component), component
    first = shipped.export_shipped(tiny_pretrained, tmp_path / "export-1")
    assert shipped.export_shipped(again, tmp_path / "export-2")["sha256"] == first["sha256"]


def test_an_exported_base_materialises_to_the_bytes_pretraining_wrote(tiny_pretrained, tmp_path):
    shipped.export_shipped(tiny_pretrained, tmp_path / "export")
    rebuilt = shipped.materialise(tmp_path / "rebuilt", PretrainConfig(**TINY), directory=tmp_path / "export")
    for component in shipped.WEIGHT_FILES:  # pretraining stores fp16-rounded weights: nothing lost in the export
        assert _weights(rebuilt, component) == _weights(tiny_pretrained, component), component
    for name in ("text_encoder", "text_encoder_2"):
        assert (rebuilt / name / "model.safetensors").read_bytes() == (tiny_pretrained / name / "model.safetensors").read_bytes()
    for sub in ("unet", "vae", "scheduler"):
        config = next((tiny_pretrained / sub).glob("*config.json")).name
        assert (rebuilt / sub / config).read_text() == (tiny_pretrained / sub / config).read_text()


def test_the_shipped_base_is_the_default_config_and_its_hashes_match():
    manifest = shipped.check_hashes()
    assert manifest["cache_key"] == PretrainConfig().cache_key()  # re-export after changing the pretraining
    assert sorted(manifest["sha256"]) == sorted(shipped.WEIGHT_FILES.values())
    assert sum((shipped.SHIPPED_DIR / name).stat().st_size for name in manifest["sha256"]) < 3_000_000


def test_the_materialised_base_loads_and_its_text_encoders_are_the_seeded_init(materialised):
    from diffusers import StableDiffusionXLPipeline

    from t2ialign.toy.pretrain import _build_components

    info = json.loads((materialised / "toy_info.json").read_text())
    assert info["cache_key"] == PretrainConfig().cache_key()
    pipeline = StableDiffusionXLPipeline.from_pretrained(materialised)
    assert pipeline.vae.config.scaling_factor == shipped.read_manifest()["scaling_factor"]
    assert not pipeline.config.force_zeros_for_empty_prompt and pipeline.tokenizer.model_max_length == 16
    fresh = _build_components(PretrainConfig().model, PretrainConfig().seed)
    for name in ("text_encoder", "text_encoder_2"):
        saved = load_file(str(materialised / name / "model.safetensors"))
        for key, tensor in fresh[name].state_dict().items():
            if key in saved:
                assert torch.equal(saved[key], tensor), (name, key)
    unet = load_file(str(shipped.SHIPPED_DIR / shipped.WEIGHT_FILES["unet"]))
    assert all(torch.equal(unet[k].float(), v) for k, v in pipeline.unet.state_dict().items())


def test_get_toy_pipeline_materialises_the_default_without_training(monkeypatch, tmp_path):
    from t2ialign.toy import pretrain

    monkeypatch.setenv("T2IALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain, "pretrain_toy_pipeline", lambda *a, **k: pytest.fail("pretrained the shipped base"))
    directory = pretrain.get_toy_pipeline()
    assert directory == pretrain.toy_cache_dir() and pretrain.is_complete(directory)
    custom = PretrainConfig(unet_steps=7)
    assert not shipped.ships(custom)  # any other config still pretrains


def test_a_cache_materialised_from_other_shipped_weights_is_rebuilt(monkeypatch, tmp_path):
    from t2ialign.toy import pretrain

    monkeypatch.setenv("T2IALIGN_CACHE", str(tmp_path))
    directory = pretrain.get_toy_pipeline()
    info_path = directory / pretrain.INFO_FILE
    info = json.loads(info_path.read_text())
    assert info["shipped_sha256"] == shipped.read_manifest()["sha256"]
    assert not pretrain.shipped_base_changed(directory, PretrainConfig())
    # the cache of an earlier release, whose shipped base had other bytes under the same config
    info_path.write_text(json.dumps({**info, "shipped_sha256": {"unet.fp16.safetensors": "0" * 64}}))
    assert pretrain.shipped_base_changed(directory, PretrainConfig())
    assert pretrain.get_toy_pipeline() == directory
    assert json.loads(info_path.read_text())["shipped_sha256"] == shipped.read_manifest()["sha256"]
    # an earlier release recorded no hashes at all: rebuilt too; a real pretrain (no "source") is kept
    info_path.write_text(json.dumps({k: v for k, v in info.items() if k != "shipped_sha256"}))
    assert pretrain.shipped_base_changed(directory, PretrainConfig())
    info_path.write_text(json.dumps({k: v for k, v in info.items() if k not in ("shipped_sha256", "source")}))
    assert not pretrain.shipped_base_changed(directory, PretrainConfig())


def test_the_manifest_names_what_the_bytes_depend_on():
    built_with = shipped.read_manifest()["built_with"]
    assert set(built_with) == {"torch", "cpu_capability"} and built_with["torch"].startswith("2.")


def test_concurrent_processes_share_one_materialised_cache(tmp_path):
    """Test and demo workers ask for the toy base at once: one builds it, the others wait for it."""
    import subprocess
    import sys

    code = ("from t2ialign.toy.pretrain import get_toy_pipeline, is_complete; d = get_toy_pipeline(); "
            "assert is_complete(d); print(d)")
    env = {**__import__("os").environ, "T2IALIGN_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1
    assert not [p.name for p in (tmp_path / "toy").iterdir() if p.name.startswith((".staging-", ".old-"))]
