"""The toy world: generator, captioner, preferences, label noise, a tiny pretraining run, the pairs file."""
from __future__ import annotations

import json

import pytest
import torch

from t2ialign.errors import UserFacingError
from t2ialign.toy import preferences as prefs
from t2ialign.toy import world


# ------------------------------------------------------------------ world and captioner

def test_world_is_deterministic_for_a_seed():
    images_a, captions_a = world.sample_images(16, seed=3)
    images_b, captions_b = world.sample_images(16, seed=3)
    images_c, _ = world.sample_images(16, seed=4)
    assert torch.equal(images_a, images_b) and captions_a == captions_b
    assert not torch.equal(images_a, images_c)
    assert images_a.shape == (16, 3, 32, 32) and images_a.min() >= 0 and images_a.max() <= 1


def test_captioner_recovers_generating_attributes_on_clean_images():
    scenes = world.sample_attributes(400, seed=1)
    images = world.render_batch(scenes)
    assert world.describe(images) == [world.caption(a) for a in scenes]


@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("size", world.SIZES)
def test_captioner_tells_shapes_apart_at_both_sizes(shape, size):
    scene = world.Attributes(colour="blue", shape=shape, size=size, position="centre",
                             radius=world.SIZE_RANGES[size][0], vividness=0.25, background=0.3)
    assert world.detect_attributes(world.render(scene)[None])[0]["shape"] == shape


def test_captions_parse_and_round_trip():
    text = world.caption_of("purple", "triangle", "small", "bottom right")
    assert text == "a small purple triangle at the bottom right"
    assert world.parse_caption(text) == {"size": "small", "colour": "purple", "shape": "triangle", "position": "bottom right"}
    assert world.parse_caption("a photo of a cat") is None
    assert len(set(world.all_captions())) == 324


def test_blank_image_gets_the_blank_caption():
    blank = torch.full((1, 3, 32, 32), 0.2)
    assert world.describe(blank) == [world.BLANK_CAPTION]
    assert prefs.get_preference("fidelity")(blank, ["a large red circle at the centre"]).item() == 0.0


# ------------------------------------------------------------------ preferences

def _scene(**overrides) -> world.Attributes:
    base = dict(colour="red", shape="circle", size="large", position="centre", radius=8.0,
                centre_x=16.0, centre_y=16.0, vividness=0.6, background=0.15)
    return world.Attributes(**{**base, **overrides})


def _ranked(name: str, scenes: list, captions=None) -> list[float]:
    images = world.render_batch(scenes)
    captions = captions or [world.caption(s) for s in scenes]
    return prefs.get_preference(name)(images, captions).tolist()


def _strictly_increasing(values) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def test_vividness_ranks_saturation():
    assert _strictly_increasing(_ranked("vividness", [_scene(vividness=v) for v in (0.25, 0.5, 0.75, 1.0)]))


def test_brightness_ranks_background_shade():
    assert _strictly_increasing(_ranked("brightness", [_scene(background=b) for b in (0.0, 0.1, 0.2, 0.3)]))


def test_size_ranks_area():
    assert _strictly_increasing(_ranked("size", [_scene(radius=r) for r in (3.5, 5.0, 7.0, 8.5)]))


def test_centring_ranks_distance_from_centre():
    scenes = [_scene(size="small", radius=4.0, centre_x=x, centre_y=x) for x in (6.0, 10.0, 13.0, 16.0)]
    assert _strictly_increasing(_ranked("centring", scenes))


def test_fidelity_counts_matching_attributes():
    caption = "a large red circle at the centre"
    scenes = [
        _scene(colour="blue", shape="square", size="small", radius=4.0, centre_x=9.0, centre_y=9.0),  # 0 of 4
        _scene(colour="blue", shape="square", size="small", radius=4.0),  # position only
        _scene(colour="blue", shape="square"),  # position and size
        _scene(colour="blue"),  # all but colour
        _scene(),  # everything
    ]
    assert _ranked("fidelity", scenes, [caption] * 5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_unknown_preference_is_a_user_facing_error_listing_names():
    with pytest.raises(UserFacingError, match="vividness"):
        prefs.get_preference("beauty")


def test_preference_checks_its_inputs():
    with pytest.raises(ValueError, match="captions"):
        prefs.get_preference("size")(torch.zeros(2, 3, 32, 32), ["one caption"])


# ------------------------------------------------------------------ labels

def test_noise_free_labels_pick_the_higher_reward_and_tie_equal_ones():
    labels = prefs.sample_labels(torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.2, 0.3, 0.5]))
    assert labels.tolist() == [1.0, 0.0, 0.5]


def test_tie_margin_is_in_units_of_scale():
    r0, r1 = torch.tensor([0.50, 0.50]), torch.tensor([0.45, 0.30])
    labels = prefs.sample_labels(r0, r1, tie_margin=0.5, scale=0.2)  # ties within 0.1
    assert labels.tolist() == [0.5, 1.0]


def test_bradley_terry_noise_matches_the_sigmoid():
    n, gap, temperature, scale = 20000, 0.1, 1.0, 0.2
    r0, r1 = torch.full((n,), 0.5 + gap), torch.full((n,), 0.5)
    generator = torch.Generator().manual_seed(0)
    labels = prefs.sample_labels(r0, r1, temperature=temperature, scale=scale, generator=generator)
    expected = torch.sigmoid(torch.tensor(gap / (temperature * scale))).item()  # 0.622
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    assert abs(labels.mean().item() - expected) < 0.015


def test_more_noise_means_less_agreement_with_the_reward():
    generator = torch.Generator().manual_seed(1)
    r0, r1 = torch.rand(5000, generator=generator), torch.rand(5000, generator=generator)
    agreement = []
    for temperature in (0.0, 0.5, 5.0):
        labels = prefs.sample_labels(r0, r1, temperature=temperature, scale=0.2, generator=generator)
        agreement.append(((labels == 1.0) == (r0 > r1)).float().mean().item())
    assert agreement[0] == 1.0 and agreement[0] > agreement[1] > agreement[2] > 0.5


# ------------------------------------------------------------------ pretraining and pairs (tiny runs)

@pytest.fixture(scope="module")
def tiny_toy_pipeline(tmp_path_factory):
    from t2ialign.toy.pretrain import PretrainConfig, pretrain_toy_pipeline

    config = PretrainConfig(num_images=64, vae_steps=2, vae_batch_size=8, unet_steps=2, unet_batch_size=8,
                            heldout_images=8)
    return pretrain_toy_pipeline(tmp_path_factory.mktemp("toy") / "pipeline", config)


def test_pretraining_writes_a_loadable_sdxl_pipeline(tiny_toy_pipeline):
    from diffusers import StableDiffusionXLPipeline

    info = json.loads((tiny_toy_pipeline / "toy_info.json").read_text())
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_toy_pipeline)
    assert pipeline.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    assert pipeline.tokenizer.model_max_length == 16 and not pipeline.config.force_zeros_for_empty_prompt
    images = pipeline(["a small red circle at the top left"], num_inference_steps=2, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_cache_key_follows_settings_and_env(monkeypatch, tmp_path):
    from t2ialign.toy.pretrain import PretrainConfig, toy_cache_dir

    monkeypatch.setenv("T2IALIGN_CACHE", str(tmp_path))
    assert toy_cache_dir(PretrainConfig()).parent == tmp_path / "toy"
    assert toy_cache_dir(PretrainConfig()) == toy_cache_dir(PretrainConfig())
    assert toy_cache_dir(PretrainConfig(unet_steps=7)) != toy_cache_dir(PretrainConfig())


def test_cached_pipeline_is_reused_without_training(monkeypatch, tmp_path, tiny_toy_pipeline):
    import shutil

    from t2ialign.toy import pretrain

    monkeypatch.setenv("T2IALIGN_CACHE", str(tmp_path))
    shutil.copytree(tiny_toy_pipeline, pretrain.toy_cache_dir())
    monkeypatch.setattr(pretrain, "pretrain_toy_pipeline", lambda *a, **k: pytest.fail("retrained a cached model"))
    assert pretrain.get_toy_pipeline() == pretrain.toy_cache_dir()


def test_pairs_builder_writes_a_pickapic_dataset(tiny_toy_pipeline, tmp_path):
    import datasets

    from t2ialign.toy.pairs import build_preference_pairs

    path = build_preference_pairs(tiny_toy_pipeline, out_dir=tmp_path / "pairs", preference="brightness", num_pairs=6,
                                  num_inference_steps=2, save_to_disk=True, seed=1)
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    for column in ("jpg_0", "jpg_1", "label_0", "label_1", "caption", "caption_0", "caption_1", "model_0", "model_1",
                   "best_image_uid", "image_0_uid", "image_1_uid", "ranking_id", "user_id"):
        assert column in rows.column_names
    assert len(rows) == 6 and set(rows["model_0"]) == {"toy-base"}
    from t2ialign.toy.pairs import DISK_DIR_NAME

    assert len(datasets.load_from_disk(str(tmp_path / "pairs" / DISK_DIR_NAME))) == 6
    import io

    from PIL import Image

    for row in rows:
        assert row["label_0"] + row["label_1"] == 1.0 and row["label_0"] in (0.0, 0.5, 1.0)
        winner = None if row["label_0"] == 0.5 else row["reward_0"] > row["reward_1"]
        assert winner is None or winner == (row["label_0"] == 1.0)  # noise-free labels follow the reward
        assert Image.open(io.BytesIO(row["jpg_0"])).size == (32, 32)
        assert row["caption_0"] == world.BLANK_CAPTION or world.parse_caption(row["caption_0"]) is not None


def test_cli_registers_toy_commands(capsys):
    from t2ialign.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["toy", "pairs", "--preference", "size", "--num-pairs", "8", "--label-noise", "0.5"])
    assert (args.preference, args.num_pairs, args.label_noise) == ("size", 8, 0.5) and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["toy", "pairs", "--preference", "beauty"])
