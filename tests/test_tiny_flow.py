"""Tiny SD3 / FLUX builders (t2ialign.models.tiny_flow): real classes, saved and reloaded from disk."""
import json
import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, T5Tokenizer

from t2ialign.models.tiny import pipeline_from_components
from t2ialign.models.tiny_flow import (
    build_t5_tokenizer,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    tiny_flux_components,
    tiny_sd3_components,
)

PROMPTS = ["a small red circle at the top left", "A blue square, bottom-right!"]
T5_LEN = 16  # max_sequence_length for the pipelines' T5 (their defaults, 256 / 512, only cost time)

FAMILIES = {
    "sd3": dict(
        build=build_tiny_sd3_pipeline,
        components=tiny_sd3_components,
        pipeline=StableDiffusion3Pipeline,
        models=dict(
            transformer=SD3Transformer2DModel,
            vae=AutoencoderKL,
            text_encoder=CLIPTextModelWithProjection,
            text_encoder_2=CLIPTextModelWithProjection,
            text_encoder_3=T5EncoderModel,
        ),
        vae_factors=(1.5305, 0.0609),
    ),
    "flux": dict(
        build=build_tiny_flux_pipeline,
        components=tiny_flux_components,
        pipeline=FluxPipeline,
        models=dict(
            transformer=FluxTransformer2DModel,
            vae=AutoencoderKL,
            text_encoder=CLIPTextModel,
            text_encoder_2=T5EncoderModel,
        ),
        vae_factors=(0.3611, 0.1159),
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def saved(family, tmp_path_factory):
    """(family spec, pipeline directory, the in-memory components it was saved from)."""
    spec = FAMILIES[family]
    directory = spec["build"](tmp_path_factory.mktemp(family) / "pipeline")
    return spec, directory, spec["components"]()


def _generate(pipeline, seed=0):
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipeline(
        PROMPTS, num_inference_steps=2, height=32, width=32, generator=generator,
        max_sequence_length=T5_LEN, output_type="pt",
    ).images


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


# ---------------------------------------------------------------- T5 tokenizer

def test_t5_tokenizer_follows_t5_conventions():
    tokenizer = build_t5_tokenizer()
    assert isinstance(tokenizer, T5Tokenizer) and tokenizer.model_max_length == 77
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    sentinels = tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"])
    assert sentinels == [len(tokenizer) - 1, len(tokenizer) - 100]  # T5: sentinels last, in reverse
    assert 2_000 < len(tokenizer) < 10_000

    ids = tokenizer(PROMPTS[0]).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "▁a", "▁small", "▁red", "▁circle", "▁at", "▁the", "▁top", "▁left", "</s>"
    ]
    # rarer / capitalised words split into known pieces (never <unk>) and decode back to the text
    for prompt in PROMPTS + ["Triangles, 3 GREEN cubes; café"]:
        ids = tokenizer(prompt).input_ids
        assert ids[-1] == 1 and 2 not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    assert tokenizer.convert_ids_to_tokens(tokenizer("circles").input_ids) == ["▁circle", "s", "</s>"]
    assert tokenizer("猫").input_ids[-2] == 2  # other scripts are unknown, as in T5

    padded = tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert padded.shape == (2, 77)
    length = len(tokenizer(PROMPTS[0]).input_ids)
    assert padded[0, length - 1] == 1 and (padded[0, length:] == 0).all()


def test_t5_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tokenizer = build_t5_tokenizer(max_length=16)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is T5Tokenizer and reloaded.model_max_length == 16
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    prompts = PROMPTS + ["Triangles, 3 GREEN cubes; café", "", "<extra_id_0> fills the blank"]
    kwargs = dict(padding="max_length", truncation=True)
    assert reloaded(prompts, **kwargs).input_ids == tokenizer(prompts, **kwargs).input_ids
    assert len(tokenizer(prompts[0] * 10, truncation=True).input_ids) == 16


# ---------------------------------------------------------------- saved pipelines

def test_saved_pipeline_reloads_with_the_component_classes(saved):
    spec, directory, components = saved
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == spec["pipeline"].__name__

    pipeline = DiffusionPipeline.from_pretrained(directory)
    assert type(pipeline) is spec["pipeline"]
    for name, cls in spec["models"].items():
        model = cls.from_pretrained(directory, subfolder=name)
        _assert_same_weights(model, components[name])
        _assert_same_weights(getattr(pipeline, name), components[name])
        assert list((directory / name).glob("*.safetensors")), name

    vae = pipeline.vae.config
    assert (vae.scaling_factor, vae.shift_factor) == spec["vae_factors"]
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(directory, subfolder="scheduler")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(scheduler.config) == public(components["scheduler"].config)
    t5_name = "tokenizer_3" if "tokenizer_3" in components else "tokenizer_2"
    t5 = AutoTokenizer.from_pretrained(directory, subfolder=t5_name)
    assert type(t5) is T5Tokenizer and t5(PROMPTS).input_ids == components[t5_name](PROMPTS).input_ids


def test_generation_matches_before_and_after_reload(saved):
    spec, directory, components = saved
    before = _generate(pipeline_from_components(components))
    after = _generate(DiffusionPipeline.from_pretrained(directory))
    assert before.shape == (2, 3, 32, 32) and torch.isfinite(before).all()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_builders_are_deterministic_in_seed(family):
    build = FAMILIES[family]["components"]
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for name in FAMILIES[family]["models"]:
        _assert_same_weights(a[name], b[name])
    assert not torch.equal(a["transformer"].proj_out.weight, c["transformer"].proj_out.weight)


# ---------------------------------------------------------------- conditioning shapes and schedules

def _t5_states(encoder, tokenizer, prompts, length):
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return encoder(ids)[0]


@torch.no_grad()
def test_sd3_encode_prompt_concatenates_clip_and_t5():
    components = tiny_sd3_components(text_hidden_sizes=(32, 48), text_projection_dims=(16, 24), t5_d_model=96)
    pipeline = pipeline_from_components(components)
    assert pipeline.transformer.config.joint_attention_dim == 96
    assert pipeline.transformer.config.pooled_projection_dim == 16 + 24
    embeds, _, pooled, _ = pipeline.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LEN
    )
    assert embeds.shape == (2, 77 + T5_LEN, 96) and pooled.shape == (2, 16 + 24)
    # CLIP penultimate states (32 + 48 wide) zero-padded to the T5 width, then the T5 states
    assert (embeds[:, :77, 80:] == 0).all()
    t5 = _t5_states(components["text_encoder_3"], components["tokenizer_3"], PROMPTS, T5_LEN)
    torch.testing.assert_close(embeds[:, 77:], t5)
    clip_g = components["text_encoder_2"](components["tokenizer_2"](
        PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    torch.testing.assert_close(pooled[:, 16:], clip_g.text_embeds)


@torch.no_grad()
def test_flux_encode_prompt_uses_clip_pooled_and_t5():
    components = tiny_flux_components()
    pipeline = pipeline_from_components(components)
    embeds, pooled, text_ids = pipeline.encode_prompt(PROMPTS, None, max_sequence_length=T5_LEN)
    assert embeds.shape == (2, T5_LEN, 32) and pooled.shape == (2, 32) and text_ids.shape == (T5_LEN, 3)
    t5 = _t5_states(components["text_encoder_2"], components["tokenizer_2"], PROMPTS, T5_LEN)
    torch.testing.assert_close(embeds, t5)
    clip = components["text_encoder"](components["tokenizer"](
        PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    torch.testing.assert_close(pooled, clip.pooler_output)
    config = pipeline.transformer.config
    assert config.in_channels == 4 * pipeline.vae.config.latent_channels  # 2x2 packed latents
    assert sum(config.axes_dims_rope) == config.attention_head_dim and config.guidance_embeds


def test_schedulers_follow_the_released_configs():
    n = 1000
    s = torch.arange(n, 0, -1, dtype=torch.float32) / n
    # SD3.5: the training sigmas are shifted by 3
    sd3 = tiny_sd3_components()["scheduler"]
    torch.testing.assert_close(sd3.sigmas, 3 * s / (1 + 2 * s))
    # FLUX.1-dev: unshifted training sigmas; sampling shifts by mu, linear in the packed sequence length
    flux = tiny_flux_components()
    torch.testing.assert_close(flux["scheduler"].sigmas, s)
    pipeline = pipeline_from_components(flux)
    _generate(pipeline)
    seq_len = (32 // 4 // 2) ** 2  # 32 px, 4x VAE, 2x2 packing
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    sampled = torch.tensor([1.0, 0.5])
    expected = math.exp(mu) / (math.exp(mu) + (1 / sampled - 1))
    torch.testing.assert_close(pipeline.scheduler.sigmas[:-1], expected)


def test_inconsistent_dimensions_are_refused():
    with pytest.raises(ValueError, match="T5 width"):
        tiny_sd3_components(text_hidden_sizes=(32, 32), t5_d_model=48)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        tiny_flux_components(axes_dims_rope=(4, 4, 4))
