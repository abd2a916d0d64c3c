"""Scoring and reporting of scripts/compare_peer_dpo.py: left/right placement, means over seeds, the table."""
from __future__ import annotations

import json
import math
from pathlib import Path


def left_right_positions(folder: Path) -> dict:
    """On the prompts that say left or right: the share of shapes drawn in the captioned column (left / right), and
    the share drawn in the mirrored one (what horizontal flips teach: flipping an image does not flip its caption)."""
    from PIL import Image

    from t2ialign.toy import world
    from t2ialign.toy.demo import _pil_to_tensor

    def column(position: str) -> str:
        return "left" if "left" in position else "right" if "right" in position else "centre"

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    wanted = [column((world.parse_caption(r["prompt"]) or {}).get("position", "")) for r in rows]
    rows, wanted = [r for r, w in zip(rows, wanted) if w != "centre"], [w for w in wanted if w != "centre"]
    if not rows:
        return {"lr_position_accuracy": None, "lr_mirrored": None}
    detected = world.detect_attributes(_pil_to_tensor([Image.open(folder / r["file"]) for r in rows]))
    seen = [column(d["position"]) if d is not None else None for d in detected]
    correct = sum(s == w for s, w in zip(seen, wanted))
    mirrored = sum(s is not None and s != "centre" and s != w for s, w in zip(seen, wanted))
    return {"lr_position_accuracy": correct / len(rows), "lr_mirrored": mirrored / len(rows)}


def _mean_reward(rewards: dict) -> float:
    return float(sum(r["reward"] for r in rewards.values()) / len(rewards))


def summarise(results: list[dict]) -> dict:
    import numpy as np

    summary = {}
    for system in dict.fromkeys(r["system"] for r in results):
        rows = [r for r in results if r["system"] == system]
        wins = np.array([r["win_rate"] for r in rows])
        n = len(wins)
        std = float(wins.std(ddof=1)) if n > 1 else 0.0
        half = _t975(n - 1) * std / math.sqrt(n) if n > 1 else None
        summary[system] = {
            "seeds": [r["seed"] for r in rows], "win_rates": wins.tolist(), "mean_win_rate": float(wins.mean()),
            "std_win_rate": std, "ci95_mean_win_rate": [float(wins.mean() - half), float(wins.mean() + half)] if half is not None else None,
            "mean_reward": float(np.mean([r["mean_reward"] for r in rows])),
            "mean_fidelity": float(np.mean([r["fidelity"] for r in rows])),
            "mean_lr_position_accuracy": _mean_or_none([r["lr_position_accuracy"] for r in rows]),
            "mean_lr_mirrored": _mean_or_none([r["lr_mirrored"] for r in rows]),
            "mean_train_wall_s": float(np.mean([r["train_wall_s"] for r in rows])),
        }
    return summary


def _mean_or_none(values: list):
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def _t975(df: int) -> float:
    """Two-sided 95% Student t quantile (table; normal beyond 30 degrees of freedom)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
             2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
    return table[df - 1] if 1 <= df <= 30 else 1.96


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(results: list[dict], summary: dict) -> str:
    lines = [f"{'system':<20} {'seed':>4} {'win rate':>9} {'95% CI':>16} {'mean reward':>12} {'fidelity':>9} {'L/R pos':>8} {'train s':>8}"]
    for r in results:
        ci = f"[{r['ci_low']:.1%}, {r['ci_high']:.1%}]"
        lines.append(f"{r['system']:<20} {r['seed']:>4} {r['win_rate']:>9.1%} {ci:>16} {r['mean_reward']:>12.4f} "
                     f"{r['fidelity']:>9.3f} {_pct(r['lr_position_accuracy']):>8} {r['train_wall_s']:>8.0f}")
    lines.append("")
    lines.append(f"{'system':<20} {'seeds':>5} {'mean win':>9} {'std':>6} {'95% CI of mean':>18} {'mean reward':>12} {'fidelity':>9} {'L/R pos':>8} {'train s':>8}")
    for system, s in summary.items():
        ci = f"[{s['ci95_mean_win_rate'][0]:.1%}, {s['ci95_mean_win_rate'][1]:.1%}]" if len(s["seeds"]) > 1 else "-"
        lines.append(f"{system:<20} {len(s['seeds']):>5} {s['mean_win_rate']:>9.1%} {s['std_win_rate']:>6.1%} {ci:>18} "
                     f"{s['mean_reward']:>12.4f} {s['mean_fidelity']:>9.3f} {_pct(s['mean_lr_position_accuracy']):>8} "
                     f"{s['mean_train_wall_s']:>8.0f}")
    return "\n".join(lines)
