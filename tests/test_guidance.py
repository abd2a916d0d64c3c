"""RL guidance (t2ialign.guidance) on real tiny SDXL / SD pipelines: exactness at w = 0 / 1, the RLG
formula, batched vs sequential LoRA, one model at w = 0 / 1, per-step schedules, guidance_rescale."""
import copy
import json

import numpy as np
import pytest
import torch

from t2ialign.guidance import RLGError, RLGUNet, make_rlg_pipeline, rlg_pipeline
from t2ialign.models.lora import adapters_disabled, add_lora, save_lora_weights
from t2ialign.models.pipeline import load_pipeline

PROMPTS = ["a red bus on a bridge", "a cat"]
STEPS = 3
G = 5.0


def _perturb(params, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _sample(pipe, **kw):
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(len(PROMPTS), 4, 16, 16, generator=gen)
    args = dict(prompt=PROMPTS, latents=latents, height=32, width=32, num_inference_steps=STEPS, guidance_scale=G,
                output_type="np")
    args.update(kw)
    return pipe(**args).images


class CallCounter:
    """Forward hooks counting calls (and batch sizes) of modules."""

    def __init__(self, **modules):
        self.calls = {k: [] for k in modules}
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(module, args, output):
            self.calls[key].append(args[0].shape[0] if args else None)
        return hook

    def count(self, key):
        return len(self.calls[key])

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def base_pipe(tiny_sdxl_dir):
    return load_pipeline(str(tiny_sdxl_dir))


@pytest.fixture(scope="module")
def base_images(base_pipe):
    return _sample(base_pipe)


@pytest.fixture(scope="module")
def aligned_unet_dir(base_pipe, tmp_path_factory):
    """A full "aligned" UNet: the base UNet with perturbed weights, saved as a diffusers UNet directory."""
    unet = copy.deepcopy(base_pipe.unet)
    _perturb(unet.parameters(), 0.02, seed=1)
    path = tmp_path_factory.mktemp("aligned") / "unet"
    unet.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_dir(base_pipe, tmp_path_factory):
    """A LoRA on the base with non-zero B, saved in the diffusers format and read back by the loaders."""
    unet = copy.deepcopy(base_pipe.unet)
    add_lora(unet, rank=4)
    _perturb([p for n, p in unet.named_parameters() if "lora_B" in n], 0.3, seed=2)
    return save_lora_weights(unet, tmp_path_factory.mktemp("lora") / "lora", is_sdxl=True)


@pytest.fixture(scope="module")
def full_rlg(tiny_sdxl_dir, aligned_unet_dir):
    return make_rlg_pipeline(load_pipeline(str(tiny_sdxl_dir)), str(aligned_unet_dir), w=0.0)


@pytest.fixture(scope="module")
def lora_rlg(tiny_sdxl_dir, lora_dir):
    return make_rlg_pipeline(load_pipeline(str(tiny_sdxl_dir)), str(lora_dir), w=0.0)


@pytest.fixture(scope="module")
def unet_inputs(base_pipe):
    """UNet inputs for a CFG batch [uncond; cond] of 2 prompts (SDXL conditioning)."""
    cfg = base_pipe.unet.config
    gen = torch.Generator().manual_seed(3)
    n = 2 * len(PROMPTS)
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=torch.randn(n, 4, 16, 16, generator=gen),
        timestep=torch.tensor(601.0),
        encoder_hidden_states=torch.randn(n, 77, cfg.cross_attention_dim, generator=gen),
        added_cond_kwargs={"text_embeds": torch.randn(n, text_dim, generator=gen),
                           "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * n)},
    )


def _cfg(out, g=G):
    uncond, cond = out.chunk(2)
    return uncond + g * (cond - uncond)


def _raw(unet, inputs):
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


# ------------------------------------------------------------------ w = 0 / 1 are the base / aligned models

def test_full_unet_w0_w1_reproduce_base_and_aligned_with_one_model(full_rlg, base_images, tiny_sdxl_dir, aligned_unet_dir):
    rlg = full_rlg.unet
    counter = CallCounter(base=rlg.base, tuned=rlg.tuned)
    try:
        rlg.w = 0.0
        np.testing.assert_array_equal(_sample(full_rlg), base_images)
        assert (counter.count("base"), counter.count("tuned")) == (STEPS, 0)
        rlg.w = 1.0
        aligned_images = _sample(load_pipeline(str(tiny_sdxl_dir), aligned=str(aligned_unet_dir)))
        np.testing.assert_array_equal(_sample(full_rlg), aligned_images)
        assert (counter.count("base"), counter.count("tuned")) == (STEPS, STEPS)
        assert np.abs(aligned_images - base_images).max() > 1e-3  # the perturbation is visible
        rlg.w = 0.5
        mixed = _sample(full_rlg)
        assert (counter.count("base"), counter.count("tuned")) == (2 * STEPS, 2 * STEPS)
    finally:
        counter.remove()
        rlg.w = 0.0
    assert np.abs(mixed - base_images).max() > 1e-4 and np.abs(mixed - aligned_images).max() > 1e-4


def test_lora_w0_w1_reproduce_base_and_aligned_with_one_evaluation(lora_rlg, base_images, tiny_sdxl_dir, lora_dir):
    rlg = lora_rlg.unet
    assert rlg.is_lora and rlg.batched
    lora_b = next(m for n, m in rlg.base.named_modules() if n.endswith("lora_B.rlg_aligned"))
    counter = CallCounter(unet=rlg.base, lora_b=lora_b)
    n = 2 * len(PROMPTS)
    try:
        rlg.w = 0.0
        np.testing.assert_array_equal(_sample(lora_rlg), base_images)
        assert counter.calls["unet"] == [n] * STEPS and counter.count("lora_b") == 0  # adapter not evaluated
        rlg.w = 1.0
        aligned_images = _sample(load_pipeline(str(tiny_sdxl_dir), aligned=str(lora_dir)))
        np.testing.assert_array_equal(_sample(lora_rlg), aligned_images)
        assert counter.calls["unet"] == [n] * 2 * STEPS and counter.count("lora_b") == STEPS
        assert np.abs(aligned_images - base_images).max() > 1e-3
        rlg.w = 2.0
        extrapolated = _sample(lora_rlg)
        # one batched forward of the duplicated batch per step
        assert counter.calls["unet"][2 * STEPS:] == [2 * n] * STEPS
    finally:
        counter.remove()
        rlg.w = 0.0
    assert np.abs(extrapolated - base_images).max() > 1e-4 and np.abs(extrapolated - aligned_images).max() > 1e-4


# ------------------------------------------------------------------ the RLG formula

@pytest.mark.parametrize("w", [0.5, 2.0])
def test_full_unet_prediction_is_cfg_of_base_plus_w_delta(full_rlg, unet_inputs, w):
    rlg = full_rlg.unet
    pred_base, pred_tuned = _cfg(_raw(rlg.base, unet_inputs)), _cfg(_raw(rlg.tuned, unet_inputs))
    expected = pred_base + w * (pred_tuned - pred_base)
    rlg.w = w
    try:
        got = _cfg(_raw(rlg, unet_inputs))
    finally:
        rlg.w = 0.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (pred_tuned - pred_base).abs().max() > 1e-3


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_lora_batched_equals_sequential_and_formula(lora_rlg, unet_inputs, w):
    rlg = lora_rlg.unet
    unet = rlg.base
    with adapters_disabled(unet):
        pred_base = _cfg(_raw(unet, unet_inputs))
    pred_tuned = _cfg(_raw(unet, unet_inputs))
    expected = pred_base + w * (pred_tuned - pred_base)
    rlg.w = w
    try:
        batched = _raw(rlg, unet_inputs)
        rlg.batched = False
        sequential = _raw(rlg, unet_inputs)
    finally:
        rlg.w, rlg.batched = 0.0, True
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=0)
    torch.testing.assert_close(_cfg(batched), expected, atol=1e-5, rtol=1e-5)
    assert (pred_tuned - pred_base).abs().max() > 1e-3
    # the masks are gone afterwards: the shared UNet is the adapted model again
    torch.testing.assert_close(_cfg(_raw(unet, unet_inputs)), pred_tuned, atol=0, rtol=0)


def test_lora_batched_sampling_equals_sequential(lora_rlg):
    rlg = lora_rlg.unet
    rlg.w = 0.5
    try:
        batched = _sample(lora_rlg)
        rlg.batched = False
        sequential = _sample(lora_rlg)
    finally:
        rlg.w, rlg.batched = 0.0, True
    np.testing.assert_allclose(batched, sequential, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ schedules, refusals

def test_schedule_sets_w_per_step_for_any_scheduler(full_rlg):
    from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

    rlg = full_rlg.unet
    used = []
    handle = rlg.register_forward_hook(lambda module, args, output: used.append(module.last_w))
    original = full_rlg.scheduler
    rlg.schedule = [0.0, 0.5, 2.0]
    try:
        _sample(full_rlg)
        assert used == [0.0, 0.5, 2.0]
        used.clear()
        full_rlg.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        _sample(full_rlg)
        assert used == [0.0, 0.5, 2.0]
        used.clear()
        full_rlg.scheduler = HeunDiscreteScheduler.from_config(original.config)  # two evaluations per timestep
        _sample(full_rlg)
        assert used == [0.0, 0.5, 0.5, 2.0, 2.0]
        with pytest.raises(RLGError, match="one value per inference step"):
            _sample(full_rlg, num_inference_steps=4)
    finally:
        handle.remove()
        rlg.schedule = None
        full_rlg.scheduler = original


def test_guidance_rescale_is_refused(full_rlg):
    full_rlg.unet.w = 0.5
    try:
        with pytest.raises(RLGError, match="guidance_rescale"):
            _sample(full_rlg, guidance_rescale=0.7)
    finally:
        full_rlg.unet.w = 0.0


def test_wrapper_exposes_what_pipelines_read_and_rejects_the_rest(full_rlg, unet_inputs):
    rlg = full_rlg.unet
    assert rlg.config is rlg.base.config and rlg.dtype == torch.float32 and rlg.device.type == "cpu"
    assert rlg.add_embedding is rlg.base.add_embedding
    assert full_rlg.to("cpu") is full_rlg and full_rlg.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(rlg(**unet_inputs).sample, _raw(rlg.base, unet_inputs), atol=0, rtol=0)  # w = 0
    with pytest.raises(AttributeError, match="forwards"):
        rlg.enable_freeu
    with pytest.raises(RLGError, match="LoRA"):
        RLGUNet(copy.deepcopy(rlg.base))  # tuned=None needs adapters


def test_second_lora_on_the_same_base_is_refused(lora_rlg, lora_dir):
    base = lora_rlg.unet.base
    plain = type(lora_rlg)(**{**lora_rlg.components, "unet": base})
    with pytest.raises(RLGError, match="already carries LoRA"):
        make_rlg_pipeline(plain, str(lora_dir))


# ------------------------------------------------------------------ SD 1.x, config entry point, sweep

def test_sd15_v_prediction_ddim_w0_w1(tmp_path):
    from t2ialign.models.tiny import build_tiny_sd_pipeline

    sd_dir = build_tiny_sd_pipeline(tmp_path / "sd", prediction_type="v_prediction")
    base = load_pipeline(str(sd_dir))
    tuned = copy.deepcopy(base.unet)
    _perturb(tuned.parameters(), 0.02, seed=5)
    base_images = _sample(base)
    aligned_images = _sample(_aligned(sd_dir, tuned))
    rlg = make_rlg_pipeline(base, tuned, w=0.0)
    np.testing.assert_array_equal(_sample(rlg), base_images)
    rlg.unet.w = 1.0
    np.testing.assert_array_equal(_sample(rlg), aligned_images)


def _aligned(pipeline_dir, unet):
    pipe = load_pipeline(str(pipeline_dir))
    pipe.unet = unet
    return pipe


def test_rlg_pipeline_from_sample_config(tiny_sdxl_dir, lora_dir, base_images):
    from t2ialign.config import ConfigError, SampleConfig

    config = SampleConfig(pretrained=str(tiny_sdxl_dir), guide_with=str(lora_dir), rlg_scale=0.0,
                          num_inference_steps=STEPS, dtype="fp32", device="cpu")
    pipe, extra = rlg_pipeline(config, dtype=torch.float32, device="cpu")
    assert extra == {} and isinstance(pipe.unet, RLGUNet) and pipe.unet.is_lora
    np.testing.assert_array_equal(_sample(pipe, **extra), base_images)
    bad = SampleConfig(pretrained=str(tiny_sdxl_dir), guide_with=str(lora_dir), rlg_schedule=[1.0, 2.0],
                       num_inference_steps=STEPS)
    with pytest.raises(ConfigError, match="rlg_schedule"):
        rlg_pipeline(bad)


def test_rlg_sweep_writes_scores_and_plot(tiny_sdxl_dir, lora_dir, tmp_path):
    from t2ialign.config import SampleConfig
    from t2ialign.evaluation.prompts import PromptRecord
    from t2ialign.evaluation.sweep import rlg_sweep
    from t2ialign.scoring import FunctionScorer

    def brightness(images, prompts):
        return [float(np.asarray(im, dtype=np.float32).mean()) / 255.0 for im in images]

    config = SampleConfig(pretrained=str(tiny_sdxl_dir), guide_with=str(lora_dir), num_inference_steps=2,
                          batch_size=2, dtype="fp32", device="cpu", progress_bar=False)
    records = [PromptRecord(prompt=p) for p in PROMPTS]
    result = rlg_sweep(config, [0, 2], {"brightness": FunctionScorer("brightness", brightness)}, tmp_path / "sweep",
                       records=records)
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["scales"] == [0.0, 2.0] and set(saved["results"]) == {"0", "2"}
    for entry in saved["results"].values():
        s = entry["scores"]["brightness"]
        assert s["n"] == len(PROMPTS) and s["low"] <= s["mean"] <= s["high"]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    assert result["results"]["0"]["scores"]["brightness"]["mean"] == saved["results"]["0"]["scores"]["brightness"]["mean"]
    seeds = [[json.loads(l)["seed"] for l in (tmp_path / "sweep" / d / "metadata.jsonl").read_text().splitlines()]
             for d in ("w0", "w2")]
    assert seeds[0] == seeds[1]
    assert 0.0 <= saved["results"]["2"]["win_rate_vs_w0"]["brightness"]["win_rate"] <= 1.0


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "rlg"])
def test_sampler_compiles_and_converts_every_unet_it_runs(guided, tiny_sdxl_dir, aligned_unet_dir, tmp_path):
    """``t2ialign sample --compile --compile-mode reduce-overhead --channels-last``: both RLG models get the levers
    (compilation itself is lazy: it happens at the first denoising step)."""
    from t2ialign.config import ConfigError, load_sample_config
    from t2ialign.evaluation.sampling import build_sampler
    from t2ialign.models.speed import is_compiled

    overrides = [f"pretrained={tiny_sdxl_dir}", "compile=true", "compile_mode=reduce-overhead", "channels_last=true",
                 f"compile_cache_dir={tmp_path / 'inductor'}"]
    if guided:
        overrides.append(f"guide_with={aligned_unet_dir}")
    pipe, _ = build_sampler(load_sample_config(overrides=overrides), "cpu")
    unets = [pipe.unet.base, pipe.unet.tuned] if guided else [pipe.unet]
    for unet in unets:
        assert is_compiled(unet)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (tmp_path / "inductor").is_dir()
    with pytest.raises(ConfigError, match="compile_mode"):
        load_sample_config(overrides=["compile_mode=fastest"])


def test_full_aligned_unet_takes_the_half_precision_base_dtype(tiny_sdxl_dir, aligned_unet_dir, unet_inputs):
    """A full export saved in fp32 is loaded in the base's dtype: a bf16 base guides without a dtype clash."""
    from t2ialign.guidance import load_aligned_into

    base = load_pipeline(str(tiny_sdxl_dir), dtype=torch.bfloat16)
    aligned = load_aligned_into(base, str(aligned_unet_dir))
    assert {p.dtype for p in aligned.parameters()} == {torch.bfloat16}
    rlg = make_rlg_pipeline(base, aligned, w=1.5)
    inputs = {k: v.to(torch.bfloat16) for k, v in unet_inputs.items() if k in ("sample", "encoder_hidden_states")}
    inputs["added_cond_kwargs"] = {k: v.to(torch.bfloat16) for k, v in unet_inputs["added_cond_kwargs"].items()}
    out = _raw(rlg.unet, {**inputs, "timestep": unet_inputs["timestep"]})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
