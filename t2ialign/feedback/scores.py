"""Per-image scores of a run, kept in ``image_scores.jsonl`` and safe to kill at any moment.

Images are scored in fixed chunks of the run's file list (the chunk boundaries depend only on the list and
the chunk size), and each chunk's rows are appended in one write; a torn last line is cut on restart. So
after a kill, a rerun scores exactly the missing chunks with the same batch composition as an uninterrupted
run, and the scores (hence the dataset bytes) come out identical.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from tqdm.auto import tqdm

from t2ialign.evaluation.recipes import _load_image

IMAGE_SCORES = "image_scores.jsonl"
CHUNK = 64


def read_scores(path: Path) -> dict[str, dict[str, float]]:
    """``{file: {scorer: score}}`` from the complete lines of ``path`` (a torn last line is cut off first)."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)  # a kill mid-append: the chunk is rescored
        data = data[: data.rfind(b"\n") + 1]
    out: dict[str, dict[str, float]] = {}
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["file"], {}).update(row["scores"])
    return out


def score_images(folder: Path, rows: Sequence[dict], scorers: Mapping[str, object], path: Path,
                 chunk: int = CHUNK, progress: bool = True) -> dict[str, dict[str, float]]:
    """Scores of every row's image by every scorer, computing only chunks not yet in ``path``."""
    done = read_scores(path)
    chunks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    todo = [(c, [n for n in scorers if not all(n in done.get(r["file"], {}) for r in c)]) for c in chunks]
    todo = [(c, names) for c, names in todo if names]
    bar = tqdm(total=sum(len(c) for c, _ in todo), desc="scoring", unit="img", disable=not progress)
    for part, names in todo:
        images = [_load_image(str(folder), r) for r in part]
        prompts = [r["prompt"] for r in part]
        new = {r["file"]: {} for r in part}
        for name in names:
            for r, v in zip(part, scorers[name].score(images, prompts).tolist()):
                new[r["file"]][name] = float(v)
        with open(path, "ab") as handle:  # one write per chunk: a kill leaves whole lines or a torn last one
            handle.write("".join(json.dumps({"file": f, "scores": s}) + "\n" for f, s in new.items()).encode())
        for f, s in new.items():
            done.setdefault(f, {}).update(s)
        bar.update(len(part))
    bar.close()
    return done
