"""Reliability of data and inputs: every bad file a user can hand us is one line naming the file and the fix.

Dataset folders with mixed schemas, empty / schema-only / unreadable data files, output folders that are files,
disks that fill up during a save, binary prompt files, non-image files in a sample folder, invalid or malicious
scorer weights, tiny images, the bad-row summary of ``cache``, ``sample`` without ``--model`` and the dtype it
records. Real files on disk; real CLI subprocesses where the case is about the command line, ``cli.main``
in-process (same code path, exit code and stderr) where a save must be made to fail.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers.runs import cli, one_line_error
from PIL import Image

from t2ialign.config import DataConfig
from t2ialign.errors import DataError, UserFacingError

DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, message
    return message


def main_error(capsys, *argv) -> str:
    """``t2ialign ARGV`` in-process: exit 2 and exactly one ``error:`` line, no traceback."""
    from t2ialign.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def rewrite(path: Path, change) -> Path:
    """Rewrite a parquet file with ``change(table) -> table``."""
    pq.write_table(change(pq.read_table(path)), path)
    return path


def with_image(table: pa.Table, row: int, data: bytes) -> pa.Table:
    images = table["jpg_0"].to_pylist()
    images[row] = data
    return table.set_column(table.schema.get_field_index("jpg_0"), "jpg_0", pa.array(images, pa.binary()))


def jpeg(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def model_folder(root: Path, n: int = 3) -> Path:
    """A `t2ialign sample` output folder: images/ + metadata.jsonl."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / f"images/{i:05d}_0.png")
        rows.append({"prompt": f"prompt {i}", "prompt_index": i, "seed": i, "file": f"images/{i:05d}_0.png"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def cache_config(path: Path, tiny_sdxl_dir, dataset, cache_dir, **data) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"pretrained": str(tiny_sdxl_dir)},
        "data": {"dataset": str(dataset), "resolution": 32, "cache_dir": str(cache_dir), "cache_dtype": "fp32",
                 "cache_shard_size": 4, "cache_batch_size": 4, **data},
        "output_dir": str(path.parent / "unused_run"), "report_to": "none", "progress_bar": False,
    }))
    return path


# ---------------------------------------------------------------- 5. one schema per dataset


def _as_strings(table: pa.Table, column: str) -> pa.Table:
    values = pa.array([str(v) for v in table[column].to_pylist()])
    return table.set_column(table.schema.get_field_index(column), column, values)


SCHEMA_CASES = {
    "missing": (dict(with_dual_captions=False), None, "missing columns: caption_0, caption_1"),
    "extra": ({}, lambda t: t.append_column("aesthetic", pa.array([1.0] * t.num_rows)), "extra columns: aesthetic"),
    "types": ({}, lambda t: _as_strings(t, "label_0"), "different types: label_0 is string, not double"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_dataset_files_with_different_schemas_are_refused(tmp_path, case):
    """datasets used to merge these silently: missing columns became null, string labels were cast."""
    from t2ialign.data import load_preference_dataset, write_pickapic_parquet

    options, change, expected = SCHEMA_CASES[case]
    write_pickapic_parquet(tmp_path / "train-00000.parquet", 4, seed=0)
    odd = write_pickapic_parquet(tmp_path / "train-00001.parquet", 4, seed=1, **options)
    if change:
        rewrite(odd, change)
    with pytest.raises(DataError) as error:
        load_preference_dataset(DataConfig(dataset=str(tmp_path), resolution=16))
    message = one_line(error)
    assert f"{odd} has a different schema from train-00000.parquet ({expected})" in message, message
    assert "Fix: re-export train-00001.parquet" in message and f"move it out of {tmp_path}" in message


def test_cli_refuses_mixed_schemas_before_loading_a_model(tmp_path):
    """A DCPO folder where one file lacks per-image captions: refused in one line (no model exists at all)."""
    from t2ialign.data import write_pickapic_parquet

    data = tmp_path / "data"
    write_pickapic_parquet(data / "train-0.parquet", 4, seed=0)
    write_pickapic_parquet(data / "train-1.parquet", 4, seed=1, with_dual_captions=False)
    config = cache_config(tmp_path / "cache.yaml", tmp_path / "no_model", data, tmp_path / "cache")
    line = one_line_error(cli("cache", str(config), "--set", "objective.name=dcpo"))
    assert "train-1.parquet has a different schema from train-0.parquet (missing columns: caption_0, caption_1)" in line


# ---------------------------------------------------------------- 6. empty and unreadable data files


def test_empty_unreadable_and_row_less_data_files_are_one_line(tmp_path, pickapic_parquet):
    import datasets

    from t2ialign.data import build_preference_pairs

    def error_for(dataset) -> str:
        with pytest.raises(DataError) as error:
            build_preference_pairs(DataConfig(dataset=str(dataset), resolution=16))
        return one_line(error)

    table = pq.read_table(pickapic_parquet)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")  # was: pyarrow ArrowInvalid "Parquet file size is 0 bytes"
    assert error_for(empty).startswith(f"data.dataset: {empty} is not a readable .parquet file (Parquet file size is 0")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(Path(pickapic_parquet).read_bytes()[:1000])
    line = error_for(truncated)
    assert f"{truncated} is not a readable .parquet file" in line and "re-download or re-export it" in line
    schema_only = tmp_path / "schema_only.parquet"
    pq.write_table(table.slice(0, 0), schema_only)  # was: datasets DatasetGenerationError
    assert error_for(schema_only).startswith(f"data.dataset: {schema_only} has no rows")
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table, folder / "train-0.parquet")
    pq.write_table(table.slice(0, 0), folder / "train-1.parquet")
    assert f"{folder / 'train-1.parquet'} has no rows (a schema only); delete it" in error_for(folder)
    arrows = tmp_path / "arrows"
    arrows.mkdir()
    (arrows / "train.arrow").write_bytes(b"not arrow" * 10)
    assert f"{arrows / 'train.arrow'} is not a readable .arrow file" in error_for(arrows)
    saved = tmp_path / "saved"
    columns = {c: [] for c in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
    datasets.Dataset.from_dict(columns).save_to_disk(str(saved))
    assert error_for(saved).startswith(f"data.dataset: {saved} (split 'train') has no rows")


# ---------------------------------------------------------------- 6. output folders that are files


def test_output_dirs_that_are_files_are_one_line_before_any_work(tmp_path, capsys, tiny_sdxl_dir, pickapic_parquet):
    """sample, cache, eval and sweep stop before loading a model or scoring (the model path below does not exist)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    no_model = tmp_path / "no_model"
    line = main_error(capsys, "sample", "--model", no_model, "--prompts", prompts, "--out", blocker)
    assert line == f"error: output_dir (--out): {blocker} is a file, not a folder; choose another output_dir (--out) " \
                   "(or move the file away)"
    line = main_error(capsys, "sample", "--model", no_model, "--prompts", prompts, "--out", blocker / "sub")
    assert f"{blocker / 'sub'} lies under {blocker}, which is a file" in line
    config = cache_config(tmp_path / "cache.yaml", no_model, pickapic_parquet, blocker)
    assert main_error(capsys, "cache", config).startswith(f"error: data.cache_dir: {blocker} is a file, not a folder")
    folder = model_folder(tmp_path / "model")
    line = main_error(capsys, "eval", folder, "--scorers", "toy.brightness", "--out", blocker)
    assert line.startswith(f"error: --out: {blocker} is a file") and not (folder / "scores.jsonl").exists()
    line = main_error(capsys, "sweep", "--model", no_model, "--guide-with", no_model, "--prompts", prompts,
                      "--scales", "0,1", "--scorers", "toy.brightness", "--out", blocker)
    assert line.startswith(f"error: --out: {blocker} is a file")


# ---------------------------------------------------------------- 6. disk full during a save


def test_disk_full_during_a_cache_shard_save_keeps_the_finished_shards(tmp_path, capsys, monkeypatch, tiny_sdxl_dir):
    """The second shard's save fails as safetensors fails on a full disk; the first shard, build.json and nothing
    half-written remain; the rerun finishes the cache and prints the bad-row summary it covers (7.)."""
    import safetensors.torch
    from safetensors import SafetensorError

    from t2ialign.cli import main
    from t2ialign.data import write_pickapic_parquet

    parquet = write_pickapic_parquet(tmp_path / "rows.parquet", 10, seed=4, bad_rows={"undecodable": 2})
    rewrite(parquet, lambda t: with_image(t, 0, jpeg((1, 1))))  # tiny (1x1) although data.min_image_size is 0
    cache_dir = tmp_path / "cache"
    config = cache_config(tmp_path / "cache.yaml", tiny_sdxl_dir, parquet, cache_dir)
    real_save = safetensors.torch.save_file

    def save_on_a_full_disk(tensors, filename, metadata=None):
        if "shard-000001" not in filename:
            return real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 100)  # what a full disk leaves: a torn temporary file
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", save_on_a_full_disk)
    line = main_error(capsys, "cache", config)
    assert line.startswith(f"error: cannot write {cache_dir / 'shard-000001.safetensors'}: the disk is full; the shards "
                           "written before are intact, and a rerun keeps them and continues. Fix: free disk space"), line
    assert sorted(p.name for p in cache_dir.iterdir()) == ["build.json", "shard-000000.safetensors"]
    first = (cache_dir / "shard-000000.safetensors").read_bytes()

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert main(["cache", str(config)]) == 0
    out = capsys.readouterr().out
    assert (cache_dir / "shard-000000.safetensors").read_bytes() == first and (cache_dir / "manifest.json").is_file()
    # shard 0 was not read again: the summary says it covers only the rows this run read
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(r"bad rows: 2 of \d rows read \(of \d+; captions and labels of all were checked, images only "
                        r"of the rows read\): skipped 2 \(undecodable_image=2 rows \[\d, \d\]\)", summary), summary


def test_cache_prints_the_bad_row_summary_train_logs(tmp_path, capsys, tiny_sdxl_dir):
    """Undecodable and tiny rows, not only the load filters; the counts say which rows they cover."""
    from t2ialign.cli import main
    from t2ialign.data import write_pickapic_parquet

    parquet = write_pickapic_parquet(tmp_path / "rows.parquet", 8, seed=6, ties=1, bad_rows={"undecodable": 2})
    rewrite(parquet, lambda t: with_image(t, 0, jpeg((1, 1))))
    config = cache_config(tmp_path / "cache.yaml", tiny_sdxl_dir, parquet, tmp_path / "cache")
    assert main(["cache", str(config)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"bad rows: 3 of 7 rows read: filtered 1 \(tie=1\); skipped 3 \(tiny_image=1 rows \[0\], "
                        r"undecodable_image=2 rows \[\d, \d\]\)", summary), summary


def test_disk_full_during_sampling_keeps_earlier_images_and_records_the_dtype_used(tmp_path, monkeypatch, tiny_sdxl_dir):
    from t2ialign.config import SampleConfig
    from t2ialign.evaluation.prompts import PromptRecord
    from t2ialign.evaluation.sampling import sample

    out = tmp_path / "samples"
    config = SampleConfig(pretrained=str(tiny_sdxl_dir), output_dir=str(out), num_inference_steps=2, batch_size=1,
                          device="cpu", progress_bar=False)  # dtype: the default fp16, which a CPU never runs
    records = [PromptRecord(p, index=i) for i, p in enumerate(["a red circle", "a blue square", "a green triangle"])]
    real_save, saves = Image.Image.save, []

    def save_on_a_full_disk(image, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 2:
            Path(fp).write_bytes(b"\x89PNG")  # torn
            raise DISK_FULL
        return real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_on_a_full_disk)
    with pytest.raises(UserFacingError) as error:
        sample(config, records=records)
    assert one_line(error).startswith(f"cannot write {out / 'images/00001_0.png'}: the disk is full; the images and "
                                      "metadata.jsonl rows written before are intact, and a rerun continues from them")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000_0.png"]
    assert [json.loads(r)["file"] for r in (out / "metadata.jsonl").read_text().splitlines()] == ["images/00000_0.png"]
    recorded = json.loads((out / "sample_config.json").read_text())
    assert recorded["dtype"] == "fp32" and recorded["requested"] == {"device": "cpu", "dtype": "fp16"}

    monkeypatch.setattr(Image.Image, "save", real_save)
    sample(config, records=records)
    files = [json.loads(r)["file"] for r in (out / "metadata.jsonl").read_text().splitlines()]
    assert files == [f"images/{i:05d}_0.png" for i in range(3)]


def test_disk_full_while_writing_scores_keeps_the_previous_scores(tmp_path, monkeypatch):
    from t2ialign.evaluation import folders
    from t2ialign.evaluation.recipes import score_folder

    folder = model_folder(tmp_path / "model")
    score_folder(str(folder), "toy.brightness")
    before = (folder / "scores.jsonl").read_bytes()

    class FullDisk(io.StringIO):
        def write(self, text):
            raise DISK_FULL

    def open_on_a_full_disk(path, mode="r", **kwargs):
        if "w" not in mode:
            return open(path, mode, **kwargs)
        Path(path).write_text('{"torn')
        return FullDisk()

    monkeypatch.setattr(folders, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(UserFacingError) as error:
        score_folder(str(folder), "toy.size")
    assert one_line(error) == (f"cannot write {folder / 'scores.jsonl'}: the disk is full; the previous scores.jsonl "
                               "(if any) is intact. Fix: free disk space or choose a writable location, then run the "
                               "same command again")
    assert (folder / "scores.jsonl").read_bytes() == before and not (folder / "scores.jsonl.tmp").exists()


# ---------------------------------------------------------------- 6. prompts files and sample folders


def test_sample_cli_requires_model_and_refuses_a_binary_prompts_file(tmp_path, capsys):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(256)) * 4)  # was: UnicodeDecodeError
    line = one_line_error(cli("sample", "--prompts", str(binary), "--out", str(tmp_path / "out")))  # a real process
    assert line.startswith("error: --model: name the base pipeline to sample") and "no model is assumed" in line
    line = main_error(capsys, "sample", "--model", tmp_path / "m", "--prompts", binary, "--out", tmp_path / "o")
    assert line.startswith(f"error: prompts file {binary}: not UTF-8 text (byte 0x80 at offset 128)")
    assert "re-save it as UTF-8 text" in line and not (tmp_path / "o").exists()


def test_prompt_files_that_are_not_prompts_are_one_line(tmp_path):
    from t2ialign.cli.sample import config_from_args
    from t2ialign.evaluation.prompts import load_prompt_set

    for name, data, expected in [
        ("p.jsonl", b"\xff\xfe" + "a cat".encode("utf-16-le"), "not UTF-8 text"),
        ("p.tsv", b"Prompt\n\xc3\x28\n", "not UTF-8 text (byte 0xc3 at offset 7)"),
        ("p.txt", b"\0" * 64, "a binary file (it contains NUL bytes)"),
        ("p.json", b'{"prompts": [', "p.json:1: not valid JSON"),
        ("q.json", b'{"a": 1}', "expected a JSON list of prompts"),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as error:
            load_prompt_set(str(tmp_path / name))
        assert expected in one_line(error), (name, str(error.value))
    with pytest.raises(DataError, match="cannot read it"):
        load_prompt_set(str(tmp_path))  # a folder
    # pretrained in the --config file names the model as well as --model does
    config = tmp_path / "sample.yaml"
    config.write_text(yaml.safe_dump({"pretrained": "some/model"}))
    args = type("Args", (), {"config": str(config), "overrides": [], "model": None})()
    assert config_from_args(args).pretrained == "some/model"


def test_score_cli_names_a_non_image_file_and_keeps_the_scores(tmp_path):
    folder = model_folder(tmp_path / "model")
    ok_scores = '{"file": "images/00000_0.png", "scores": {"toy.brightness": 0.5}}\n'
    (folder / "scores.jsonl").write_text(ok_scores)
    (folder / "images/00001_0.png").write_text("this is a text file, not a PNG")  # was: UnidentifiedImageError
    line = one_line_error(cli("score", str(folder), "--scorers", "toy.brightness", "--device", "cpu"))
    assert line == (f"error: {folder / 'metadata.jsonl'}: images/00001_0.png is not an image PIL can read "
                    "(UnidentifiedImageError); nothing was scored and scores.jsonl is unchanged. Fix: delete that file "
                    "and rerun the same 't2ialign sample' command (it re-creates missing images), or correct the row's "
                    '"file"')
    assert (folder / "scores.jsonl").read_text() == ok_scores


# ---------------------------------------------------------------- 6. invalid or malicious scorer weights


class RunsCode:
    """A pickle payload: unpickling it runs a shell command (creates ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_weights(tmp_path: Path, marker: Path) -> dict:
    """kind -> (suffix, bytes): every way a weights file arrives broken or hostile."""
    from safetensors.torch import save

    good = save({"w": torch.zeros(64)})
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": RunsCode(marker)}, buffer)
    rng = random.Random(0)
    return {
        "truncated safetensors": (".safetensors", good[: len(good) // 2]),
        "random-bytes .pt": (".pt", rng.randbytes(4096)),
        "random-bytes .pth": (".pth", rng.randbytes(4096)),
        "pickle naming a disallowed global": (".pt", buffer.getvalue()),
        "empty file": (".pt", b""),
    }


def _write_weights(folder: Path, scorer: str, suffix: str, data: bytes) -> tuple:
    """Lay the bad file out where ``scorer`` looks for it; returns (path_or_id for get_scorer, file named)."""
    folder.mkdir(parents=True)
    if scorer in ("pickscore", "vqascore"):  # a from_pretrained-style directory
        if scorer == "pickscore":
            from t2ialign.scoring import tiny

            tiny.tiny_clip_model(seed=0).config.save_pretrained(folder)
        else:
            (folder / "config.json").write_text("{}")
        file = folder / ("model.safetensors" if suffix == ".safetensors" else "pytorch_model.bin")
        file.write_bytes(data)
        return str(folder), file
    file = folder / f"weights{suffix}"
    file.write_bytes(data)
    if scorer == "imagereward":
        (folder / "med_config.json").write_text("{}")
    return str(file), file


@pytest.mark.parametrize("scorer", ["aesthetic", "hpsv21", "imagereward", "mps", "pickscore", "vqascore", "hpsv3"])
def test_invalid_or_malicious_scorer_weights_never_suggest_an_unsafe_load(tmp_path, scorer):
    """PyTorch's own message says to retry with weights_only=False (which would run the payload); ours names the
    file, says it is not a valid, safe weights file, and gives the safe fixes."""
    from t2ialign.scoring import get_scorer
    from t2ialign.scoring.hpsv3 import load_state_dict_file

    marker = tmp_path / "payload_ran"
    for i, (kind, (suffix, data)) in enumerate(bad_weights(tmp_path, marker).items()):
        path_or_id, file = _write_weights(tmp_path / str(i), scorer, suffix, data)
        with pytest.raises(UserFacingError) as error:
            if scorer == "hpsv3":  # its loader fetches the Qwen2-VL config first, which is offline here
                load_state_dict_file(path_or_id)
            else:
                get_scorer(scorer, path_or_id, device="cpu")
        message = one_line(error)
        assert str(file) in message and "is not a valid, safe weights file" in message, (kind, message)
        assert re.search(r"Fix: download \S* ?again", message) and "Nothing in it was run" in message, (kind, message)
        assert "weights_only" not in message and "trust" not in message.split("Fix:")[0], (kind, message)
        assert not marker.exists(), f"{kind}: the payload ran"


def test_cli_score_with_a_malicious_scorer_file_is_one_line(tmp_path):
    folder = model_folder(tmp_path / "model")
    marker = tmp_path / "payload_ran"
    suffix, data = bad_weights(tmp_path, marker)["pickle naming a disallowed global"]
    weights = tmp_path / f"sac+logos+ava1-l14-linearMSE{suffix}"
    weights.write_bytes(data)
    line = one_line_error(cli("score", str(folder), "--scorers", "aesthetic", "--scorer-path", f"aesthetic={weights}",
                              "--device", "cpu"))
    assert line.startswith(f"error: aesthetic MLP: {weights} is not a valid, safe weights file (it is a pickle that "
                           "names the Python object posix.system"), line
    assert "weights_only" not in line and not marker.exists()


# ---------------------------------------------------------------- 7. tiny images and what summaries cover


def test_images_below_the_floor_are_bad_rows_whatever_min_image_size_says(tmp_path):
    from t2ialign.data import BadRow, build_preference_pairs, decode_image, write_pickapic_parquet
    from t2ialign.data.badrows import MIN_IMAGE_SIDE, TINY

    for size in [(1, 1), (7, 64), (64, 3)]:
        with pytest.raises(BadRow) as error:
            decode_image(jpeg(size), min_size=0)
        assert error.value.reason == TINY and f"below the {MIN_IMAGE_SIDE} px floor" in str(error.value)
    assert decode_image(jpeg((8, 8)), min_size=0)[0].size == (8, 8)
    with pytest.raises(BadRow, match="below data.min_image_size=16"):
        decode_image(jpeg((12, 12)), min_size=16)

    parquet = rewrite(write_pickapic_parquet(tmp_path / "rows.parquet", 6, seed=2), lambda t: with_image(t, 3, jpeg((1, 1))))
    pairs = build_preference_pairs(DataConfig(dataset=str(parquet), resolution=16, min_image_size=0))
    assert pairs.bad_row_summary() == "bad rows: 0 of 0 rows read (of 6; captions and labels of all were checked, " \
                                      "images only of the rows read)"
    pairs[0], pairs[3]
    assert pairs.bad_row_summary() == "bad rows: 1 of 3 rows read (of 6; captions and labels of all were checked, " \
                                      "images only of the rows read): skipped 1 (tiny_image=1 rows [3])"
    samples = [pairs[i] for i in range(len(pairs))]
    assert all(3 not in s["rows_read"][-1:] for s in samples)  # row 3 is never the row a sample used
    assert pairs.bad_row_summary() == "bad rows: 1 of 6 rows read: skipped 1 (tiny_image=1 rows [3])"


def test_mixed_precision_no_is_the_word_in_yaml_and_in_set(tmp_path):
    """YAML 1.1 reads `no` as False; `mixed_precision: no` (and --set mixed_precision=no) still means "no"."""
    from t2ialign.config import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  pretrained: x\ndata:\n  dataset: y\nmixed_precision: no\n")
    assert load_train_config(str(path)).mixed_precision == "no"
    path.write_text("model:\n  pretrained: x\ndata:\n  dataset: y\n")
    assert load_train_config(str(path), ["mixed_precision=no"]).mixed_precision == "no"


def test_train_into_an_output_dir_that_is_a_file_is_one_line(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    from helpers.runs import cli, one_line_error, write_config

    blocker = tmp_path / "out"
    blocker.write_text("my notes")
    config = write_config(tmp_path / "c.yaml", tiny_sdxl_dir, pickapic_parquet, blocker)
    line = one_line_error(cli("train", str(config)))
    assert f"output_dir: {blocker} is a file, not a folder" in line and blocker.read_text() == "my notes"


def test_train_summary_counts_the_bad_rows_dataloader_workers_met(tmp_path, tiny_sdxl_dir, caplog):
    """With data.num_workers > 0 the rows are read in worker processes; the end-of-training line still counts them."""
    import logging

    from t2ialign.config import load_train_config
    from t2ialign.data import write_pickapic_parquet
    from t2ialign.training import train

    parquet = write_pickapic_parquet(tmp_path / "rows.parquet", 8, seed=6, bad_rows={"undecodable": 2})
    from helpers.runs import write_config

    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", tiny_sdxl_dir, parquet, tmp_path / "run", max_steps=2,
                                      checkpoint_every=0).read_text())
    raw["data"]["num_workers"] = 2
    with caplog.at_level(logging.INFO, logger="t2ialign.training.loop"):
        train(load_train_config(data=raw))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert "undecodable_image=" in line and not line.startswith("data: bad rows: 0 "), line
