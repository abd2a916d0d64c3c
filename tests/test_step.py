"""The training step on real tiny models: DCPO conditioning order, v-prediction targets, InPO, reference-free runs."""
import copy
import gc
import io
import math

import pytest
import torch
import torch.utils._python_dispatch

from t2ialign.models.loading import load_components
from t2ialign.models.text_encoding import encode_prompts
from t2ialign.objectives import get_objective, objective_params
from t2ialign.training.step import StepModels, preference_step


def make_batch(components, num_pairs=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = components.unet.config.sample_size
    latents = torch.randn(2 * num_pairs, components.latent_channels, size, size, generator=generator)
    captions = [f"a red circle number {i}" for i in range(num_pairs)]
    return {
        "latents": latents,
        "captions": captions,
        "captions_w": [f"a bright red circle {i}" for i in range(num_pairs)],
        "captions_l": [f"a dull blue square {i}" for i in range(num_pairs)],
        "original_sizes": torch.tensor([[40, 48]] * (2 * num_pairs)),
        "crop_top_left": torch.tensor([[4, 8]] * (2 * num_pairs)),
    }


def step_models(components, reference=True):
    ref = None
    if reference:
        ref = type(components.unet).from_config(components.unet.config)
        ref.load_state_dict(components.unet.state_dict())
        with torch.no_grad():  # a reference that differs from the policy makes the loss non-trivial
            for p in ref.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return StepModels(components.unet, components.unet, ref, components)


def independent_errors(unet, components, batch, captions_2b, seed, resolution):
    """Section 0 written out by hand: shared eps and t per pair, target by prediction type."""
    generator = torch.Generator().manual_seed(seed)
    z0 = batch["latents"]
    num_pairs = z0.shape[0] // 2
    eps = torch.randn(z0[:num_pairs].shape, generator=generator).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (num_pairs,), generator=generator).repeat(2)
    abar = components.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
    target = eps if components.prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * z0
    embeds = encode_prompts(components, captions_2b)
    kwargs = {"encoder_hidden_states": embeds.prompt_embeds}
    if components.is_sdxl:
        time_ids = torch.tensor([[40.0, 48.0, 4.0, 8.0, resolution, resolution]] * (2 * num_pairs))
        kwargs["added_cond_kwargs"] = {"text_embeds": embeds.pooled_prompt_embeds, "time_ids": time_ids}
    with torch.no_grad():
        pred = unet(zt, t, **kwargs).sample
    return ((pred - target) ** 2).mean(dim=(1, 2, 3))


def independent_dpo(m, r, beta):
    m_w, m_l = m.chunk(2)
    r_w, r_l = r.chunk(2)
    return -torch.log(torch.sigmoid(beta / 2 * ((r_w - r_l) - (m_w - m_l)))).mean()


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_components(str(tiny_sdxl_dir))


@pytest.fixture(scope="module")
def sd_vpred(tmp_path_factory):
    from t2ialign.models.tiny import build_tiny_sd_pipeline

    path = build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe", prediction_type="v_prediction")
    return load_components(str(path))


@pytest.mark.parametrize("name", ["dcpo", "dpo"])
def test_sdxl_step_matches_hand_written_elbo_and_caption_order(sdxl, name):
    spec = get_objective(name)
    batch = make_batch(sdxl)
    models = step_models(sdxl)
    with torch.no_grad():
        out = preference_step(models, spec, objective_params(spec, 50.0, {}), batch, resolution=32, prompt_dropout=0.0,
                              generator=torch.Generator().manual_seed(7))
    captions = batch["captions_w"] + batch["captions_l"] if name == "dcpo" else batch["captions"] * 2
    m = independent_errors(models.policy, sdxl, batch, captions, seed=7, resolution=32)
    r = independent_errors(models.reference, sdxl, batch, captions, seed=7, resolution=32)
    assert torch.allclose(out.metrics["model_err_w"], m.chunk(2)[0].mean(), rtol=1e-5)
    assert torch.allclose(out.metrics["ref_err_l"], r.chunk(2)[1].mean(), rtol=1e-5)
    assert torch.allclose(out.loss, independent_dpo(m, r, 50.0), rtol=1e-5)


def test_dcpo_on_sd_v_prediction_uses_velocity_target_and_own_captions(sd_vpred):
    assert sd_vpred.prediction_type == "v_prediction" and not sd_vpred.is_sdxl
    spec = get_objective("dcpo")
    batch = make_batch(sd_vpred)
    models = step_models(sd_vpred)
    with torch.no_grad():
        out = preference_step(models, spec, objective_params(spec, 50.0, {}), batch, resolution=32, prompt_dropout=0.0,
                              generator=torch.Generator().manual_seed(3))
    captions = batch["captions_w"] + batch["captions_l"]
    m = independent_errors(models.policy, sd_vpred, batch, captions, seed=3, resolution=32)
    r = independent_errors(models.reference, sd_vpred, batch, captions, seed=3, resolution=32)
    assert torch.allclose(out.loss, independent_dpo(m, r, 50.0), rtol=1e-5)
    swapped = batch["captions_l"] + batch["captions_w"]
    m_swapped = independent_errors(models.policy, sd_vpred, batch, swapped, seed=3, resolution=32)
    assert not torch.allclose(m, m_swapped), "conditioning order must matter for this check to mean anything"


def test_sft_trains_on_winners_only(sdxl):
    spec = get_objective("sft")
    batch = make_batch(sdxl)
    models = step_models(sdxl, reference=False)
    with torch.no_grad():
        out = preference_step(models, spec, {}, batch, resolution=32, prompt_dropout=0.0, generator=torch.Generator().manual_seed(1))
    m = independent_errors(models.policy, sdxl, batch, batch["captions"] * 2, seed=1, resolution=32)
    assert torch.allclose(out.loss, m.chunk(2)[0].mean(), rtol=1e-5)


def test_inpo_step_is_finite_differentiable_and_ln2_at_init(sdxl):
    spec = get_objective("inpo")
    batch = make_batch(sdxl)
    reference = type(sdxl.unet).from_config(sdxl.unet.config)
    reference.load_state_dict(sdxl.unet.state_dict())
    models = StepModels(sdxl.unet, sdxl.unet, reference, sdxl)
    out = preference_step(models, spec, objective_params(spec, None, {}), batch, resolution=32, prompt_dropout=0.0,
                          generator=torch.Generator().manual_seed(0))
    assert abs(out.loss.item() - math.log(2)) < 1e-4  # policy == reference
    out.loss.backward()
    grads = [p.grad for p in sdxl.unet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    sdxl.unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("setting, first", [(None, -99), ("zero", 0)])
def test_inpo_first_inverse_step_feeds_the_unet_the_authors_timestep(sdxl, setting, first):
    """The authors' trainer evaluates the policy at t = -99 on its first inverse step (diffusers 0.20 grid)."""
    spec = get_objective("inpo")
    batch = make_batch(sdxl)
    seen = []
    hook = sdxl.unet.register_forward_pre_hook(lambda module, args: seen.append(int(torch.as_tensor(args[1]).reshape(-1)[0])))
    params = {} if setting is None else {"inversion_first_timestep": setting}
    try:
        with torch.no_grad():
            preference_step(StepModels(sdxl.unet, sdxl.unet, None, sdxl), spec, objective_params(spec, None, params),
                            batch, resolution=32, prompt_dropout=0.0, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen[0] == first and first not in seen[1:]  # later calls: the grid's positive sources


@pytest.fixture(scope="module")
def odd_sized_pairs(tmp_path_factory):
    """A real parquet whose images are neither square nor at the training resolution, and its dataset."""
    from t2ialign.config import DataConfig
    from t2ialign.data import build_preference_pairs, write_pickapic_parquet

    path = write_pickapic_parquet(tmp_path_factory.mktemp("odd") / "odd.parquet", 4, seed=5, image_size=[(96, 64), (64, 80)])
    return path, build_preference_pairs(DataConfig(dataset=str(path), resolution=32, random_flip=False))


def measured_time_ids_by_hand(path, pairs, indices, resolution):
    """[h, w, top, left, R, R] from the stored JPEGs: shortest side resized to R, centre crop (winners, then losers)."""
    import pyarrow.parquet as pq
    from PIL import Image

    raw = pq.read_table(path).to_pylist()
    rows = []
    for index in indices:
        width, height = Image.open(io.BytesIO(raw[pairs.dataset[index]["source_row"]]["jpg_0"])).size
        short, long = min(width, height), max(width, height)
        resized_long = int(resolution * long / short)
        resized_w, resized_h = (resized_long, resolution) if width > height else (resolution, resized_long)
        rows.append([height, width, round((resized_h - resolution) / 2), round((resized_w - resolution) / 2),
                     resolution, resolution])
    return torch.tensor(rows * 2, dtype=torch.float32)  # both images of a row share its size


@pytest.mark.parametrize("mode", ["measured", "fixed"])
def test_unet_receives_the_configured_time_ids(sdxl, odd_sized_pairs, mode):
    """data.time_ids: "fixed" feeds the UNet [R, R, 0, 0, R, R] whatever the image's size (Diffusion-DPO / DCPO /
    InPO trainers), "measured" the real original size and crop; seen by hooks on the policy and reference UNets."""
    from t2ialign.data import collate_pairs

    path, pairs = odd_sized_pairs
    batch = collate_pairs([pairs[i] for i in range(len(pairs))])
    models = step_models(sdxl)
    seen = []
    hooks = [unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
        for unet in (models.policy, models.reference)]
    spec = get_objective("dpo")
    try:
        with torch.no_grad():
            preference_step(models, spec, objective_params(spec, None, {}), batch, resolution=32, prompt_dropout=0.0,
                            generator=torch.Generator().manual_seed(0), time_ids_mode=mode)
    finally:
        for hook in hooks:
            hook.remove()
    if mode == "fixed":
        expected = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 8)
    else:
        expected = measured_time_ids_by_hand(path, pairs, batch["indices"].tolist(), 32)
        assert {tuple(r[:4]) for r in expected.tolist()} == {(64.0, 96.0, 0.0, 8.0), (80.0, 64.0, 4.0, 0.0)}
    assert len(seen) == 2 and all(torch.equal(time_ids, expected) for time_ids in seen)


def test_time_ids_modes_agree_with_the_config_choices_and_reject_others():
    from t2ialign.config.train import CHOICES
    from t2ialign.models.text_encoding import TIME_IDS_MODES, sdxl_time_ids

    assert CHOICES["data.time_ids"] == TIME_IDS_MODES
    sizes, crops = torch.tensor([[1024, 768], [512, 2048]]), torch.tensor([[3, 0], [0, 17]])
    assert sdxl_time_ids("measured", sizes, crops, 256).tolist() == [[1024, 768, 3, 0, 256, 256], [512, 2048, 0, 17, 256, 256]]
    assert sdxl_time_ids("fixed", sizes, crops, 256).tolist() == [[256, 256, 0, 0, 256, 256]] * 2
    with pytest.raises(ValueError, match="data.time_ids: 'fixd' is not allowed; allowed: measured, fixed"):
        sdxl_time_ids("fixd", sizes, crops, 256)


def test_prompt_dropout_drops_both_images_of_a_pair(sdxl):
    from t2ialign.training.step import _pair_captions

    spec = get_objective("dcpo")
    batch = make_batch(sdxl, num_pairs=64)
    captions = _pair_captions(spec, batch, 0.5, torch.Generator().manual_seed(0))
    winners, losers = captions[:64], captions[64:]
    dropped = [w == "" for w in winners]
    assert dropped == [l == "" for l in losers]
    assert 16 < sum(dropped) < 48


def test_mapo_run_instantiates_exactly_one_unet(tmp_path, tiny_sdxl_dir, pickapic_parquet):
    """Reference-free: while the MaPO loop runs, the only UNet alive is the policy."""
    from diffusers import UNet2DConditionModel

    import t2ialign.training.loop as loop
    from t2ialign.config import load_train_config

    seen = []
    original = loop._run_steps

    def counting_run_steps(*args, **kwargs):
        gc.collect()
        seen.append(sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects()))
        return original(*args, **kwargs)

    config = load_train_config(data={
        "model": {"pretrained": str(tiny_sdxl_dir)}, "data": {"dataset": str(pickapic_parquet), "resolution": 32},
        "objective": {"name": "mapo"}, "optim": {"learning_rate": 1e-4}, "output_dir": str(tmp_path / "run"),
        "max_steps": 1, "checkpoint_every": 0, "report_to": "none", "progress_bar": False,
    })
    gc.collect()
    before = sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())
    loop._run_steps = counting_run_steps
    try:
        loop.train(config)
    finally:
        loop._run_steps = original
    assert seen and seen[0] - before == 1


# ---------------------------------------------------------------- no host synchronisation inside the micro-step

HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_assert_async"}


class OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def cached_batch(unet, num_pairs=2):
    """A pre-encoded micro-batch as the cache reader collates it, with the embedding of "" for dropout."""
    cfg = unet.config
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    gen = torch.Generator().manual_seed(0)
    n = 2 * num_pairs
    return {
        "latents": torch.randn(n, cfg.in_channels, 16, 16, generator=gen),
        "prompt_embeds": torch.randn(n, 77, cfg.cross_attention_dim, generator=gen),
        "pooled_prompt_embeds": torch.randn(n, text_dim, generator=gen),
        "null_prompt_embeds": torch.zeros(1, 77, cfg.cross_attention_dim),
        "null_pooled_prompt_embeds": torch.zeros(1, text_dim),
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * n),
        "captions": [""] * num_pairs,
    }


@pytest.mark.parametrize("objective", ["dpo", "mapo", "dcpo", "sft"])
def test_the_micro_step_never_reads_a_device_value_on_the_host(objective, monkeypatch):
    """What would stall the GPU pipeline: .item()/bool()/.tolist() of a tensor (aten._local_scalar_dense) and
    data-dependent shapes (nonzero, masked_select). Forward and backward of a cached batch with prompt dropout
    must issue none; on CUDA each one waits for every queued kernel. (DDIM-InPO is the exception: its
    inversion loop stops when no row is still active, one read per inversion step.)"""
    from t2ialign.models.configs import sdxl_noise_scheduler
    from t2ialign.models.loading import DiffusionComponents
    from t2ialign.models.tiny import tiny_sdxl_components

    unet = tiny_sdxl_components()["unet"]
    components = DiffusionComponents(unet=unet, vae=None, noise_scheduler=sdxl_noise_scheduler(), is_sdxl=True)
    spec = get_objective(objective)
    reference = type(unet).from_config(unet.config).requires_grad_(False) if spec.needs_reference else None
    models = StepModels(unet, unet, reference, components)
    host_reads = []
    for method in ("tolist", "item", "numpy"):  # CPU tensors answer these without a dispatched op
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _o=original: host_reads.append(_m) or _o(self, *a))
    recorder = OpRecorder()
    with recorder:
        output = preference_step(models, spec, objective_params(spec, None, {}), cached_batch(unet), resolution=128,
                                 prompt_dropout=0.5, generator=torch.Generator().manual_seed(3))
        output.loss.backward()
    assert len(recorder.ops) > 500  # the UNet really ran under the recorder
    monkeypatch.undo()
    assert not set(recorder.ops) & HOST_READS, sorted(set(recorder.ops) & HOST_READS)
    assert not host_reads, host_reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA's sync debug mode")
def test_the_micro_step_on_cuda_does_not_synchronise():
    from t2ialign.models.configs import sdxl_noise_scheduler
    from t2ialign.models.loading import DiffusionComponents
    from t2ialign.models.tiny import tiny_sdxl_components

    unet = tiny_sdxl_components()["unet"].cuda()
    components = DiffusionComponents(unet=unet, vae=None, noise_scheduler=sdxl_noise_scheduler(), is_sdxl=True)
    spec = get_objective("dpo")
    models = StepModels(unet, unet, copy.deepcopy(unet).requires_grad_(False), components)
    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in cached_batch(unet).items()}
    step = lambda: preference_step(models, spec, objective_params(spec, None, {}), batch, resolution=128,  # noqa: E731
                                   prompt_dropout=0.5, generator=torch.Generator("cuda").manual_seed(3))
    step().loss.backward()  # first call: lazy one-off setup (scheduler tables moved to the GPU, cuBLAS handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step().loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
