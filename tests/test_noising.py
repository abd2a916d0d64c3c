"""The ELBO surrogate (docs/ALGORITHMS.md section 0) against a real diffusers scheduler and independent math."""
import pytest
import torch
from diffusers import DDPMScheduler

from t2ialign.noising import (
    denoising_target,
    noisy_latents_and_target,
    per_sample_error,
    sample_pair_noise,
    sample_pair_timesteps,
)


def _sdxl_scheduler(prediction_type="epsilon"):
    # SDXL's training schedule: scaled_linear betas 0.00085 .. 0.012 over 1000 steps
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def _latents(b=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * b, 4, 8, 8, generator=g).to(dtype)


def test_noise_shared_within_pairs_and_differs_across_pairs():
    lat = _latents(4)
    eps = sample_pair_noise(lat, torch.Generator().manual_seed(1))
    assert eps.shape == lat.shape and eps.dtype == lat.dtype
    torch.testing.assert_close(eps[:4], eps[4:], rtol=0, atol=0)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(eps[i], eps[j])
    # reproducible with a seed, and the same draw whatever the latent dtype
    eps2 = sample_pair_noise(lat.double(), torch.Generator().manual_seed(1))
    assert eps2.dtype == torch.float64
    torch.testing.assert_close(eps2.float(), eps, rtol=0, atol=0)


def test_noise_rejects_odd_batch():
    with pytest.raises(ValueError, match="even"):
        sample_pair_noise(torch.zeros(3, 4, 2, 2))


def test_timesteps_shared_within_pairs_and_differ_across_pairs():
    t = sample_pair_timesteps(64, 1000, "cpu", torch.Generator().manual_seed(2))
    assert t.shape == (128,) and t.dtype == torch.long
    assert torch.equal(t[:64], t[64:])
    assert 0 <= int(t.min()) and int(t.max()) <= 999
    assert len(set(t[:64].tolist())) > 32  # 64 draws from 1000 values: nearly all distinct


def test_epsilon_target_is_the_noise_and_zt_is_add_noise():
    sched = _sdxl_scheduler("epsilon")
    lat = _latents(3, torch.float64)
    zt, t, tgt = noisy_latents_and_target(sched, lat, torch.Generator().manual_seed(3))
    # replay the draws in the documented order: noise (fp32, B winners) then timesteps (B pairs)
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(lat[:3].shape, generator=g, dtype=torch.float32).double().repeat(2, 1, 1, 1)
    u = torch.randint(0, 1000, (3,), generator=g)
    assert torch.equal(t, u.repeat(2))
    torch.testing.assert_close(tgt, eps, rtol=0, atol=0)
    abar = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(zt, abar.sqrt() * lat + (1 - abar).sqrt() * eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zt[:3] - zt[3:], abar[:3].sqrt() * (lat[:3] - lat[3:]), rtol=1e-6, atol=1e-6)


def test_v_target_matches_scheduler_get_velocity():
    sched = _sdxl_scheduler("v_prediction")
    lat = _latents(3, torch.float64, seed=4)
    zt, t, tgt = noisy_latents_and_target(sched, lat, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(lat[:3].shape, generator=g, dtype=torch.float32).double().repeat(2, 1, 1, 1)
    torch.testing.assert_close(tgt, sched.get_velocity(lat, eps, t), rtol=0, atol=0)
    abar = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(tgt, abar.sqrt() * eps - (1 - abar).sqrt() * lat, rtol=1e-6, atol=1e-6)
    # direct call with explicit noise and timesteps
    t2 = torch.tensor([0, 500, 999, 0, 500, 999])
    torch.testing.assert_close(denoising_target(sched, lat, eps, t2), sched.get_velocity(lat, eps, t2), rtol=0, atol=0)


def test_unsupported_prediction_type():
    sched = _sdxl_scheduler("sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        denoising_target(sched, _latents(1), _latents(1), torch.tensor([1, 1]))


def test_per_sample_error_independent_mean_and_dtypes():
    g = torch.Generator().manual_seed(6)
    pred = torch.randn(4, 3, 5, 7, generator=g, dtype=torch.float64)
    tgt = torch.randn(4, 3, 5, 7, generator=g, dtype=torch.float64)
    expected = torch.stack([((pred[i] - tgt[i]) ** 2).sum() / (3 * 5 * 7) for i in range(4)])
    err = per_sample_error(pred, tgt)
    assert err.shape == (4,) and err.dtype == torch.float64
    torch.testing.assert_close(err, expected, rtol=1e-12, atol=0)
    for half in (torch.float16, torch.bfloat16):
        err_h = per_sample_error(pred.to(half), tgt.to(half))
        assert err_h.dtype == torch.float32
        exp_h = ((pred.to(half).float() - tgt.to(half).float()) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(err_h, exp_h, rtol=1e-6, atol=0)
        # mixed: half-precision model output against an fp32 target
        assert per_sample_error(pred.to(half), tgt.float()).dtype == torch.float32
    assert per_sample_error(pred.float(), tgt.float()).dtype == torch.float32
    assert per_sample_error(pred.float(), tgt).dtype == torch.float64
