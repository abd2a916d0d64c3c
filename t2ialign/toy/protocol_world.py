"""The toy world behind an evaluation protocol's ``toy:`` block (``eval/protocols/*.yaml``).

A protocol's toy version names toy parts with ``toy:`` references, resolved here:

* ``toy:base`` - the pretrained toy pipeline (the demo's, from the same cache);
* ``toy:<objective>`` (``toy:dpo``, ``toy:mapo``, ...) - the base aligned with that objective by the
  demo's recipe on labelled toy pairs, trained on first use and reused afterwards;
* ``toy:pairs`` / ``toy:heldout-pairs`` - the training pairs, and pairs of other prompts and seeds for the
  implicit-reward accuracy;
* the prompt set ``toy:heldout`` - captions the pairs never use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from t2ialign.errors import UserFacingError

PREFIX = "toy:"
HELDOUT_PAIRS_SEED = 7_000  # far from the training pairs' seed, so no caption or image is shared


@dataclass
class ToyWorld:
    root: Path  # where pairs and aligned toy models are kept (reused across protocol runs)
    train_steps: int = 150
    num_pairs: int = 1024
    num_heldout_pairs: int = 256
    preference: Optional[str] = None  # the labeller; None = the demo's default
    pretrain_steps: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        self.root = Path(self.root)

    def settings(self):
        from t2ialign.toy.demo import DemoSettings

        return DemoSettings(output_dir=str(self.root), preference=self.preference, num_pairs=self.num_pairs,
                            train_steps=self.train_steps, seed=self.seed, pretrain_steps=self.pretrain_steps)

    def base(self) -> Path:
        from t2ialign.toy.pretrain import get_toy_pipeline

        return get_toy_pipeline(cache=True, **({"steps": self.pretrain_steps} if self.pretrain_steps else {}))

    def _pairs(self, name: str, num_pairs: int, seed: int) -> Path:
        from t2ialign.toy.pairs import build_preference_pairs
        from t2ialign.toy.preferences import DEFAULT_PREFERENCE

        out = self.root / name
        if (out / "train.parquet").is_file() and (out / "pairs_info.json").is_file():
            return out / "train.parquet"
        return build_preference_pairs(self.base(), out, preference=self.preference or DEFAULT_PREFERENCE,
                                      num_pairs=num_pairs, seed=seed)

    def pairs(self) -> Path:
        return self._pairs("pairs", self.num_pairs, self.seed)

    def heldout_pairs(self) -> Path:
        return self._pairs("heldout-pairs", self.num_heldout_pairs, self.seed + HELDOUT_PAIRS_SEED)

    def aligned(self, objective: str) -> Path:
        """The training export of ``objective`` at ``train_steps`` (trained now if it is not there yet)."""
        from t2ialign.config import load_train_config
        from t2ialign.toy.demo import train_config
        from t2ialign.training import train

        run_dir = self.root / "runs" / f"{objective}-{self.train_steps}"
        export = run_dir / "final"
        if (export / "export.json").is_file():
            return export
        raw = train_config(self.settings(), self.base(), self.pairs(), objective, run_dir, self.train_steps)
        return Path(train(load_train_config(data=raw)).export_dir)

    def prompts(self, name: str, limit: Optional[int]):
        from t2ialign.toy.demo import held_out_prompts

        if name != PREFIX + "heldout":
            raise UserFacingError(f"unknown toy prompt set {name!r}; the toy world has 'toy:heldout'")
        return held_out_prompts(limit or 128, self.seed)

    def resolve(self, reference: Optional[str]) -> Optional[str]:
        """A ``toy:`` reference -> a path; anything else is returned unchanged."""
        if not isinstance(reference, str) or not reference.startswith(PREFIX):
            return reference
        what = reference[len(PREFIX):]
        if what == "base":
            return str(self.base())
        if what == "pairs":
            return str(self.pairs())
        if what == "heldout-pairs":
            return str(self.heldout_pairs())
        from t2ialign.objectives import OBJECTIVES

        if what in OBJECTIVES:
            return str(self.aligned(what))
        raise UserFacingError(f"unknown toy reference {reference!r}; use toy:base, toy:pairs, toy:heldout-pairs or "
                              f"toy:<objective> ({', '.join(sorted(OBJECTIVES))})")

    def describe(self) -> dict:
        info = {"root": str(self.root), "train_steps": self.train_steps, "num_pairs": self.num_pairs, "seed": self.seed}
        pairs_info = self.root / "pairs" / "pairs_info.json"
        if pairs_info.is_file():
            info["pairs"] = json.loads(pairs_info.read_text()).get("preference")
        return info
