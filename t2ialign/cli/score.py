"""``t2ialign score``: score model folders (images/ + metadata.jsonl) with preference scorers."""
from __future__ import annotations

import argparse

HELP = """Score the images of one or more model folders written by 't2ialign sample'.

  t2ialign score samples/base samples/dpo --scorers pickscore,hpsv21,clip,aesthetic,imagereward
  t2ialign score samples/dpo --scorers hpsv21 --scorer-path hpsv21=/ckpt/HPS_v2.1_compressed.pt

A model folder holds metadata.jsonl (one row per image: prompt, prompt_index, seed, file, category?)
and the image files. Scores go to <folder>/scores.jsonl (rows + "scores": {scorer: value}) and
<folder>/scores_meta.json; scores of other scorers already there are kept.
Scorers: pickscore, hpsv2 (v2.0), hpsv21 (v2.1), clip, aesthetic, imagereward, mps, vqascore, vqascorexl,
hpsv3 (Qwen2-VL-7B reward model; --scorer-path hpsv3=DIR with HPSv3.safetensors + Qwen2-VL-7B-Instruct json/txt files).
Weights are loaded by hub id (official repos) or from local paths given with --scorer-path NAME=PATH.
Offline, on the toy world's images: toy.vividness, toy.fidelity, toy.brightness, toy.centring, toy.size."""


def add_scorer_arguments(parser) -> None:
    parser.add_argument("--scorers", default="pickscore,hpsv21,clip,aesthetic,imagereward",
                        help="comma-separated scorer names (default: all)")
    parser.add_argument("--scorer-path", dest="scorer_paths", action="append", default=[], metavar="NAME=PATH",
                        help="weights of one scorer: local file/directory or hub id (repeatable)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="tower precision (default fp32, the official setting; bf16 agrees to a stated tolerance)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPU")
    parser.add_argument("--resize-on", dest="resize_on", default="cpu", choices=["cpu", "device"],
                        help="cpu: exact PIL preprocessing (default); device: resize on the GPU (faster, approximate)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=32)


def scorer_paths(specs) -> dict:
    from t2ialign.errors import UserFacingError

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserFacingError(f"--scorer-path wants NAME=PATH, got {spec!r}")
        out[name.strip()] = path.strip()
    return out


def scorer_kwargs(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, scorer_paths=scorer_paths(args.scorer_paths), batch_size=args.batch_size,
                tf32=args.tf32, resize_on=args.resize_on)


def run(args) -> int:
    from t2ialign.evaluation.folders import read_metadata
    from t2ialign.evaluation.recipes import _build_scorers, score_folder
    from t2ialign.evaluation.stats import model_means

    for folder in args.folders:  # fail on a bad folder before loading any weights
        read_metadata(folder)
    kw = scorer_kwargs(args)
    scorers = _build_scorers(args.scorers, kw.pop("device"), kw.pop("dtype"), kw.pop("scorer_paths"), kw.pop("batch_size"), **kw)
    tables = {}
    for folder in args.folders:
        tables[folder] = score_folder(folder, scorers)
    means = model_means(tables, [s.name for s in scorers], n_boot=0)
    names = [s.name for s in scorers]
    print("folder\t" + "\t".join(names))
    for folder, d in means.items():
        print(folder + "\t" + "\t".join(f"{d[n].estimate:.4f}" for n in names))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("score", help="score model folders with preference scorers",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="model folders (images/ + metadata.jsonl)")
    add_scorer_arguments(parser)
    parser.set_defaults(func=run)
