"""Sharing a training run: the upload folder with a model card, and its upload to the Hugging Face hub.

``prepare_share_folder(run_dir, out_dir)`` turns a finished run (``t2ialign train``'s output folder) into the
folder that becomes a hub model repository::

    README.md                          model card (huggingface_hub.ModelCard): metadata + run summary
    config.yaml                        the run's training config
    export.json                        what the export is and how it loads (from final/)
    eval_report.json                   the ``t2ialign eval`` report.json, when one is given
    full fine-tune:  unet/             diffusers UNet2DConditionModel folder
    LoRA:            pytorch_lora_weights.safetensors   diffusers format (``pipe.load_lora_weights``)
                     <name>_kohya.safetensors           kohya format (AUTOMATIC1111, ComfyUI, Forge, kohya)
                     lora_config.json

``push_to_hub`` prepares that folder and uploads it (``HfApi.create_repo`` + ``upload_folder``); on a machine
without network it stops with one line naming the folder it wrote and the ``hf upload`` command to run elsewhere.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Optional

import yaml

from t2ialign.errors import UserFacingError

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
EVAL_REPORT_FILE = "eval_report.json"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # = t2ialign.models.lora.LORA_WEIGHTS_NAME (no torch import here)
# licenses of the base models t2ialign's recipes use; the card's license (a derivative keeps the base's terms)
KNOWN_LICENSES = {
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
}
OBJECTIVE_NAMES = {
    "dpo": "Diffusion-DPO (Wallace et al. 2023)",
    "mapo": "MaPO, reference-free (Hong et al. 2024)",
    "dcpo": "DCPO: Diffusion-DPO with each image conditioned on its own caption",
    "inpo": "DDIM-InPO: Diffusion-DPO at DDIM-inverted latents",
    "sft": "supervised fine-tuning on the preferred images",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ShareError(UserFacingError):
    """A run folder that cannot be shared (no export, no config), or an upload that failed."""


# ---------------------------------------------------------------- reading the run


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return records


def _get(config: dict, dotted: str, default=None):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def is_hub_id(name) -> bool:
    """``owner/name`` that is not a local path: a hub repository id."""
    return isinstance(name, str) and bool(HUB_ID.match(name)) and not os.path.exists(os.path.expanduser(name))


def _objective_beta(name: str, beta) -> Optional[float]:
    if beta is not None:
        return float(beta)
    try:
        from t2ialign.objectives import get_objective  # torch only

        default = get_objective(name).defaults.get("beta")
        return None if default is None else float(default)
    except (ValueError, AttributeError):
        return None


def _latest_trainer_state(run_dir: Path) -> dict:
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"))
    return json.loads(states[-1].read_text()) if states else {}


def run_summary(run_dir) -> dict:
    """What the card says about a run: base model, objective, data, steps, batch, learning rate, export kind."""
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise ShareError(f"{run_dir}: no final/ export; a run writes it when training finishes (t2ialign train)")
    if (final / "lora" / LORA_WEIGHTS_NAME).is_file():
        kind = "lora"
    elif (final / "unet").is_dir():
        kind = "unet"
    else:
        raise ShareError(f"{final}: neither lora/{LORA_WEIGHTS_NAME} nor unet/ is there; the export is incomplete")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ShareError(f"{run_dir}: no config.yaml; is this a t2ialign train output folder?")
    config = yaml.safe_load(config_file.read_text()) or {}
    manifest = json.loads((final / "export.json").read_text()) if (final / "export.json").is_file() else {}
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    history = _read_jsonl(run_dir / "runs.jsonl")
    state = _latest_trainer_state(run_dir)
    objective = _get(config, "objective.name", manifest.get("objective", "dpo"))
    steps = max([int(r["step"]) for r in metrics if "step" in r] + [int(state.get("global_step", 0))], default=0)
    # processes: the export manifest (WORLD_SIZE at export), else the last checkpoint's trainer state
    processes = manifest.get("num_processes") or state.get("num_processes")
    batch = _get(config, "train_batch_size")
    accumulation = _get(config, "gradient_accumulation_steps")
    return {
        "kind": kind,
        "config": config,
        "manifest": manifest,
        "base_model": _get(config, "model.pretrained", manifest.get("base_model")),
        "is_sdxl": manifest.get("is_sdxl"),
        "objective": objective,
        "beta": _objective_beta(objective, _get(config, "objective.beta")),
        "objective_params": _get(config, "objective.params") or {},
        "dataset": _get(config, "data.dataset"),
        "resolution": _get(config, "data.resolution"),
        "steps": steps or None,
        "max_steps": _get(config, "max_steps"),
        "train_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "num_processes": int(processes) if processes else None,
        "effective_batch": batch * accumulation * int(processes) if batch and accumulation and processes else None,
        "learning_rate": _get(config, "optim.learning_rate"),
        "scale_lr": _get(config, "optim.scale_lr"),
        "lr_scheduler": _get(config, "optim.lr_scheduler"),
        "optimizer": _get(config, "optim.optimizer"),
        "mixed_precision": _get(config, "mixed_precision"),
        "seed": _get(config, "seed"),
        "lora": _get(config, "lora") if kind == "lora" else None,
        "starts": len(history),
        "last_metrics": metrics[-1] if metrics else {},
    }


# ---------------------------------------------------------------- model card


def card_metadata(summary: dict, license: Optional[str] = None):
    """The card's YAML header as ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    base = summary["base_model"]
    tags = ["text-to-image", "diffusers", "stable-diffusion-xl" if summary["is_sdxl"] else "stable-diffusion",
            summary["objective"], "t2ialign"]
    if summary["objective"] in ("dpo", "dcpo", "inpo"):
        tags.append("diffusion-dpo")
    if summary["kind"] == "lora":
        tags.append("lora")
    if summary["is_sdxl"] is None:
        tags.remove("stable-diffusion")
    fields = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": list(dict.fromkeys(tags)),
        "license": license or KNOWN_LICENSES.get(str(base)),
    }
    if is_hub_id(base):
        fields["base_model"] = base
    if is_hub_id(summary["dataset"]):
        fields["datasets"] = [summary["dataset"]]
    return ModelCardData(**{k: v for k, v in fields.items() if v})


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "not recorded"
    return format(value, spec) if spec else str(value)


def _eval_table(report: dict) -> str:
    rows = [w for w in report.get("win_rates", []) if not w.get("category")]
    if not rows:
        return "The evaluation report holds no win rates.\n"
    settings = report.get("settings", {})
    ci = settings.get("ci")
    ci_label = f"{ci * 100:g}% CI" if isinstance(ci, (int, float)) and ci < 1 else (f"{ci}% CI" if ci else "CI")
    lines = [
        f"Win rates from `t2ialign eval` ({report.get('n_prompts', '?')} prompts; ties count half; {ci_label}: "
        "percentile bootstrap over prompts). Full report: `eval_report.json`.",
        "",
        f"| scorer | model | vs | win rate | {ci_label} | wins / ties / losses | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in rows:
        lines.append(f"| {w['scorer']} | {w['model_a']} | {w['model_b']} | {w['win_rate']:.3f} | "
                     f"[{w['low']:.3f}, {w['high']:.3f}] | {w['wins']} / {w['ties']} / {w['losses']} | {w['n']} |")
    return "\n".join(lines) + "\n"


def _load_code(summary: dict, repo_id: str, kohya_name: Optional[str]) -> str:
    pipeline = "StableDiffusionXLPipeline" if summary["is_sdxl"] is not False else "StableDiffusionPipeline"
    base = summary["base_model"]
    if summary["kind"] == "lora":
        code = f"""```python
import torch
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{repo_id}", weight_name="{LORA_WEIGHTS_NAME}")
image = pipe("a photo of a cat wearing a tiny hat").images[0]
```
"""
        if kohya_name:
            code += (f"\nAUTOMATIC1111 / Forge / ComfyUI / kohya tools: download `{kohya_name}` (the same LoRA in the kohya "
                     "key format) into the tool's LoRA folder and use it with the base model above.\n")
        return code
    return f"""```python
import torch
from diffusers import {pipeline}, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("{repo_id}", subfolder="unet", torch_dtype=torch.float16)
pipe = {pipeline}.from_pretrained("{base}", unet=unet, torch_dtype=torch.float16).to("cuda")
image = pipe("a photo of a cat wearing a tiny hat").images[0]
```
"""


def card_text(summary: dict, repo_id: str, eval_report: Optional[dict] = None, license: Optional[str] = None,
              kohya_name: Optional[str] = None) -> str:
    """The whole ``README.md``: YAML metadata header and the markdown body."""
    data = card_metadata(summary, license)
    objective = summary["objective"]
    what = "LoRA adapter for the UNet" if summary["kind"] == "lora" else "fine-tuned UNet (full fine-tune)"
    beta = f", beta = {summary['beta']:g}" if summary["beta"] is not None else ""
    params = "".join(f", {k} = {v}" for k, v in summary["objective_params"].items())
    if summary["effective_batch"]:
        batch = (f"{summary['effective_batch']} pairs per optimizer step ({summary['train_batch_size']} per micro-batch x "
                 f"{summary['gradient_accumulation_steps']} accumulation x {summary['num_processes']} process(es))")
    else:
        batch = (f"{_fmt(summary['train_batch_size'])} pairs per micro-batch x {_fmt(summary['gradient_accumulation_steps'])} "
                 "accumulation per process (the number of processes is not recorded in this run folder)")
    lr = _fmt(summary["learning_rate"], "g") + (" (scaled by the pairs per step)" if summary["scale_lr"] else "")
    rows = [
        ("Base model", f"`{_fmt(summary['base_model'])}`"),
        ("Export", what),
        ("Objective", f"`{objective}`: {OBJECTIVE_NAMES.get(objective, objective)}{beta}{params}"),
        ("Data", f"`{_fmt(summary['dataset'])}` at {_fmt(summary['resolution'])} px"),
        ("Optimizer steps", f"{_fmt(summary['steps'])} (of max_steps = {_fmt(summary['max_steps'])})"),
        ("Effective batch", batch),
        ("Learning rate", f"{lr}, {_fmt(summary['optimizer'])}, {_fmt(summary['lr_scheduler'])} schedule"),
        ("Mixed precision", _fmt(summary["mixed_precision"])),
        ("Seed", _fmt(summary["seed"])),
    ]
    if summary["lora"]:
        lora = summary["lora"]
        alpha = lora.get("alpha") if lora.get("alpha") is not None else lora.get("rank")
        rows.append(("LoRA", f"rank {lora.get('rank')}, alpha {alpha}, modules {', '.join(lora.get('target_modules') or [])}"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {what} of `{summary['base_model']}`, aligned with human preference pairs by {OBJECTIVE_NAMES.get(objective, objective)}, "
        "trained with t2ialign (`t2ialign train`). The run's full training config is `config.yaml`.",
        "",
        "## Training",
        "",
        table,
        "",
        "## Evaluation",
        "",
        _eval_table(eval_report) if eval_report else "No evaluation report was attached (`t2ialign eval` writes one).\n",
        "## How to use",
        "",
        _load_code(summary, repo_id, kohya_name),
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def check_card(path) -> "object":
    """Parse the card back with ``ModelCard.load`` and check its metadata round-trips through ``ModelCardData``.

    ``ModelCard.validate()`` posts the card to the hub's ``/api/validate-yaml``, so it runs only where the hub
    answers; offline the local round-trip is the check."""
    from huggingface_hub import ModelCard, ModelCardData

    from t2ialign.hub import offline

    card = ModelCard.load(path)
    data = card.data.to_dict()
    again = ModelCardData(**data).to_dict()
    if again != data or not data.get("library_name") or "text-to-image" not in (data.get("tags") or []):
        raise ShareError(f"{path}: the model card's metadata does not round-trip ({data} -> {again})")
    if not offline():
        card.validate()
    return card


# ---------------------------------------------------------------- the folder


def _kohya_name(name: str) -> str:
    from t2ialign.training.export import kohya_file_name

    return kohya_file_name(name)


def prepare_share_folder(run_dir, out_dir, eval_report=None, repo_id: Optional[str] = None,
                         license: Optional[str] = None) -> Path:
    """Write the upload folder of ``run_dir`` into ``out_dir`` (replaced if it exists); returns ``out_dir``.

    ``eval_report``: a ``t2ialign eval`` ``report.json`` (path, its folder, or the loaded dict) for the card's
    win-rate table. ``repo_id`` names the repository in the card's loading code (default ``<you>/<run name>``)."""
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    summary = run_summary(run_dir)
    final = run_dir / "final"
    if out_dir == run_dir or out_dir in run_dir.parents or out_dir == final or final in out_dir.parents:
        raise ShareError(f"share folder {out_dir}: pick a folder that is not the run folder or one of its parts")
    report = _load_report(eval_report)
    repo_id = repo_id or f"<you>/{run_dir.name}"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kohya_name = None
    if summary["kind"] == "lora":
        from t2ialign.models.lora import export_kohya_lora

        lora = final / "lora"
        for file in (LORA_WEIGHTS_NAME, "lora_config.json"):
            if (lora / file).is_file():
                shutil.copy2(lora / file, tmp / file)
        kohya_name = _kohya_name(repo_id.split("/")[-1] if not repo_id.startswith("<") else run_dir.name)
        export_kohya_lora(tmp / LORA_WEIGHTS_NAME, tmp / kohya_name)  # from the diffusers file: also for older runs
    else:
        shutil.copytree(final / "unet", tmp / "unet")
    if (final / "export.json").is_file():
        shutil.copy2(final / "export.json", tmp / "export.json")
    shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
    if report is not None:
        (tmp / EVAL_REPORT_FILE).write_text(json.dumps(report, indent=2))
    (tmp / CARD_FILE).write_text(card_text(summary, repo_id, report, license, kohya_name), encoding="utf-8")
    check_card(tmp / CARD_FILE)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _load_report(eval_report) -> Optional[dict]:
    if eval_report is None or isinstance(eval_report, dict):
        return eval_report
    path = Path(eval_report)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise ShareError(f"--eval-report {eval_report}: no such file (t2ialign eval writes report.json in its output folder)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShareError(f"--eval-report {path}: not JSON ({exc})") from None
    if not isinstance(report, dict) or "win_rates" not in report:
        raise ShareError(f"--eval-report {path}: not a t2ialign eval report.json (no win_rates)")
    return report


# ---------------------------------------------------------------- upload


def upload_command(repo_id: str, folder, private: bool = False) -> str:
    """The huggingface_hub CLI command that uploads ``folder`` as the repo's root."""
    return shlex.join(["hf", "upload", repo_id, str(folder), ".", "--repo-type", "model"]) + (" --private" if private else "")


def push_to_hub(run_dir, repo_id: str, *, private: bool = False, eval_report=None, out_dir=None,
                license: Optional[str] = None, token: Optional[str] = None, endpoint: Optional[str] = None) -> str:
    """Prepare the share folder (``out_dir``, default ``<run_dir>/share``) and upload it to ``repo_id``.

    Returns the repository URL. Without network: ShareError naming the folder and the ``hf upload`` command."""
    if not HUB_ID.match(repo_id or ""):
        raise ShareError(f"--repo-id {repo_id!r}: expected USER/NAME (or ORG/NAME)")
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "share"
    folder = prepare_share_folder(run_dir, out_dir, eval_report=eval_report, repo_id=repo_id, license=license)
    from t2ialign.hub import offline_note, use_offline_mode_if_unreachable

    command = upload_command(repo_id, folder, private)
    if endpoint is None and use_offline_mode_if_unreachable():
        raise ShareError(f"push: {offline_note()}the folder was written locally at {folder}; "
                         f"on a machine with network run `{command}` (after `hf auth login`)")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload model trained with t2ialign")
    except Exception as exc:  # noqa: BLE001 - auth, network, quota: one line, and the folder stays for a retry
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShareError(f"push: upload to {repo_id} failed ({first}); the folder is at {folder}: retry with "
                         f"`{command}` (after `hf auth login`)") from None
    return str(url)
