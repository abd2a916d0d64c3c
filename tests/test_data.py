"""t2ialign.data on real files written in the Pick-a-Pic v2 schema (no mocks, no network)."""
from __future__ import annotations

import io

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from t2ialign.config import DataConfig
from t2ialign.data import (
    BAD_ROW_KINDS, BadRowReport, IterablePreferencePairs, PairTransform, PreferencePairs, build_preference_pairs,
    collate_pairs, decode_image, load_preference_dataset, read_injected_rows, write_pickapic_parquet,
)
from t2ialign.data.badrows import INJECTED_KIND_TO_REASON
from t2ialign.data.synthetic import COLOURS
from t2ialign.errors import DataError

RES = 32


def config(path, **overrides) -> DataConfig:
    return DataConfig(dataset=str(path), resolution=RES, **overrides)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickapic")
    clean = write_pickapic_parquet(root / "clean.parquet", 24, ties=3, seed=1, image_size=[(64, 64), (96, 64), (64, 80)])
    bad = write_pickapic_parquet(root / "bad.parquet", 40, ties=1, seed=2, bad_rows={k: 1 for k in BAD_ROW_KINDS})
    return {"root": root, "clean": clean, "bad": bad}


# ---------------------------------------------------------------- loading


def test_load_parquet_file_directory_and_save_to_disk(files, tmp_path):
    from_file = load_preference_dataset(config(files["clean"]))
    assert len(from_file) == 21  # 24 rows - 3 ties
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "caption_0", "caption_1", "source_row"} <= set(
        from_file.column_names
    )
    assert isinstance(from_file[0]["jpg_0"], bytes)  # images stay encoded

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    write_pickapic_parquet(shard_dir / "part-0.parquet", 6, seed=3)
    write_pickapic_parquet(shard_dir / "part-1.parquet", 5, seed=4)
    assert len(load_preference_dataset(config(shard_dir))) == 11

    saved = datasets.Dataset.from_parquet(str(files["clean"]))
    saved = saved.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())  # decoding features
    saved.save_to_disk(str(tmp_path / "saved"))
    from_disk = load_preference_dataset(config(tmp_path / "saved"))
    assert len(from_disk) == 21
    sample = PreferencePairs(from_disk, PairTransform(RES))[0]  # Image features are read undecoded, then decoded by us
    assert sample["pixel_values"].shape == (2, 3, RES, RES)

    datasets.DatasetDict({"train": saved, "validation": saved.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_preference_dataset(config(tmp_path / "dict", split="validation"))) == 5 - sum(
        saved.select(range(5))["label_0"][i] == 0.5 for i in range(5)
    )
    with pytest.raises(DataError, match="available splits: train, validation"):
        load_preference_dataset(config(tmp_path / "dict", split="test"))

    arrow_file = next((tmp_path / "saved").glob("data-*.arrow"))
    assert len(load_preference_dataset(config(arrow_file))) == 21


def test_split_files_in_a_directory(tmp_path):
    write_pickapic_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", 7, seed=5)
    write_pickapic_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", 4, seed=6)
    assert len(load_preference_dataset(config(tmp_path, split="train"))) == 7
    assert len(load_preference_dataset(config(tmp_path, split="validation"))) == 4
    with pytest.raises(DataError, match="split 'test'"):
        load_preference_dataset(config(tmp_path, split="test"))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_preference_dataset(config(tmp_path / "nope.parquet"))


def test_column_mapping_with_renamed_columns(files, tmp_path):
    table = pq.read_table(files["clean"])
    renames = {"caption": "prompt", "jpg_0": "image_a", "jpg_1": "image_b", "label_0": "pref_a", "label_1": "pref_b",
               "caption_0": "text_a", "caption_1": "text_b"}
    renamed = table.rename_columns([renames.get(name, name) for name in table.column_names])
    pq.write_table(renamed, tmp_path / "renamed.parquet")
    cfg = config(
        tmp_path / "renamed.parquet", caption_column="prompt", image_columns=["image_a", "image_b"],
        label_columns=["pref_a", "pref_b"], image_caption_columns=["text_a", "text_b"],
    )
    mapped = load_preference_dataset(cfg)
    original = load_preference_dataset(config(files["clean"]))
    assert mapped.column_names == original.column_names
    assert mapped[3] == original[3]


@pytest.mark.parametrize(
    "override, column, key",
    [
        ({"caption_column": "prompt"}, "prompt", "data.caption_column"),
        ({"image_columns": ["jpg_0", "img_b"]}, "img_b", "data.image_columns"),
        ({"label_columns": ["label_0", "pref"]}, "pref", "data.label_columns"),
        ({"image_caption_columns": ["cap_a", "cap_b"]}, "cap_a", "data.image_caption_columns"),
    ],
)
def test_missing_column_names_the_config_key(files, override, column, key):
    with pytest.raises(DataError) as error:
        load_preference_dataset(config(files["clean"], **override))
    message = str(error.value)
    assert f"'{column}'" in message and key in message and "available columns: are_different" in message


def test_filters_ties_models_duplicates_and_max_rows(files):
    report = BadRowReport()
    rows = load_preference_dataset(config(files["bad"], min_image_size=16), report=report)
    injected = read_injected_rows(files["bad"])
    assert report.filtered == {"tie": len(injected["tie"]), "duplicate": 1}
    assert all((l0, l1) != (0.5, 0.5) for l0, l1 in zip(rows["label_0"], rows["label_1"]))

    with_ties = load_preference_dataset(config(files["bad"], drop_ties=False, drop_duplicates=False))
    assert len(with_ties) == 40

    models = load_preference_dataset(config(files["clean"], model_names=["sd-2.1", "sdxl-base-1.0"]))
    assert set(models["model_0"]) | set(models["model_1"]) <= {"sd-2.1", "sdxl-base-1.0"}
    assert 0 < len(models) < 21

    first = load_preference_dataset(config(files["clean"], max_rows=5, shuffle_seed=7))["source_row"]
    again = load_preference_dataset(config(files["clean"], max_rows=5, shuffle_seed=7))["source_row"]
    other = load_preference_dataset(config(files["clean"], max_rows=5, shuffle_seed=8))["source_row"]
    assert first == again and len(first) == 5 and first != other


def test_model_filter_without_model_columns_is_an_error(files, tmp_path):
    pq.write_table(pq.read_table(files["clean"]).drop_columns(["model_0", "model_1"]), tmp_path / "nomodel.parquet")
    with pytest.raises(DataError, match="model_0"):
        load_preference_dataset(config(tmp_path / "nomodel.parquet", model_names=["sd-2.1"]))


# ---------------------------------------------------------------- samples


def _centre_colour(pixels: torch.Tensor) -> tuple:
    centre = (pixels[:, RES // 2, RES // 2] + 1) * 127.5
    return tuple(centre.round().int().tolist())


def _close(colour_a, colour_b, tolerance=30) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour_a, colour_b))


def test_winner_first_for_both_label_orders(files):
    rows = load_preference_dataset(config(files["clean"]))
    assert {0.0, 1.0} <= set(rows["label_0"])  # both orders present
    pairs = PreferencePairs(rows, PairTransform(RES, random_flip=False))
    for position in range(len(pairs)):
        sample = pairs[position]
        record = rows[sample["index"]]
        # synthetic rule: the preferred image shows the caption's colour and has the caption as its own caption
        colour = COLOURS[sample["caption"].split()[1]]
        assert _close(_centre_colour(sample["pixel_values"][0]), colour)
        assert not _close(_centre_colour(sample["pixel_values"][1]), colour)
        assert sample["caption_w"] == sample["caption"] != sample["caption_l"]
        winner_caption = record["caption_0"] if record["label_0"] == 1.0 else record["caption_1"]
        assert sample["caption_w"] == winner_caption


def test_single_caption_datasets_use_the_prompt_for_both_images(tmp_path):
    path = write_pickapic_parquet(tmp_path / "single.parquet", 4, with_dual_captions=False)
    sample = PreferencePairs(load_preference_dataset(config(path)), PairTransform(RES))[0]
    assert sample["caption_w"] == sample["caption_l"] == sample["caption"]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_required_image_captions_missing_columns_is_one_line_error(tmp_path, streaming):
    """DCPO (require_image_captions) on a dataset without caption_0/caption_1: an error, not a silent DPO run."""
    path = write_pickapic_parquet(tmp_path / "single.parquet", 4, with_dual_captions=False)
    for cfg in (config(path, streaming=streaming), config(path, streaming=streaming, image_caption_columns=[])):
        with pytest.raises(DataError) as error:
            build_preference_pairs(cfg, require_image_captions=True)
        message = str(error.value)
        assert "\n" not in message and message.startswith("data.image_caption_columns: DCPO")
        assert "available columns: are_different" in message and "DCPO captions" in message
        if cfg.image_caption_columns:
            assert "'caption_0', 'caption_1'" in message
    others = build_preference_pairs(config(path, streaming=streaming))  # other objectives: as before
    assert len(list(others) if streaming else others) == 4


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_empty_image_caption_is_a_bad_row_only_when_required(tmp_path, streaming):
    path = write_pickapic_parquet(tmp_path / "holes.parquet", 8, seed=4, empty_image_captions=[2, 5])
    assert read_injected_rows(path) == {"empty_image_caption": [2, 5]}
    raw = pq.read_table(path).to_pylist()
    assert raw[2]["caption_0"] == "" and raw[5]["caption_1"] is None

    def samples(pairs):
        return list(pairs) if streaming else [pairs[i] for i in range(len(pairs))]

    required = build_preference_pairs(config(path, streaming=streaming), require_image_captions=True)
    got = samples(required)
    assert len(got) == 6 and all(s["own_captions"] for s in got)
    assert required.report.skipped == {INJECTED_KIND_TO_REASON["empty_image_caption"]: 2}
    assert sorted(required.report.examples["empty_image_caption"]) == [2, 5]
    used = {raw_row["caption"] for raw_row in raw}
    assert all(s["caption_w"] != "" and s["caption_l"] != "" and s["caption"] in used for s in got)

    relaxed = build_preference_pairs(config(path, streaming=streaming))  # DPO & co.: the prompt stands in, as before
    got = samples(relaxed)
    assert len(got) == 8 and relaxed.report.num_skipped == 0
    assert sum(not s["own_captions"] for s in got) == 2
    with pytest.raises(DataError, match=r"row 2.*: empty_image_caption: caption_0 .*data.image_caption_columns\[0\]"):
        samples(build_preference_pairs(config(path, streaming=streaming, strict=True), require_image_captions=True))


def _asymmetric_image(width: int, height: int) -> Image.Image:
    x = torch.linspace(0, 255, width).repeat(height, 1)
    y = torch.linspace(0, 255, height).unsqueeze(1).repeat(1, width)
    array = torch.stack([x, y, 255 - x], dim=-1).to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


def _reference_pixels(image: Image.Image, flip: bool, top: int, left: int) -> torch.Tensor:
    resized = TF.resize(image, RES, interpolation=TF.InterpolationMode.BILINEAR)
    if flip:
        resized = TF.hflip(resized)
    return TF.to_tensor(TF.crop(resized, top, left, RES, RES)) * 2 - 1


def test_centre_crop_time_ids_and_flip():
    wide = _asymmetric_image(96, 64)  # resized to 48 x 32: centre crop starts 8 px from the left
    plain = PairTransform(RES, random_crop=False, random_flip=False)(wide, wide, index=0)
    assert plain.original_sizes.tolist() == [[64, 96], [64, 96]]
    assert plain.crop_top_left.tolist() == [[0, 8], [0, 8]]
    assert torch.allclose(plain.pixel_values[0], _reference_pixels(wide, False, 0, 8), atol=1e-6)

    flipping = PairTransform(RES, random_crop=False, random_flip=True, seed=0)
    flips = [flipping(wide, wide, index=i) for i in range(12)]
    assert {pair.flipped for pair in flips} == {True, False}
    for pair in flips:
        assert pair.crop_top_left.tolist() == [[0, 8], [0, 8]]  # measured in the flipped image (diffusers #6547)
        assert torch.allclose(pair.pixel_values[1], _reference_pixels(wide, pair.flipped, 0, 8), atol=1e-6)
    assert all(p.pixel_values.min() >= -1 and p.pixel_values.max() <= 1 for p in flips)


def test_random_crop_is_shared_reproducible_and_varies_by_epoch():
    tall, other = _asymmetric_image(64, 128), _asymmetric_image(128, 64)
    transform = PairTransform(RES, random_crop=True, random_flip=True, seed=3)
    offsets = []
    for index in range(8):
        pair = transform(tall, tall, index=index)
        top, left = pair.crop_top_left[0].tolist()
        assert pair.crop_top_left[1].tolist() == [top, left]  # same size: one crop for both images
        assert left == 0 and 0 <= top <= 32  # resized to 32 x 64
        assert torch.allclose(pair.pixel_values[0], _reference_pixels(tall, pair.flipped, top, left), atol=1e-6)
        offsets.append(top)
    assert len(set(offsets)) > 1

    mixed = transform(tall, other, index=1)
    assert mixed.original_sizes.tolist() == [[128, 64], [64, 128]]
    assert mixed.crop_top_left[0, 1] == 0 and mixed.crop_top_left[1, 0] == 0

    same = PairTransform(RES, random_crop=True, random_flip=True, seed=3)(tall, other, index=1)
    assert torch.equal(same.pixel_values, mixed.pixel_values) and torch.equal(same.crop_top_left, mixed.crop_top_left)
    by_epoch = [transform(tall, tall, index=2, epoch=e).crop_top_left[0, 0].item() for e in range(8)]
    assert len(set(by_epoch)) > 1
    transform.set_epoch(5)
    assert transform(tall, tall, index=2).crop_top_left[0, 0].item() == by_epoch[5]


def test_collate_layout_is_winners_first(files):
    pairs = PreferencePairs(load_preference_dataset(config(files["clean"])), PairTransform(RES))
    samples = [pairs[i] for i in range(3)]
    batch = collate_pairs(samples)
    assert batch["pixel_values"].shape == (6, 3, RES, RES)
    for i, sample in enumerate(samples):
        assert torch.equal(batch["pixel_values"][i], sample["pixel_values"][0])
        assert torch.equal(batch["pixel_values"][3 + i], sample["pixel_values"][1])
        assert torch.equal(batch["original_sizes"][3 + i], sample["original_sizes"][1])
        assert torch.equal(batch["crop_top_left"][i], sample["crop_top_left"][0])
    assert batch["original_sizes"].shape == batch["crop_top_left"].shape == (6, 2)
    assert batch["original_sizes"].dtype == torch.long
    assert batch["captions"] == [s["caption"] for s in samples]
    assert batch["captions_w"] == [s["caption_w"] for s in samples]
    assert batch["captions_l"] == [s["caption_l"] for s in samples]
    assert batch["indices"].tolist() == [s["index"] for s in samples]


# ---------------------------------------------------------------- bad rows


def test_injected_bad_rows_are_counted_under_their_source_rows(files):
    cfg = config(files["bad"], min_image_size=16)
    pairs = build_preference_pairs(cfg)
    report = pairs.report
    samples = [pairs[i] for i in range(len(pairs))]  # decodes everything: no crash
    assert all(s["pixel_values"].shape == (2, 3, RES, RES) for s in samples)

    injected = read_injected_rows(files["bad"])
    expected: dict = {}
    for kind, rows in injected.items():
        expected.setdefault(INJECTED_KIND_TO_REASON[kind], []).extend(rows)
    assert report.filtered == {"tie": len(injected["tie"]), "duplicate": 1}
    for reason in ("undecodable_image", "tiny_image", "empty_caption", "invalid_labels"):
        assert report.skipped[reason] == len(expected[reason])
        assert sorted(report.examples[reason]) == sorted(expected[reason])
    for reason in ("converted_CMYK", "converted_P", "converted_L", "converted_RGBA"):
        assert report.converted[reason] == 1 and report.examples[reason] == expected[reason]
    lazily_bad = set(expected["undecodable_image"] + expected["tiny_image"])
    used_source_rows = {pairs.dataset[s["index"]]["source_row"] for s in samples}
    assert used_source_rows and not used_source_rows & lazily_bad
    assert "undecodable_image=2" in report.summary() and "converted 4" in report.summary()
    # every row was read: the dataset's summary is its report's, saying how many rows it covers
    assert pairs.bad_row_summary() == f"bad rows: {report.num_skipped} of {len(pairs.dataset)} rows read: {report.summary()}"


def test_ties_that_survive_are_skipped(files):
    cfg = config(files["clean"], drop_ties=False)
    pairs = build_preference_pairs(cfg)
    assert len(pairs) == 21 and pairs.report.skipped["tie"] == 3


def test_rgba_is_composited_on_white():
    transparent = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    buffer = io.BytesIO()
    transparent.save(buffer, "PNG")
    image, converted_from = decode_image(buffer.getvalue())
    assert converted_from == "RGBA" and image.mode == "RGB" and image.getpixel((5, 5)) == (255, 255, 255)


def test_strict_mode_names_the_row_and_the_problem(files):
    injected = read_injected_rows(files["bad"])
    empty_caption_row = injected["empty_caption"][0]
    with pytest.raises(DataError, match=rf"row \d+ \(source row {empty_caption_row}\): empty_caption"):
        build_preference_pairs(config(files["bad"], strict=True))  # metadata problems fail at construction

    rows = load_preference_dataset(config(files["bad"])).filter(lambda c: bool(c), input_columns="caption")
    rows = rows.filter(lambda a, b: a + b == 1, input_columns=["label_0", "label_1"])
    pairs = PreferencePairs(rows, PairTransform(RES), config(files["bad"], strict=True))
    first_undecodable = min(injected["truncated_jpeg"] + injected["undecodable"])
    with pytest.raises(DataError) as error:  # image problems fail when the row is read
        for i in range(len(pairs)):
            pairs[i]
    message = str(error.value)
    assert f"(source row {first_undecodable}): undecodable_image" in message and "data.strict" in message


def test_dataloader_yields_full_deterministic_batches(files):
    pairs = build_preference_pairs(config(files["bad"], min_image_size=16))
    batch_size = 5
    assert len(pairs) == 35  # 40 rows - 2 ties (1 + the injected one) - 1 duplicate - 1 empty caption - 1 invalid labels
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_pairs)
    first = list(loader)
    assert len(first) == 7  # 3 rows fail to decode, yet every batch is full: they are replaced
    assert all(b["pixel_values"].shape == (2 * batch_size, 3, RES, RES) for b in first)
    assert all(len(b["captions"]) == batch_size for b in first)
    events = [e for b in first for e in b["bad_rows"]]
    assert {reason for _, reason in events} >= {"undecodable_image", "tiny_image", "converted_CMYK"}
    second = list(loader)
    for a, b in zip(first, second):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_streaming_variant_skips_the_same_rows(files):
    cfg = config(files["bad"], streaming=True, min_image_size=16)
    pairs = build_preference_pairs(cfg)
    assert isinstance(pairs, IterablePreferencePairs)
    samples = list(pairs)
    mapped = build_preference_pairs(config(files["bad"], min_image_size=16))
    injected = read_injected_rows(files["bad"])
    lazily_bad = len(injected["truncated_jpeg"] + injected["undecodable"] + injected["tiny_image"])
    assert len(samples) == len(mapped) - lazily_bad
    assert pairs.report.skipped["duplicate"] == 1 and pairs.report.skipped["undecodable_image"] == 2
    batch = collate_pairs(samples[:2])
    assert batch["pixel_values"].shape == (4, 3, RES, RES)


def test_explicit_epoch_changes_augmentation_reproducibly(files):
    rows = load_preference_dataset(config(files["clean"]))
    pairs = PreferencePairs(rows, PairTransform(RES, random_crop=True, random_flip=True, seed=11))
    wide_row = next(i for i in range(len(pairs)) if Image.open(io.BytesIO(rows[int(pairs.good_rows[i])]["jpg_0"])).width == 96)
    draws = {epoch: pairs[(wide_row, epoch)] for epoch in range(8)}
    assert torch.equal(pairs[(wide_row, 3)]["pixel_values"], draws[3]["pixel_values"])
    assert len({tuple(d["crop_top_left"][0].tolist()) for d in draws.values()}) > 1  # 48 x 32 after resizing
    assert {d["index"] for d in draws.values()} == {draws[0]["index"]}


def test_unknown_hub_id_is_a_data_error():
    with pytest.raises(DataError, match="data.dataset"):
        load_preference_dataset(DataConfig(dataset="no-such-owner/no-such-dataset"))
