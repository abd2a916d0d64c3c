"""Pick-a-Pic copies from the surviving mirrors: webdataset .tar shards read directly, and ``t2ialign data check``.

Real tar files with real JPEG bytes in the layout of the sayakpaul/pickapic_v2_webdataset mirror, and parquet
files in the Pick-a-Pic v2 schema (no mocks, no network)."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from t2ialign.cli import main as cli_main
from t2ialign.config import DataConfig
from t2ialign.data import BadRowReport, build_preference_pairs, load_preference_dataset
from t2ialign.data.check import Figure, check_copy
from t2ialign.data.synthetic import make_pickapic_rows, pickapic_schema, write_pickapic_tars
from t2ialign.errors import DataError

RES = 32
COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]


def config(path, **overrides) -> DataConfig:
    return DataConfig(dataset=str(path), resolution=RES, random_flip=False, **overrides)


def write_parquet(path, rows) -> None:
    clean = [{k: v for k, v in row.items() if k != "_images"} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(clean, schema=pickapic_schema(with_dual_captions=False)), path)


@pytest.fixture(scope="module")
def pairs_rows():
    rows, _ = make_pickapic_rows(14, seed=3, ties=2, with_dual_captions=False, image_size=[(64, 64), (80, 64)])
    return rows


# ---------------------------------------------------------------- tar shards as training data


def test_tar_shards_give_the_same_training_rows_as_parquet(pairs_rows, tmp_path):
    write_parquet(tmp_path / "pairs.parquet", pairs_rows)
    write_pickapic_tars(tmp_path / "shards", pairs_rows, shard_size=4)  # 4 shards, the last one short
    from_parquet = load_preference_dataset(config(tmp_path / "pairs.parquet"))
    for source in (tmp_path / "shards", f"{tmp_path}/shards/*.tar", sorted(map(str, (tmp_path / "shards").glob("*.tar")))):
        from_tar = load_preference_dataset(DataConfig(dataset=source, resolution=RES))
        assert len(from_tar) == len(from_parquet) == 12  # 14 pairs - 2 ties
        assert from_tar.select_columns(COLUMNS).to_list() == from_parquet.select_columns(COLUMNS).to_list()

    tar_pairs = build_preference_pairs(config(tmp_path / "shards"))
    parquet_pairs = build_preference_pairs(config(tmp_path / "pairs.parquet"))
    for i in range(len(parquet_pairs)):
        a, b = tar_pairs[i], parquet_pairs[i]
        assert a["caption"] == b["caption"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])  # the same JPEG bytes, winner first in both


def test_tar_shards_stream(pairs_rows, tmp_path):
    write_pickapic_tars(tmp_path / "shards", pairs_rows, shard_size=5)
    streamed = build_preference_pairs(config(f"{tmp_path}/shards/*.tar", streaming=True))
    samples = list(streamed)
    expected = [r["caption"] for r in pairs_rows if r["label_0"] != 0.5]
    assert [s["caption"] for s in samples] == expected
    assert samples[0]["pixel_values"].shape == (2, 3, RES, RES)


def test_corrupt_tar_members_are_bad_rows_not_crashes(pairs_rows, tmp_path):
    rows = [dict(r) for r in pairs_rows]
    clean = [i for i, r in enumerate(rows) if r["label_0"] != 0.5]
    rows[clean[1]]["jpg_1"] = rows[clean[1]]["jpg_1"][:40]  # truncated JPEG
    rows[clean[2]]["jpg_0"] = b"not an image at all"
    rows[clean[3]]["label_0"] = "one"  # an unreadable label member
    write_pickapic_tars(tmp_path / "shards", rows, shard_size=4)
    for streaming in (False, True):
        report = BadRowReport()
        pairs = build_preference_pairs(config(tmp_path / "shards", streaming=streaming), report=report)
        captions = [s["caption"] for s in (pairs if streaming else (pairs[i] for i in range(len(pairs))))]
        bad = {rows[i]["caption"] for i in clean[1:4]}
        assert not bad & set(captions) and len(set(captions)) == len(clean) - 3
        assert report.skipped["invalid_labels"] == 1
        assert sum(report.skipped.values()) == 3


def test_tar_split_names_and_errors(pairs_rows, tmp_path):
    write_pickapic_tars(tmp_path / "named", pairs_rows[:6], shard_size=3, prefix="train_")
    write_pickapic_tars(tmp_path / "named", pairs_rows[6:10], shard_size=4, prefix="test_unique_")
    assert len(load_preference_dataset(config(tmp_path / "named", split="test_unique", drop_ties=False))) == 4
    assert len(load_preference_dataset(config(tmp_path / "named", drop_ties=False))) == 6
    with pytest.raises(DataError, match="splits found from file names: test_unique, train"):
        load_preference_dataset(config(tmp_path / "named", split="validation"))
    with pytest.raises(DataError, match="no files match"):
        load_preference_dataset(config(f"{tmp_path}/nothing/*.tar"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "00000.tar").write_bytes(b"\0" * 100 + b"garbage" * 50)
    with pytest.raises(DataError, match="tar shards"):
        load_preference_dataset(config(tmp_path / "broken"))


def test_other_tar_layout_json_labels_and_column_mapping(pairs_rows, tmp_path):
    """A layout with <key>.prompt.txt, <key>.left.png / right.png and the labels in <key>.json."""
    (tmp_path / "other").mkdir()
    with tarfile.open(tmp_path / "other" / "a.tar", "w") as tar:
        for i, row in enumerate(pairs_rows[:5]):
            meta = json.dumps({"label_0": row["label_0"], "label_1": row["label_1"], "model_0": row["model_0"]}).encode()
            for field, data in (("prompt.txt", row["caption"].encode()), ("left.jpg", row["jpg_0"]),
                                ("right.jpg", row["jpg_1"]), ("json", meta)):
                info = tarfile.TarInfo(f"s{i:03d}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = config(tmp_path / "other", caption_column="prompt", image_columns=["left", "right"], drop_ties=False)
    rows = load_preference_dataset(cfg)
    assert rows["caption"] == [r["caption"] for r in pairs_rows[:5]]
    assert rows["jpg_1"] == [r["jpg_1"] for r in pairs_rows[:5]]
    assert rows["label_0"] == [r["label_0"] for r in pairs_rows[:5]]
    assert rows["model_0"] == [r["model_0"] for r in pairs_rows[:5]]


def test_test_unique_parquet_is_its_own_split(pairs_rows, tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001-abc.parquet", pairs_rows[:5])
    write_parquet(tmp_path / "data" / "test_unique-00000-of-00001-def.parquet", pairs_rows[5:8])
    assert len(load_preference_dataset(config(tmp_path, split="test", drop_ties=False))) == 5
    assert len(load_preference_dataset(config(tmp_path, split="test_unique", drop_ties=False))) == 3


# ---------------------------------------------------------------- data check


def expected_figures(rows) -> dict:
    ties = sum(r["label_0"] == 0.5 for r in rows)
    return {"pairs": len(rows), "ties": ties, "tie_share": ties / len(rows), "pairs_without_ties": len(rows) - ties,
            "unique_captions": len({r["caption"] for r in rows}),
            "unique_prompts_without_ties": len({r["caption"] for r in rows if r["label_0"] != 0.5})}


def test_check_parquet_copy_counts_and_flags(tmp_path, capsys):
    train, _ = make_pickapic_rows(30, seed=7, ties=4, with_dual_captions=False)
    test_unique, _ = make_pickapic_rows(6, seed=8, with_dual_captions=False)
    data = tmp_path / "pickapic_v2" / "data"
    write_parquet(data / "train-00000-of-00003-a1.parquet", train[:10])
    write_parquet(data / "train-00001-of-00003-b2.parquet", train[10:20])
    write_parquet(data / "train-00002-of-00003-c3.parquet", train[20:])
    write_parquet(data / "test_unique-00000-of-00001-d4.parquet", test_unique)

    report = check_copy(tmp_path / "pickapic_v2")
    assert report.splits == {"test_unique": expected_figures(test_unique), "train": expected_figures(train)}
    assert report.schema["jpg_0"] == "binary" and report.schema_problems == []
    assert any(p.startswith("train: 30 pairs; published ~959,000 (Hub dataset viewer") and
               p.endswith("your copy looks incomplete") for p in report.problems)
    assert any(p.startswith("train: 26 pairs without ties; published 851,293 (Wallace et al. 2023") for p in report.problems)
    assert any(p.startswith("test_unique: 6 pairs; published 500") for p in report.problems)
    assert not any("missing from the numbering" in p for p in report.problems)

    exact = {"train": {"pairs": Figure(30, "test"), "pairs_without_ties": Figure(26, "test")}}
    assert check_copy(tmp_path / "pickapic_v2", published=exact).problems == []

    (data / "train-00001-of-00003-b2.parquet").unlink()  # a shard that never finished downloading
    report = check_copy(data, published=exact)
    assert report.splits["train"]["pairs"] == 20
    assert "1 file(s) missing from the numbering of train-*: 00001" in report.problems
    assert "train: 20 pairs; published 30 (test): your copy looks incomplete" in report.problems

    no_images = tmp_path / "no_images.parquet"
    table = pq.read_table(data / "train-00000-of-00003-a1.parquet").drop_columns(["jpg_0", "jpg_1"])
    pq.write_table(table, no_images)
    assert any("jpg_0: images are not included" in p for p in check_copy(no_images).schema_problems)

    assert cli_main(["data", "check", str(data), "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "train: 20 pairs" in out
    assert "FLAG: 1 file(s) missing" in out
    assert json.loads((tmp_path / "r.json").read_text())["splits"]["train"]["pairs"] == 20


def test_check_tar_copy_counts_members_and_flags_a_missing_shard(tmp_path):
    rows, _ = make_pickapic_rows(17, seed=9, ties=3, with_dual_captions=False)
    shards = write_pickapic_tars(tmp_path / "wds", rows, shard_size=5)  # 00000..00003
    report = check_copy(tmp_path / "wds", published={})
    assert report.format == "webdataset .tar shards"
    assert report.splits == {"train": expected_figures(rows)}
    assert set(report.schema) == {"original_prompt.txt", "jpg_0.jpg", "jpg_1.jpg", "label_0.txt", "label_1.txt"}
    assert report.schema_problems == [] and report.problems == []
    assert "4 shards; the full webdataset mirror has 645" in report.notes[0]

    shards[1].unlink()
    report = check_copy(f"{tmp_path}/wds/*.tar", published={"train": {"pairs": Figure(17, "test")}})
    assert report.splits["train"]["pairs"] == 12
    assert "1 shard(s) missing from the numbering of *: 00001" in report.problems
    assert "train: 12 pairs; published 17 (test): your copy looks incomplete" in report.problems


def test_cache_from_tar_shards_equals_the_cache_from_parquet(tmp_path, tiny_sdxl_dir):
    """`t2ialign cache` reads the webdataset mirror's shards directly: the latents and text embeddings it
    stores are those of the same pairs written as parquet."""
    import yaml

    rows, _ = make_pickapic_rows(6, image_size=(40, 40), seed=3, with_dual_captions=False)  # the mirror has none
    write_pickapic_tars(tmp_path / "tars", rows, shard_size=4)
    pq.write_table(pa.Table.from_pylist(rows, schema=pickapic_schema()), tmp_path / "rows.parquet")
    caches = {}
    for name, dataset in (("tar", tmp_path / "tars"), ("parquet", tmp_path / "rows.parquet")):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"pretrained": str(tiny_sdxl_dir)}, "output_dir": str(tmp_path / "unused"), "report_to": "none",
            "data": {"dataset": str(dataset), "resolution": 32, "cache_dir": str(tmp_path / f"cache-{name}"),
                     "cache_dtype": "fp32", "cache_shard_size": 4, "cache_batch_size": 4},
            "progress_bar": False}))
        assert cli_main(["cache", str(config)]) == 0
        caches[name] = {p.relative_to(tmp_path / f"cache-{name}"): p.read_bytes()
                        for p in sorted((tmp_path / f"cache-{name}").rglob("*.safetensors"))}
    assert caches["tar"] and caches["tar"].keys() == caches["parquet"].keys()
    assert all(caches["tar"][k] == caches["parquet"][k] for k in caches["tar"]), "cached tensors differ"
