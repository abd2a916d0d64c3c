"""t2ialign.models against the real diffusers / transformers / peft classes, on tiny offline models."""
import importlib.util
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from t2ialign.errors import ModelNotFoundError, UserFacingError
from t2ialign.models import (
    PromptEmbeddings,
    add_lora,
    adapters_disabled,
    build_clip_tokenizer,
    build_tiny_sd_pipeline,
    drop_prompts,
    encode_prompts,
    is_lora_model,
    load_components,
    load_unet,
    make_time_ids,
    save_lora_weights,
    set_attention_backend,
    unet_conditioning,
)

PROMPTS = ["a photo of a cat", "A red CUBE on the   blue sphere!!!", ""]


@pytest.fixture(scope="module")
def sdxl_dir(tiny_sdxl_dir):
    return tiny_sdxl_dir  # conftest's session fixture, built by build_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def sd_vpred_dir(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"), prediction_type="v_prediction")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load_components(sdxl_dir)


@pytest.fixture(scope="module")
def sdxl_pipeline(sdxl_dir):
    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _sdxl_inputs(components, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = components.unet.config.sample_size
    latents = torch.randn(batch, components.latent_channels, size, size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    embeds = encode_prompts(components, PROMPTS[:batch])
    pixels = size * components.vae_scale_factor
    time_ids = make_time_ids(torch.tensor([[pixels, pixels]] * batch), torch.zeros(batch, 2), (pixels, pixels))
    return latents, timesteps, unet_conditioning(True, embeds, time_ids)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    prompts = PROMPTS + ["Hello, World! it's 3.14 — naïve café", "an astronaut riding a horse, 4k, trending"]
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407
        assert ids[1:-1] == reference.encode(prompt), prompt
    # Fixed-length form: open_clip pads with 0 after <eot>, HF tokenizer 1 pads with <|endoftext|>.
    padded = tokenizer(prompts[0], padding="max_length", max_length=77, truncation=True).input_ids
    open_clip_ids = reference(prompts[0])[0].tolist()
    n = len(reference.encode(prompts[0])) + 2
    assert padded[:n] == open_clip_ids[:n] and set(padded[n:]) == {49407}
    assert len(tokenizer("word " * 200, truncation=True, max_length=77).input_ids) == 77


def test_sdxl_tokenizers_pad_like_the_released_repos(sdxl):
    tokenizer, tokenizer_2 = sdxl.tokenizers
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer_2.pad_token == "!"
    ids_2 = tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert ids_2[:4] == [49406, 320, 2368, 49407] and set(ids_2[4:]) == {0}


# ---------------------------------------------------------------- pipeline + loading

def test_tiny_sdxl_pipeline_samples(sdxl_pipeline):
    images = sdxl_pipeline(
        "a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (1, 32, 32, 3)
    assert (images >= 0).all() and (images <= 1).all()


def test_load_components_sdxl(sdxl, sdxl_dir):
    assert sdxl.is_sdxl and sdxl.prediction_type == "epsilon" and sdxl.source == str(sdxl_dir)
    assert len(sdxl.text_encoders) == 2 and len(sdxl.tokenizers) == 2
    assert type(sdxl.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"
    assert isinstance(sdxl.noise_scheduler, DDPMScheduler)
    assert sdxl.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert sdxl.vae_scale_factor == 2 and sdxl.latent_channels == 4
    for frozen in [sdxl.vae, *sdxl.text_encoders]:
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_load_components_without_weights_keeps_vae_shape(sdxl_dir):
    light = load_components(sdxl_dir, load_unet=False, load_vae=False, load_text_encoders=False)
    assert light.unet is None and light.vae is None and light.text_encoders == []
    assert light.tokenizers == [] and light.vae_scale_factor == 2 and light.latent_channels == 4


def test_encode_prompts_matches_sdxl_pipeline(sdxl, sdxl_pipeline):
    ours = encode_prompts(sdxl, PROMPTS)
    theirs, _, pooled, _ = sdxl_pipeline.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert ours.prompt_embeds.shape == (3, 77, 64) and ours.pooled_prompt_embeds.shape == (3, 32)
    torch.testing.assert_close(ours.prompt_embeds, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, atol=1e-6, rtol=0)
    as_parts = encode_prompts((sdxl.text_encoders, sdxl.tokenizers, True), PROMPTS)
    torch.testing.assert_close(as_parts.prompt_embeds, ours.prompt_embeds)


def test_time_ids_and_unet_conditioning(sdxl):
    time_ids = make_time_ids(torch.tensor([[512, 768], [1024, 1024]]), torch.tensor([[0, 16], [8, 0]]), (1024, 1024))
    expected = torch.tensor([[512, 768, 0, 16, 1024, 1024], [1024, 1024, 8, 0, 1024, 1024]], dtype=torch.float32)
    torch.testing.assert_close(time_ids, expected)
    latents, timesteps, kwargs = _sdxl_inputs(sdxl)
    assert set(kwargs) == {"encoder_hidden_states", "added_cond_kwargs"}
    with torch.no_grad():
        out = sdxl.unet(latents, timesteps, **kwargs).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        unet_conditioning(True, PromptEmbeddings(torch.zeros(1, 77, 64)), None)


def test_prompt_embeddings_helpers():
    embeds = PromptEmbeddings(torch.arange(2.0).view(2, 1, 1).expand(2, 77, 4), torch.arange(2.0).view(2, 1))
    doubled = embeds.repeat(2)
    assert len(doubled) == 4 and doubled.pooled_prompt_embeds.flatten().tolist() == [0, 1, 0, 1]
    assert len(PromptEmbeddings.cat([embeds, embeds[:1]])) == 3
    assert embeds.to("cpu", torch.float64).prompt_embeds.dtype == torch.float64


def test_drop_prompts_is_seeded():
    prompts = [f"p{i}" for i in range(200)]
    first = drop_prompts(prompts, 0.2, torch.Generator().manual_seed(0))
    assert first == drop_prompts(prompts, 0.2, torch.Generator().manual_seed(0))
    assert 20 < first.count("") < 60 and all(p in ("", q) for p, q in zip(first, prompts))
    assert drop_prompts(prompts, 0.0, torch.Generator()) == prompts
    assert set(drop_prompts(prompts, 1.0, torch.Generator())) == {""}


def test_sd_v_prediction_pipeline(sd_vpred_dir):
    sd = load_components(sd_vpred_dir)
    assert not sd.is_sdxl and sd.prediction_type == "v_prediction"
    assert len(sd.text_encoders) == 1 and len(sd.tokenizers) == 1
    assert sd.noise_scheduler.config.prediction_type == "v_prediction"
    ours = encode_prompts(sd, PROMPTS)
    assert ours.pooled_prompt_embeds is None
    pipeline = StableDiffusionPipeline.from_pretrained(sd_vpred_dir)
    theirs, _ = pipeline.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(ours.prompt_embeds, theirs, atol=1e-6, rtol=0)
    size = sd.unet.config.sample_size
    with torch.no_grad():
        out = sd.unet(torch.randn(3, 4, size, size), torch.tensor([1, 500, 999]), **unet_conditioning(False, ours, None))
    assert out.sample.shape == (3, 4, size, size)


def test_vae_override(sdxl_dir, tmp_path):
    override = AutoencoderKL(
        block_out_channels=(16, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16,
        latent_channels=4,
    )
    override.save_pretrained(tmp_path / "fp16-fix-vae")
    components = load_components(sdxl_dir, vae=str(tmp_path / "fp16-fix-vae"), load_unet=False, load_text_encoders=False)
    assert tuple(components.vae.config.block_out_channels) == (16, 16, 32)
    assert components.vae_scale_factor == 4 and not components.vae.training
    torch.testing.assert_close(components.vae.decoder.conv_out.weight, override.decoder.conv_out.weight)
    # A pipeline directory works as an override too (its vae/ subfolder is used).
    from_pipeline = load_components(sdxl_dir, vae=str(sdxl_dir), load_unet=False, load_text_encoders=False)
    assert from_pipeline.vae_scale_factor == 2
    with pytest.raises(ModelNotFoundError, match="no-such-vae"):
        load_components(sdxl_dir, vae=str(tmp_path / "no-such-vae"))


def test_load_unet_from_export_and_pipeline(sdxl, sdxl_dir, tmp_path):
    sdxl.unet.save_pretrained(tmp_path / "export")
    exported = load_unet(tmp_path / "export")
    from_pipeline = load_unet(str(sdxl_dir), dtype=torch.float16)
    assert from_pipeline.dtype == torch.float16
    torch.testing.assert_close(exported.conv_in.weight, sdxl.unet.conv_in.weight)


@pytest.mark.parametrize("where", ["missing_dir", "not_a_pipeline", "hub_id"])
def test_missing_model_is_one_clear_error(where, tmp_path):
    name = {
        "missing_dir": str(tmp_path / "nowhere"),
        "not_a_pipeline": str(tmp_path),
        "hub_id": "t2ialign-tests/does-not-exist",
    }[where]
    with pytest.raises(ModelNotFoundError) as info:
        load_components(name, local_files_only=True)
    message = str(info.value)
    assert name in message and len(message) < 500 and "\n" not in message
    assert isinstance(info.value, UserFacingError)
    with pytest.raises(ModelNotFoundError):
        load_unet(name, local_files_only=True)


def test_attention_backends(sdxl):
    set_attention_backend(sdxl.unet, "sdpa")
    assert {type(p).__name__ for p in sdxl.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    with pytest.raises(UserFacingError):
        set_attention_backend(sdxl.unet, "flash-magic")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(UserFacingError, match="xformers"):
            set_attention_backend(sdxl.unet, "xformers")


# ---------------------------------------------------------------- LoRA

@pytest.fixture()
def lora_unet(sdxl_dir):
    unet = load_unet(sdxl_dir)
    base_params = {name: p.detach().clone() for name, p in unet.named_parameters()}
    return unet, base_params


def _perturb_lora_b(trainable, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in trainable:
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_lora_init_identity_then_adapters_disabled(sdxl, lora_unet):
    unet, base_params = lora_unet
    latents, timesteps, kwargs = _sdxl_inputs(sdxl)
    with torch.no_grad():
        base = unet(latents, timesteps, **kwargs).sample
    assert not is_lora_model(unet)
    trainable = add_lora(unet, rank=4)
    assert is_lora_model(unet) and trainable
    assert all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in unet.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(unet(latents, timesteps, **kwargs).sample, base, atol=0, rtol=0)
        _perturb_lora_b(trainable)
        adapted = unet(latents, timesteps, **kwargs).sample
        assert (adapted - base).abs().max() > 1e-4
        wrapped = torch.nn.Module()
        wrapped.module = unet  # the shape of an accelerate / DDP wrapper
        with adapters_disabled(wrapped):
            torch.testing.assert_close(unet(latents, timesteps, **kwargs).sample, base, atol=1e-6, rtol=0)
        torch.testing.assert_close(unet(latents, timesteps, **kwargs).sample, adapted)
        with pytest.raises(RuntimeError), adapters_disabled(unet):
            raise RuntimeError("boom")
        torch.testing.assert_close(unet(latents, timesteps, **kwargs).sample, adapted)


def test_save_lora_weights_round_trip(sdxl, sdxl_dir, lora_unet, tmp_path):
    unet, _ = lora_unet
    trainable = add_lora(unet, rank=4, alpha=2.0)
    _perturb_lora_b(trainable, seed=1)
    latents, timesteps, kwargs = _sdxl_inputs(sdxl, seed=3)
    with torch.no_grad():
        adapted = unet(latents, timesteps, **kwargs).sample
    out_dir = save_lora_weights(unet, tmp_path / "lora", is_sdxl=True)
    assert (out_dir / "pytorch_lora_weights.safetensors").is_file()
    config = json.loads((out_dir / "lora_config.json").read_text())
    assert config["rank"] == 4 and config["alpha"] == 2.0 and "to_q" in config["target_modules"]
    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipeline.load_lora_weights(out_dir)
    with torch.no_grad():
        reloaded = pipeline.unet(latents, timesteps, **kwargs).sample
    torch.testing.assert_close(reloaded, adapted, atol=1e-5, rtol=1e-5)
