"""RL guidance on the rectified-flow pipelines (real tiny StableDiffusion3Pipeline / FluxPipeline): exactness at
w = 0 / 1 with one model run, batched vs sequential LoRA, parity with an independent transcription of the RLG
authors' SD3 sampling loop (and the same formula written out for FLUX), SD3 skip-layer guidance and FLUX true
CFG, per-step schedules, training-export layouts, and ``t2ialign sample --guide-with`` / the sweep."""
import contextlib
import copy
import json

import numpy as np
import pytest
import torch

from t2ialign.errors import UserFacingError
from t2ialign.evaluation.sampling import initial_latents
from t2ialign.guidance import RLGError, RLGTransformer, make_rlg_pipeline
from t2ialign.models.pipeline import load_pipeline, resolve_aligned

PROMPTS = ["a red bus on a bridge", "a cat"]
SEEDS = [11, 12]
STEPS = 3
SIZE = 32  # pixels: 8x8 latents, 4x4 tokens after the 2x2 patches
GUIDANCE = {"sd3": 5.0, "flux": 3.5}  # SD3: two-branch CFG scale; FLUX.1-dev: the distilled guidance input
# LoRA targets of a training run on a transformer (PLAN.md): joint attention's image and context projections
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _perturb(params, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _write_export(run_dir, kind, family, base_dir):
    export = run_dir / "export"
    (export / "export.json").write_text(json.dumps({"kind": kind, "family": family, "base_model": str(base_dir)}))
    return export


def _full_export(pipe, family, base_dir, run_dir):
    """Training export of a full fine-tune: ``export/transformer`` (save_pretrained) + export.json."""
    transformer = copy.deepcopy(pipe.transformer)
    _perturb(transformer.parameters(), 0.05, seed=1)
    transformer.save_pretrained(run_dir / "export" / "transformer")
    return _write_export(run_dir, "transformer", family, base_dir)


def _lora_export(pipe, family, base_dir, run_dir):
    """Training export of a LoRA: the pipeline class's save_lora_weights of the peft state dict (B non-zero)."""
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = copy.deepcopy(pipe.transformer)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    _perturb([p for n, p in transformer.named_parameters() if "lora_B" in n], 0.3, seed=2)
    type(pipe).save_lora_weights(run_dir / "export" / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer))
    return _write_export(run_dir, "lora", family, base_dir)


class World:
    """A tiny pipeline directory of one family, its base pipeline and the two training exports."""

    def __init__(self, family, root):
        from t2ialign.models.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

        build = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}[family]
        self.family, self.g = family, GUIDANCE[family]
        self.dir = build(root / "pipeline")
        self.base = load_pipeline(str(self.dir))
        self.exports = {"full": _full_export(self.base, family, self.dir, root / "full"),
                        "lora": _lora_export(self.base, family, self.dir, root / "lora")}
        self.base_images = self.sample(self.base)
        self._aligned = {}

    def aligned(self, kind):
        """The aligned model as a plain pipeline (``load_pipeline(aligned=export)``)."""
        if kind not in self._aligned:
            self._aligned[kind] = load_pipeline(str(self.dir), aligned=str(self.exports[kind]))
        return self._aligned[kind]

    def rlg(self, kind, w=0.0, **kw):
        return make_rlg_pipeline(load_pipeline(str(self.dir)), str(self.exports[kind]), w=w, **kw)

    def latents(self, pipe):
        return initial_latents(pipe, SEEDS, SIZE, SIZE)

    def sample(self, pipe, output_type="np", **kw):
        args = dict(prompt=PROMPTS, latents=self.latents(pipe), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    guidance_scale=self.g, output_type=output_type)
        args.update(kw)
        with torch.no_grad():
            return pipe(**args).images


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = World(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


class CallCounter:
    """Forward hooks recording the batch size of each call of some modules."""

    def __init__(self, **modules):
        self.calls = {k: [] for k in modules}
        self.handles = [m.register_forward_hook(self._hook(k), with_kwargs=True) for k, m in modules.items()]

    def _hook(self, key):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            self.calls[key].append(x.shape[0])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------ w = 0 / 1 are the base / aligned models

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_transformer_w0_w1_are_base_and_aligned_with_one_model(worlds, family):
    world = worlds(family)
    pipe = world.rlg("full")
    rlg = pipe.transformer
    assert isinstance(rlg, RLGTransformer) and not rlg.is_lora
    counter = CallCounter(base=rlg.base, tuned=rlg.tuned)
    n = len(PROMPTS) * (2 if family == "sd3" else 1)  # SD3: [uncond; cond]; FLUX.1-dev: one distilled call
    try:
        np.testing.assert_array_equal(world.sample(pipe), world.base_images)
        assert counter.calls == {"base": [n] * STEPS, "tuned": []}
        rlg.w = 1.0
        aligned = world.sample(world.aligned("full"))
        np.testing.assert_array_equal(world.sample(pipe), aligned)
        assert counter.calls == {"base": [n] * STEPS, "tuned": [n] * STEPS}
        rlg.w = 0.5
        mixed = world.sample(pipe)
        assert counter.calls == {"base": [n] * 2 * STEPS, "tuned": [n] * 2 * STEPS}
    finally:
        counter.remove()
    assert np.abs(aligned - world.base_images).max() > 1e-3  # the perturbation is visible
    assert np.abs(mixed - world.base_images).max() > 1e-4 and np.abs(mixed - aligned).max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_w0_w1_are_base_and_aligned_with_one_forward(worlds, family):
    world = worlds(family)
    pipe = world.rlg("lora")
    rlg = pipe.transformer
    assert rlg.is_lora and rlg.batched
    lora_b = next(m for name, m in rlg.base.named_modules() if name.endswith("lora_B.rlg_aligned"))
    counter = CallCounter(model=rlg.base, lora_b=lora_b)
    n = len(PROMPTS) * (2 if family == "sd3" else 1)
    try:
        np.testing.assert_array_equal(world.sample(pipe), world.base_images)
        assert counter.calls["model"] == [n] * STEPS and counter.calls["lora_b"] == []  # adapter not evaluated
        rlg.w = 1.0
        aligned = world.sample(world.aligned("lora"))
        np.testing.assert_array_equal(world.sample(pipe), aligned)
        assert counter.calls["lora_b"] == [n] * STEPS
        rlg.w = 1.5
        world.sample(pipe)
        # one forward per step, on the duplicated batch [x; x] (base half masked, adapted half not)
        assert counter.calls["model"][2 * STEPS:] == [2 * n] * STEPS
    finally:
        counter.remove()
    assert np.abs(aligned - world.base_images).max() > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_batched_lora_equals_sequential(worlds, family):
    world = worlds(family)
    pipe = world.rlg("lora", w=0.5, batched=False)
    sequential = world.sample(pipe, output_type="latent")
    pipe.transformer.batched = True
    batched = world.sample(pipe, output_type="latent")
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)
    # the masks are gone after the batched calls: the shared transformer is the adapted model again
    pipe.transformer.w = 1.0
    torch.testing.assert_close(world.sample(pipe, output_type="latent"),
                               world.sample(world.aligned("lora"), output_type="latent"), atol=0, rtol=0)


def test_flux_position_ids_are_not_duplicated_even_when_their_length_is_the_batch(worlds):
    """FLUX's txt_ids / img_ids are (sequence, 3) without a batch: with 16 image tokens and a batch of 16 the batched
    LoRA forward must still duplicate only the batched inputs."""
    world = worlds("flux")
    rlg = world.rlg("lora", w=0.5).transformer
    config = rlg.config
    n, tokens, text = 16, 16, 5
    gen = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(n, tokens, config.in_channels, generator=gen),
                  encoder_hidden_states=torch.randn(n, text, config.joint_attention_dim, generator=gen),
                  pooled_projections=torch.randn(n, config.pooled_projection_dim, generator=gen),
                  timestep=torch.full((n,), 0.7), guidance=torch.full((n,), 3.5),
                  txt_ids=torch.zeros(text, 3), img_ids=torch.randn(tokens, 3, generator=gen))
    with torch.no_grad():
        batched = rlg(**inputs, return_dict=False)[0]
        rlg.batched = False
        sequential = rlg(**inputs).sample
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ parity with independently written loops

@contextlib.contextmanager
def _adapter_off(transformer):
    """What the authors' ``with self.transformer.disable_adapter():`` (a peft PeftModel) does, via diffusers' API."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def _tuned_untuned(world, kind):
    """(tuned, untuned, context making ``untuned`` the untuned model) in the authors' style: for a LoRA one
    transformer with its adapter switched off for the untuned call, for a full model the base transformer."""
    aligned = world.aligned(kind).transformer
    if kind == "lora":
        return aligned, aligned, lambda: _adapter_off(aligned)
    return aligned, world.base.transformer, contextlib.nullcontext


@torch.no_grad()
def authors_sd3_rlg(world, kind, w, zero_init_step=0):
    """Transcription of the RLG authors' SD3 loop (github.com/jinluo12345/Reinforcement-learning-guidance,
    rlg/diffusers_patch/sd3_pipeline_with_rlg.py lines 296-353, with scripts/generate.py's determistic=True):
    CFG of the tuned model, CFG of the untuned model (adapter disabled), ``untuned + w * (tuned - untuned)``
    (the tuned prediction alone for i < zero_init_step), then their sde_step_with_logprob in deterministic mode
    (rlg/diffusers_patch/sd3_sde_with_logprob.py lines 40-45, 68-69): step index from the scheduler's
    index_for_timestep, ``latents + (sigma_next - sigma) * pred`` in float32. Returns the final latents."""
    pipe = world.base
    tuned, untuned, untuned_ctx = _tuned_untuned(world, kind)
    prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, device="cpu")
    prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
    pooled = torch.cat([negative_pooled, pooled], dim=0)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS, device="cpu")
    latents = world.latents(pipe)
    for i, t in enumerate(scheduler.timesteps):
        latents_ori = latents.clone()
        latent_model_input = torch.cat([latents] * 2)
        timestep = t.expand(latent_model_input.shape[0])
        noise_pred = tuned(hidden_states=latent_model_input, timestep=timestep, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled, joint_attention_kwargs=None, return_dict=False)[0]
        noise_pred = noise_pred.to(prompt_embeds.dtype)
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + world.g * (noise_pred_text - noise_pred_uncond)
        latent_model_input = torch.cat([latents_ori] * 2)
        with untuned_ctx():
            noise_pred_untuned = untuned(hidden_states=latent_model_input, timestep=timestep,
                                         encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                                         joint_attention_kwargs=None, return_dict=False)[0]
        noise_pred_untuned = noise_pred_untuned.to(prompt_embeds.dtype)
        uncond_untuned, text_untuned = noise_pred_untuned.chunk(2)
        noise_pred_untuned = uncond_untuned + world.g * (text_untuned - uncond_untuned)
        rlg_guidance_direction = noise_pred - noise_pred_untuned
        if i >= zero_init_step:
            noise_pred = noise_pred_untuned + w * rlg_guidance_direction
        step_index = scheduler.index_for_timestep(t)
        dt = scheduler.sigmas[step_index + 1] - scheduler.sigmas[step_index]
        latents = (latents.float() + dt * noise_pred.float()).to(latents.dtype)
    return latents


@pytest.mark.parametrize("kind, w", [("full", 1.5), ("lora", 0.5)])
def test_sd3_matches_the_authors_rlg_loop(worlds, kind, w):
    world = worlds("sd3")
    pipe = world.rlg(kind, w=w)
    ours = world.sample(pipe, output_type="latent")
    theirs = authors_sd3_rlg(world, kind, w)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    base = world.sample(world.base, output_type="latent")
    assert (theirs - base).abs().max() > 1e-3  # w matters: the comparison is not base vs base


def test_sd3_authors_zero_init_step_is_a_schedule(worlds):
    """Their ``zero_init_step=k`` (tuned model alone for the first k steps) is the schedule [1] * k + [w] * rest."""
    world = worlds("sd3")
    pipe = world.rlg("full", schedule=[1.0, 1.5, 1.5])
    torch.testing.assert_close(world.sample(pipe, output_type="latent"),
                               authors_sd3_rlg(world, "full", 1.5, zero_init_step=1), atol=2e-5, rtol=1e-4)


@torch.no_grad()
def flux_rlg_reference(world, kind, w, true_cfg_scale=1.0):
    """The same formula written out for FluxPipeline's loop: velocities of the distilled-guided models (guidance as
    an input, t / 1000 as the timestep, packed latents with their position ids), optionally with true CFG
    ``neg + s * (pos - neg)`` per model, mixed as ``base + w * (aligned - base)``, then an Euler step."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = world.base
    tuned, untuned, untuned_ctx = _tuned_untuned(world, kind)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, device="cpu")
    neg_embeds, neg_pooled, neg_text_ids = pipe.encode_prompt(prompt=[""] * len(PROMPTS), prompt_2=None, device="cpu")
    latents = world.latents(pipe)
    side = 2 * (SIZE // (pipe.vae_scale_factor * 2))
    img_ids = pipe._prepare_latent_image_ids(len(PROMPTS), side // 2, side // 2, "cpu", latents.dtype)
    cfg = world.base.scheduler.config
    mu = calculate_shift(latents.shape[1], cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu, device="cpu")
    guidance = torch.full([len(PROMPTS)], world.g)

    def velocity(model, t, e, p, ids):
        return model(hidden_states=latents, timestep=t.expand(len(PROMPTS)) / 1000, guidance=guidance,
                     pooled_projections=p, encoder_hidden_states=e, txt_ids=ids, img_ids=img_ids,
                     joint_attention_kwargs=None, return_dict=False)[0]

    def guided(model, t):
        v = velocity(model, t, embeds, pooled, text_ids)
        if true_cfg_scale > 1:
            neg = velocity(model, t, neg_embeds, neg_pooled, neg_text_ids)
            v = neg + true_cfg_scale * (v - neg)
        return v

    for i, t in enumerate(scheduler.timesteps):
        v_tuned = guided(tuned, t)
        with untuned_ctx():
            v_base = guided(untuned, t)
        v = v_base + w * (v_tuned - v_base)
        latents = latents + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * v
    return latents


@pytest.mark.parametrize("kind, w", [("full", 1.5), ("lora", 0.5)])
def test_flux_matches_the_formula_on_distilled_velocities(worlds, kind, w):
    world = worlds("flux")
    ours = world.sample(world.rlg(kind, w=w), output_type="latent")
    reference = flux_rlg_reference(world, kind, w)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    assert (reference - world.sample(world.base, output_type="latent")).abs().max() > 1e-3


def test_flux_true_cfg_mixes_each_models_guided_velocity(worlds):
    world = worlds("flux")
    pipe = world.rlg("lora", w=1.5)
    ours = world.sample(pipe, output_type="latent", negative_prompt=[""] * len(PROMPTS), true_cfg_scale=2.0)
    torch.testing.assert_close(ours, flux_rlg_reference(world, "lora", 1.5, true_cfg_scale=2.0), atol=2e-5, rtol=1e-4)


@torch.no_grad()
def sd3_skip_layer_reference(world, kind, w, layers, scale):
    """SD3's skip-layer guidance per model, ``CFG + scale * (cond - cond_with_layers_skipped)`` (diffusers'
    StableDiffusion3Pipeline), then ``base + w * (aligned - base)``; every step skips (start 0, stop 1)."""
    pipe = world.base
    tuned, untuned, untuned_ctx = _tuned_untuned(world, kind)
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, device="cpu")
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS, device="cpu")
    latents = world.latents(pipe)

    def guided(model, t):
        n = len(PROMPTS)
        out = model(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2 * n),
                    encoder_hidden_states=torch.cat([neg_embeds, embeds]), pooled_projections=torch.cat([neg_pooled, pooled]),
                    return_dict=False)[0]
        uncond, cond = out.chunk(2)
        skipped = model(hidden_states=latents, timestep=t.expand(n), encoder_hidden_states=embeds,
                        pooled_projections=pooled, return_dict=False, skip_layers=layers)[0]
        return uncond + world.g * (cond - uncond) + scale * (cond - skipped)

    for i, t in enumerate(scheduler.timesteps):
        v_tuned = guided(tuned, t)
        with untuned_ctx():
            v_base = guided(untuned, t)
        latents = latents + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * (v_base + w * (v_tuned - v_base))
    return latents


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sd3_skip_layer_guidance_is_exact(worlds, kind):
    world = worlds("sd3")
    pipe = world.rlg(kind, w=1.5)
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_scale=2.0, skip_layer_guidance_start=-1.0,
               skip_layer_guidance_stop=1.0)
    ours = world.sample(pipe, output_type="latent", **slg)
    torch.testing.assert_close(ours, sd3_skip_layer_reference(world, kind, 1.5, [1], 2.0), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ schedules, wrapper surface, refusals

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_schedule_sets_w_per_step(worlds, family):
    """FLUX feeds t / 1000 to the model; the step comes from the pipeline's exact _current_timestep."""
    world = worlds(family)
    pipe = world.rlg("full", schedule=[0.0, 0.5, 2.0])
    used = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, output: used.append(module.last_w))
    try:
        world.sample(pipe, output_type="latent")
        assert used == [0.0, 0.5, 2.0]
        with pytest.raises(RLGError, match="one value per inference step"):
            world.sample(pipe, output_type="latent", num_inference_steps=4)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_wrapper_exposes_what_flow_pipelines_read(worlds, family):
    world = worlds(family)
    base = load_pipeline(str(world.dir))
    pipe = make_rlg_pipeline(base, str(world.exports["full"]), w=0.0)
    rlg = pipe.transformer
    assert rlg.base is base.transformer and rlg.config is rlg.base.config and rlg.dtype == torch.float32 and rlg.device.type == "cpu"
    assert pipe._execution_device.type == "cpu" and pipe.dtype == torch.float32
    assert pipe.to("cpu") is pipe and pipe.transformer is rlg
    assert pipe.vae is base.vae and pipe.scheduler is base.scheduler  # the other components are shared
    with rlg.cache_context("cond"):
        pass
    with pytest.raises(AttributeError, match="forwards"):
        rlg.fuse_qkv_projections
    with pytest.raises(RLGError, match="LoRA"):
        RLGTransformer(copy.deepcopy(rlg.base))  # tuned=None needs adapters


def test_exports_resolve_and_load_for_flow_pipelines(worlds):
    world = worlds("sd3")
    assert resolve_aligned(world.exports["full"]) == ("transformer", world.exports["full"] / "transformer")
    assert resolve_aligned(world.exports["full"] / "transformer") == ("transformer", world.exports["full"] / "transformer")
    assert resolve_aligned(world.exports["lora"]) == ("lora", world.exports["lora"] / "lora")
    aligned = world.aligned("full").transformer
    assert type(aligned).__name__ == "SD3Transformer2DModel" and aligned is not world.base.transformer
    # an SD3 export cannot guide (or be sampled on) a FLUX base: export.json names its family; without it, the class
    flux = worlds("flux")
    for kind in ("full", "lora"):
        with pytest.raises(UserFacingError, match="trained on a sd3 model.*FluxPipeline is flux"):
            make_rlg_pipeline(load_pipeline(str(flux.dir)), str(world.exports[kind]))
        with pytest.raises(UserFacingError, match="trained on a sd3 model"):
            load_pipeline(str(flux.dir), aligned=str(world.exports[kind]))
    with pytest.raises(RLGError, match="SD3Transformer2DModel.*same family"):
        make_rlg_pipeline(load_pipeline(str(flux.dir)), str(world.exports["full"] / "transformer"))


def test_second_lora_on_the_same_base_is_refused(worlds):
    world = worlds("sd3")
    pipe = world.rlg("lora")
    plain = type(pipe)(**{**pipe.components, "transformer": pipe.transformer.base})
    with pytest.raises(RLGError, match="already carries LoRA"):
        make_rlg_pipeline(plain, str(world.exports["lora"]))


# ------------------------------------------------------------------ sample / sweep entry points

def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def test_cli_sample_guide_with_on_a_tiny_sd3_pipeline(worlds, tmp_path):
    """``python -m t2ialign sample --guide-with EXPORT``: the images of make_rlg_pipeline at the same w and seeds."""
    from t2ialign.config import SampleConfig
    from t2ialign.evaluation.sampling import sample

    from helpers.runs import cli, ok

    world = worlds("sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = dict(pretrained=str(world.dir), prompts=str(prompts), num_inference_steps=2, resolution=SIZE, batch_size=2,
                  device="cpu", dtype="fp32", guidance_scale=world.g, progress_bar=False)
    ok(cli("sample", "--model", str(world.dir), "--guide-with", str(world.exports["lora"]), "--rlg-scale", "1.5",
           "--prompts", str(prompts), "--steps", "2", "--resolution", str(SIZE), "--batch-size", "2", "--device", "cpu",
           "--dtype", "fp32", "--guidance", str(world.g), "--out", str(tmp_path / "cli")))
    expected = sample(SampleConfig(**common, output_dir=str(tmp_path / "api")), pipe=world.rlg("lora", w=1.5))
    base = sample(SampleConfig(**common, output_dir=str(tmp_path / "base")), pipe=world.base)
    rows = [json.loads(line) for line in (tmp_path / "cli" / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:
        got = _png(tmp_path / "cli" / row["file"])
        np.testing.assert_array_equal(got, _png(expected / row["file"]))
        assert np.abs(got.astype(int) - _png(base / row["file"]).astype(int)).max() > 0
    recorded = json.loads((tmp_path / "cli" / "sample_config.json").read_text())
    assert recorded["guide_with"] == str(world.exports["lora"]) and recorded["rlg_scale"] == 1.5


def test_flux_sweep_w0_w1_are_the_base_and_aligned_samples(worlds, tmp_path):
    """``rlg_sweep`` (``t2ialign sweep``) on FLUX with a full export: packed initial latents from the per-image seeds,
    w = 0 the base's images and w = 1 the aligned model's (``sample --aligned``), pixel for pixel."""
    from t2ialign.config import SampleConfig
    from t2ialign.evaluation.prompts import PromptRecord
    from t2ialign.evaluation.sampling import sample
    from t2ialign.evaluation.sweep import rlg_sweep
    from t2ialign.scoring import FunctionScorer

    world = worlds("flux")
    records = [PromptRecord(prompt=p) for p in PROMPTS]
    common = dict(pretrained=str(world.dir), num_inference_steps=2, resolution=SIZE, batch_size=2, device="cpu",
                  dtype="fp32", guidance_scale=world.g, progress_bar=False)

    def brightness(images, prompts):
        return [float(np.asarray(im, dtype=np.float32).mean()) / 255.0 for im in images]

    config = SampleConfig(**common, guide_with=str(world.exports["full"]))
    rlg_sweep(config, [0, 1], {"brightness": FunctionScorer("brightness", brightness)}, tmp_path / "sweep",
              records=records, n_boot=50)
    base = sample(SampleConfig(**common, output_dir=str(tmp_path / "base")), records=records)
    aligned = sample(SampleConfig(**common, aligned=str(world.exports["full"]), output_dir=str(tmp_path / "aligned")),
                     records=records)
    for i in range(len(PROMPTS)):
        name = f"images/{i:05d}_0.png"
        np.testing.assert_array_equal(_png(tmp_path / "sweep" / "w0" / name), _png(base / name))
        np.testing.assert_array_equal(_png(tmp_path / "sweep" / "w1" / name), _png(aligned / name))
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["scales"] == [0.0, 1.0]


def test_max_sequence_length_reaches_flow_pipelines_and_is_refused_for_unet_ones(tmp_path, tiny_sdxl_dir):
    """SampleConfig.max_sequence_length: the T5 length a flow model was trained with; a UNet pipeline has no T5."""
    from t2ialign.config import ConfigError, load_sample_config
    from t2ialign.evaluation.prompts import PromptRecord
    from t2ialign.evaluation.sampling import sample
    from t2ialign.models.tiny_flow import build_tiny_sd3_pipeline

    sd3 = build_tiny_sd3_pipeline(tmp_path / "sd3")
    records = [PromptRecord("a small red circle at the top left")]
    images = {}
    for length in (8, 77):
        config = load_sample_config(data=dict(pretrained=str(sd3), output_dir=str(tmp_path / f"t5-{length}"), resolution=32,
                                              num_inference_steps=2, device="cpu", dtype="fp32", progress_bar=False,
                                              max_sequence_length=length))
        images[length] = (sample(config, records) / "images").iterdir().__next__().read_bytes()
    assert images[8] != images[77]  # the length reaches the pipeline's T5 (longer: more padding tokens attended)
    config = load_sample_config(data=dict(pretrained=str(tiny_sdxl_dir), output_dir=str(tmp_path / "sdxl"), resolution=32,
                                          num_inference_steps=2, device="cpu", dtype="fp32", progress_bar=False,
                                          max_sequence_length=16))
    with pytest.raises(ConfigError, match="max_sequence_length: StableDiffusionXLPipeline has no T5"):
        sample(config, records)
    with pytest.raises(ConfigError, match=r"max_sequence_length: T5 tokens in \(0, 512\]"):
        load_sample_config(data=dict(pretrained=str(sd3), max_sequence_length=1024))
