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
from typing import Mapping, Optional, Sequence

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
                 chunk: int = CHUNK, progress: bool = True, shard: Optional[tuple[int, int]] = None) -> dict[str, dict[str, float]]:
    """Scores of every row's image by every scorer, computing only chunks not yet in ``path``.

    ``shard=(rank, world)``: one process of a multi-process run scores only chunk c for c % world == rank (the
    chunks a single process would score, so the same values) and appends them to ``rank_path(path, rank)``;
    ``path`` is then only read (the caller merges the rank files into it: ``merge_scores``)."""
    rank, world = shard or (0, 1)
    done = read_scores(path)
    out = path if shard is None else rank_path(path, rank)
    if shard is not None:
        for f, s in read_scores(out).items():
            done.setdefault(f, {}).update(s)
    chunks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)][rank::world]
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
        with open(out, "ab") as handle:  # one write per chunk: a kill leaves whole lines or a torn last one
            handle.write("".join(json.dumps({"file": f, "scores": s}) + "\n" for f, s in new.items()).encode())
        for f, s in new.items():
            done.setdefault(f, {}).update(s)
        bar.update(len(part))
    bar.close()
    return done


def rank_path(path: Path, rank: int) -> Path:
    """Where process ``rank`` of a multi-process run appends its scores (``image_scores.rank1.jsonl``)."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def merge_scores(path: Path, order: Sequence[str]) -> dict[str, dict[str, float]]:
    """Fold every process's rank file into ``path`` (rewritten atomically, files in ``order`` first, then any
    others sorted), then remove the rank files; returns the merged scores. A kill at any moment loses nothing:
    until a rank file is removed, its rows are in it, and merging twice gives the same file."""
    done = read_scores(path)
    ranks = sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))
    if not ranks:
        return done
    for part in ranks:
        for f, s in read_scores(part).items():
            done.setdefault(f, {}).update(s)
    position = {f: i for i, f in enumerate(order)}
    files = sorted(done, key=lambda f: (position.get(f, len(position)), f))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes("".join(json.dumps({"file": f, "scores": done[f]}) + "\n" for f in files).encode())
    os.replace(tmp, path)
    for part in ranks:
        part.unlink()
    return {f: done[f] for f in files}
