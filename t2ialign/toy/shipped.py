"""The pretrained toy base shipped with the package, so the demo does not spend 13 CPU minutes pretraining.

Only the trained weights travel (``base/unet.fp16.safetensors``, ``base/vae.fp16.safetensors``, about
2.5 MB): the text encoders stay at their seeded random init and the tokenizers are built offline, so
``pretrain._build_components`` rebuilds them exactly. ``base/manifest.json`` names the ``PretrainConfig``
cache key the files were trained with and each file's sha256.

Pretraining stores its weights rounded to half precision (``pretrain.round_to_half``), so a base
materialised from these files and one trained by ``t2ialign toy pretrain --force`` are the same bytes.
``t2ialign toy pretrain --export-shipped DIR`` rebuilds the files from a fresh pretrain and
``--verify-shipped`` pretrains from scratch and compares its export with the shipped files by sha256.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Optional

import torch

SHIPPED_DIR = Path(__file__).parent / "base"
MANIFEST = "manifest.json"
WEIGHT_FILES = {"unet": "unet.fp16.safetensors", "vae": "vae.fp16.safetensors"}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
INFO_KEYS = ("vae_train_mse", "vae_heldout_mse", "unet_train_loss", "vae_seconds", "total_seconds")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(directory: Path = SHIPPED_DIR) -> Optional[dict]:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def ships(config) -> bool:
    """Whether the shipped files are the base that ``config`` would pretrain."""
    manifest = read_manifest()
    return manifest is not None and manifest["cache_key"] == config.cache_key()


def export_shipped(pipeline_dir: Path, out_dir: Path) -> dict:
    """Write the fp16 UNet / VAE weights of a pretrained toy pipeline and their manifest into ``out_dir``."""
    from safetensors.torch import load_file, save_file

    from t2ialign.toy.pretrain import INFO_FILE

    pipeline_dir, out_dir = Path(pipeline_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = json.loads((pipeline_dir / INFO_FILE).read_text())
    hashes = {}
    for component, name in WEIGHT_FILES.items():
        weights = load_file(str(pipeline_dir / component / DIFFUSERS_WEIGHTS))
        half = {key: tensor.to(torch.float16).contiguous() for key, tensor in sorted(weights.items())}
        save_file(half, str(out_dir / name))
        hashes[name] = sha256(out_dir / name)
    manifest = {
        "cache_key": info["cache_key"], "world_version": info["world_version"],
        "pretrain_version": info["pretrain_version"], "scaling_factor": info["scaling_factor"],
        "sha256": hashes, "pretrain_info": {key: info[key] for key in INFO_KEYS if key in info},
        "built_with": build_environment(),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_environment() -> dict:
    """What the bytes of a pretrain depend on besides the config: float kernels differ across torch builds
    and CPU instruction sets (AVX2 vs AVX512 reduce in other orders), so a byte check holds only where both match."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def check_hashes(directory: Path = SHIPPED_DIR) -> dict:
    """The manifest, after checking every weight file against its sha256 (a corrupt install fails loudly)."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"no shipped toy base at {directory}")
    for name, expected in manifest["sha256"].items():
        actual = sha256(Path(directory) / name)
        if actual != expected:
            raise ValueError(f"shipped toy weights {name}: sha256 {actual} != manifest {expected}")
    return manifest


def materialise(target: Path, config, directory: Path = SHIPPED_DIR) -> Path:
    """Write the full diffusers pipeline directory (the layout pretraining writes) from the shipped weights."""
    from safetensors.torch import load_file

    from t2ialign.models.tiny import save_pipeline
    from t2ialign.toy.pretrain import INFO_FILE, _build_components, pretrain_info

    manifest = check_hashes(directory)
    if manifest["cache_key"] != config.cache_key():
        raise ValueError(f"shipped toy base is {manifest['cache_key']}, not {config.cache_key()}")
    components = _build_components(config.model, config.seed)  # text encoders: the seeded init, as trained
    for component, name in WEIGHT_FILES.items():
        weights = {key: tensor.float() for key, tensor in load_file(str(Path(directory) / name)).items()}
        components[component].load_state_dict(weights, strict=True)
    components["vae"].register_to_config(scaling_factor=manifest["scaling_factor"])
    target = Path(target)
    save_pipeline({**components, "force_zeros_for_empty_prompt": False}, target)
    info = {**pretrain_info(config, manifest["scaling_factor"]), **manifest["pretrain_info"],
            "source": "shipped with the package (t2ialign/toy/base), materialised", "shipped_sha256": manifest["sha256"]}
    (target / INFO_FILE).write_text(json.dumps(info, indent=2, default=list))
    return target


def pretrain_fresh(workdir: Path, config=None) -> Path:
    """Pretrain from scratch into ``workdir`` on one thread (the thread count the shipped base used)."""
    from t2ialign.toy.pretrain import PretrainConfig, pretrain_toy_pipeline

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain_toy_pipeline(Path(workdir) / "pipeline", config or PretrainConfig())
    finally:
        torch.set_num_threads(previous)


def verify_shipped(config=None, directory: Path = SHIPPED_DIR) -> dict:
    """Pretrain from scratch, export, and compare with the shipped files: ``{file: (shipped, fresh)}``."""
    shipped = check_hashes(directory)
    with tempfile.TemporaryDirectory(prefix="t2ialign-verify-") as workdir:
        fresh = export_shipped(pretrain_fresh(Path(workdir), config), Path(workdir) / "export")
    keys = {"cache_key": (shipped["cache_key"], fresh["cache_key"]),
            "built_with": (shipped.get("built_with"), fresh["built_with"])}
    return {**keys, **{name: (shipped["sha256"][name], fresh["sha256"].get(name)) for name in shipped["sha256"]}}
