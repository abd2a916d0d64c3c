"""Run an evaluation protocol and line its numbers up with the published ones.

``run_protocol(protocol, out_dir)`` samples every model on every prompt set with identical seeds (reusing
images already there), scores them, computes the per-model means, the protocol's win rates, the
implicit-reward accuracy and the RLG sweep it asks for, writes one report per prompt set, and a
side-by-side table ``comparison.{json,md}``: published, ours, difference, our CI, whether the CI holds
the published value.

Output (``out_dir``)::

    samples/<prompt set>/<model>/   t2ialign sample folders (+ scores.jsonl)
    reports/<prompt set>/           t2ialign eval report (report.html, report.json, ...)
    rlg/                            the RLG sweep (sweep.json, sweep.png), when the protocol has one
    measurements.json               every number we measured, with its CI
    comparison.md / comparison.json the side-by-side table
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .protocol import ModelSpec, Protocol, Published

logger = logging.getLogger(__name__)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "prompts"


class _Resolver:
    """Hub ids and paths pass through; ``toy:`` references go to the toy world (when one is given)."""

    def __init__(self, toy_world=None):
        self.toy_world = toy_world

    def __call__(self, reference: Optional[str]) -> Optional[str]:
        if isinstance(reference, str) and reference.startswith("toy:"):
            if self.toy_world is None:
                from t2ialign.errors import UserFacingError

                raise UserFacingError(f"{reference}: toy references need the toy world (run the protocol with --toy)")
            return self.toy_world.resolve(reference)
        return reference

    def prompts(self, name: str, limit: Optional[int]):
        if name.startswith("toy:"):
            return self.toy_world.prompts(name, limit)
        from .prompts import load_prompt_set

        return load_prompt_set(name, limit=limit)


def _sample_config(spec: ModelSpec, resolve, sampler: dict, output_dir: Path, device: str):
    from t2ialign.config import SampleConfig

    options = {k: v for k, v in sampler.items() if k != "limit"}
    return SampleConfig(pretrained=resolve(spec.pretrained), aligned=resolve(spec.aligned), guide_with=resolve(spec.guide_with),
                        rlg_scale=spec.rlg_scale, output_dir=str(output_dir), device=device, **options)


def _sample_and_score(protocol: Protocol, resolve, out: Path, device: str, scorer_kwargs: dict, n_boot: int) -> dict:
    """{prompt set: score tables}; writes one report per prompt set."""
    from .recipes import evaluate
    from .folders import read_scores
    from .sampling import sample

    tables = {}
    for prompt_set in protocol.prompt_sets:
        records = resolve.prompts(prompt_set, protocol.sampler.get("limit"))
        folders = {}
        for name, spec in protocol.models.items():
            folder = out / "samples" / _slug(prompt_set) / name
            folders[name] = str(sample(_sample_config(spec, resolve, protocol.sampler, folder, device), records))
        baseline = protocol.comparisons[0][1] if protocol.comparisons else None
        evaluate(folders, protocol.scorers, str(out / "reports" / _slug(prompt_set)), baseline=baseline, n_boot=n_boot,
                 title=f"{protocol.name}: {prompt_set}", **scorer_kwargs)
        tables[prompt_set] = {name: read_scores(folder) for name, folder in folders.items()}
    return tables


def _interval(estimate, low, high, n) -> dict:
    return {"value": float(estimate), "low": float(low), "high": float(high), "n": int(n)}


def _score_measurements(protocol: Protocol, tables: dict, n_boot: int, seed: int) -> dict:
    from t2ialign.scoring import canonical_scorer_name

    from .stats import model_means, pairwise_win_rates

    scorers = [canonical_scorer_name(s) for s in protocol.scorers]
    found = {}
    for prompt_set, by_model in tables.items():
        for model, per_scorer in model_means(by_model, scorers, n_boot=n_boot, seed=seed).items():
            for scorer, iv in per_scorer.items():
                found[("mean", prompt_set, scorer, model, "", None)] = _interval(iv.estimate, iv.low, iv.high, iv.n)
        for wr in pairwise_win_rates(by_model, scorers, pairs=protocol.comparisons, n_boot=n_boot, seed=seed):
            found[("win_rate", prompt_set, wr.scorer, wr.model_a, wr.model_b, None)] = _interval(wr.win_rate, wr.low, wr.high, wr.n)
    return found


def _implicit_reward(protocol: Protocol, resolve, device: str, n_boot: int, seed: int) -> dict:
    from .preference_accuracy import implicit_reward_on_dataset

    section = protocol.implicit_reward
    policy, reference = protocol.models[section["model"]], protocol.models[section["reference"]]
    result = implicit_reward_on_dataset(
        resolve(reference.pretrained), resolve(policy.aligned), resolve(section["dataset"]), split=section.get("split", "test"),
        limit=section.get("limit"), resolution=section.get("resolution"), draws=int(section.get("draws", 4)),
        time_ids=section.get("time_ids", "fixed"), device=device, seed=seed, n_boot=n_boot)
    key = ("implicit_accuracy", "", "", section["model"], "", None)
    return {key: _interval(result["accuracy"], result["low"], result["high"], result["n"])}


def _rlg(protocol: Protocol, resolve, out: Path, device: str, scorer_kwargs: dict, n_boot: int, seed: int) -> dict:
    from .recipes import _build_scorers
    from .sweep import rlg_sweep

    section = protocol.rlg_sweep
    prompt_set = section.get("prompts", protocol.prompt_sets[0])
    base, aligned = protocol.models[section["base"]], protocol.models[section["aligned"]]
    spec = ModelSpec(pretrained=base.pretrained, guide_with=aligned.aligned)
    config = _sample_config(spec, resolve, protocol.sampler, out / "rlg", device)
    scorers = _build_scorers(section.get("scorers", protocol.scorers), **scorer_kwargs)
    sweep = rlg_sweep(config, section["scales"], {s.name: s for s in scorers}, out / "rlg",
                      records=resolve.prompts(prompt_set, protocol.sampler.get("limit")), n_boot=n_boot, seed=seed)
    found = {}
    for key, entry in sweep["results"].items():
        for scorer, stats in entry["scores"].items():
            found[("rlg_mean", prompt_set, scorer, section["aligned"], "", float(key))] = _interval(
                stats["mean"], stats["low"], stats["high"], stats["n"])
    return found


def side_by_side(published: list[Published], measured: dict) -> list[dict]:
    """One row per published number (ours next to it, or not measured), then our numbers without one."""
    rows, used = [], set()
    for p in published:
        ours = measured.get(p.key())
        used.add(p.key())
        row = {"metric": p.metric, "prompts": p.prompts, "scorer": p.scorer, "model": p.a or p.model, "vs": p.b, "w": p.w,
               "published": p.value, "source": p.source, "ours": None, "difference": None, "low": None, "high": None,
               "ci_holds_published": None}
        if ours is not None:
            row.update(ours=ours["value"], difference=ours["value"] - p.value, low=ours["low"], high=ours["high"], n=ours["n"],
                       ci_holds_published=bool(ours["low"] <= p.value <= ours["high"]))
        rows.append(row)
    for key, ours in measured.items():
        if key not in used:
            metric, prompts, scorer, model, vs, w = key
            rows.append({"metric": metric, "prompts": prompts, "scorer": scorer, "model": model, "vs": vs, "w": w,
                         "published": None, "source": "", "ours": ours["value"], "difference": None, "low": ours["low"],
                         "high": ours["high"], "n": ours["n"], "ci_holds_published": None})
    return rows


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def comparison_markdown(protocol: Protocol, rows: list[dict], toy: bool) -> str:
    lines = [f"# {protocol.name}: published vs ours", "", f"Paper: {protocol.paper}", ""]
    if toy:
        lines += ["Toy world run: the published numbers are the paper's, shown for the layout; ours come from the toy "
                  "world and are not comparable with them.", ""]
    lines += ["| metric | prompts | scorer | model | vs | w | published | ours | difference | our CI | source |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "-" if r["low"] is None else f"[{r['low']:.3f}, {r['high']:.3f}]"
        diff = "-" if r["difference"] is None else f"{r['difference']:+.3f}"
        w = "" if r["w"] is None else f"{r['w']:g}"
        lines.append(f"| {r['metric']} | {r['prompts']} | {r['scorer']} | {r['model']} | {r['vs']} | {w} | "
                     f"{_fmt(r['published'])} | {_fmt(r['ours'])} | {diff} | {ci} | {r['source']} |")
    return "\n".join(lines) + "\n"


def run_protocol(protocol: Protocol, out_dir, *, toy_world=None, device: str = "auto", n_boot: int = 1000, seed: int = 0,
                 scorer_kwargs: Optional[dict] = None) -> dict:
    """Run ``protocol`` into ``out_dir``; returns ``{"rows": side-by-side rows, "measured": ...}``."""
    from .sampling import pick_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(device)
    resolve = _Resolver(toy_world)
    scorer_kwargs = dict(scorer_kwargs or {})
    tables = _sample_and_score(protocol, resolve, out, device, scorer_kwargs, n_boot)
    measured = _score_measurements(protocol, tables, n_boot, seed)
    if protocol.implicit_reward:
        measured.update(_implicit_reward(protocol, resolve, device, n_boot, seed))
    if protocol.rlg_sweep:
        measured.update(_rlg(protocol, resolve, out, device, scorer_kwargs, n_boot, seed))
    rows = side_by_side(protocol.published, measured)
    toy = toy_world is not None
    (out / "measurements.json").write_text(json.dumps([{"key": list(k), **v} for k, v in measured.items()], indent=2))
    (out / "comparison.json").write_text(json.dumps({"protocol": protocol.name, "paper": protocol.paper, "toy": toy,
                                                     "toy_world": toy_world.describe() if toy else None, "rows": rows},
                                                    indent=2, default=_json_default))
    markdown = comparison_markdown(protocol, rows, toy)
    (out / "comparison.md").write_text(markdown)
    return {"rows": rows, "measured": measured, "markdown": markdown}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
