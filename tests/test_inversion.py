"""DDIM inversion for DDIM-InPO (docs/ALGORITHMS.md section 4) against independent per-sample loops."""
import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from t2ialign.inversion import ddim_inversion_target, inversion_grid

T = 1000
GRID = [-99] + list(range(1, 802, 100))  # written out: [-99, 1, 101, ..., 801]
# pair timesteps covering the boundaries: t <= 1 (one step), exactly on a grid source, just past it, t = 999
PAIR_T = [0, 1, 2, 101, 102, 150, 801, 802, 999]
EXPECTED_DEPTH = {0: 1, 1: 1, 2: 2, 101: 2, 102: 3, 150: 3, 801: 9, 802: 10, 999: 10}


def _sdxl_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _toy_eps(x, s):
    """A per-row, nonlinear, timestep-dependent stand-in for the UNet (no mixing across rows)."""
    sv = s.to(x.dtype).view(-1, 1, 1, 1) / T
    return torch.tanh(0.7 * x + sv) + 0.3 * x.roll(1, dims=-1) * (1 - sv)


class Recorder:
    def __init__(self):
        self.calls = []  # (timesteps, batch size, index or None)

    def __call__(self, x, s, index=None):
        assert s.dtype == torch.long and s.shape == (x.shape[0],)
        self.calls.append((s.clone(), x.shape[0], None if index is None else index.clone()))
        if index is not None:
            assert index.shape == (x.shape[0],)
        return _toy_eps(x, s)


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b = len(PAIR_T)
    z0 = torch.randn(2 * b, 4, 4, 4, generator=g, dtype=dtype)
    t = torch.tensor(PAIR_T).repeat(2)
    return z0, t


def _reference(z0, t, abar, eta=0.0, noises=None):
    """One sample at a time, python floats for the schedule, literal loops over the grid."""
    zts, tgts = [], []
    for i in range(z0.shape[0]):
        ti = int(t[i])
        x = z0[i : i + 1].clone()
        for k, s in enumerate(GRID):
            if not s < ti:
                break
            a_s = float(abar[s]) if s >= 0 else float(abar[0])
            a_n = float(abar[s + 100])
            e = _toy_eps(x, torch.tensor([s]))  # the authors feed the first source (-99) as is
            x0 = (x - math.sqrt(1 - a_s) * e) / math.sqrt(a_s)
            x = math.sqrt(a_n) * x0 + math.sqrt(1 - a_n) * e
            if eta:
                var = (1 - a_s) / (1 - a_n) * (1 - a_n / a_s)
                x = x + eta * math.sqrt(var) * noises[k][i : i + 1]
        a_t = float(abar[ti])
        zts.append(x)
        tgts.append((x - math.sqrt(a_t) * z0[i : i + 1]) / math.sqrt(1 - a_t))
    return torch.cat(zts), torch.cat(tgts)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_grid_is_the_diffusers_020_grid():
    assert inversion_grid(1000, 10).tolist() == GRID


@pytest.mark.parametrize("only_active", [False, True])
def test_eta_zero_matches_independent_per_sample_loop(only_active):
    z0, t = _batch()
    abar = _sdxl_alphas_cumprod()
    zt, tgt = ddim_inversion_target(Recorder(), z0, t, abar, num_steps=10, eta=0.0, only_active=only_active)
    assert zt.dtype == torch.float64 and tgt.dtype == torch.float64 and zt.shape == z0.shape
    ref_zt, ref_tgt = _reference(z0, t, abar)
    assert _rel(zt, ref_zt) < 1e-6
    assert _rel(tgt, ref_tgt) < 1e-6
    # deterministic: no randomness used
    zt2, tgt2 = ddim_inversion_target(_toy_eps if not only_active else Recorder(), z0, t, abar, eta=0.0, only_active=only_active)
    assert torch.equal(zt, zt2) and torch.equal(tgt, tgt2)
    # winner and loser of a pair are inverted separately (different implied noise)
    b = len(PAIR_T)
    assert not torch.allclose(tgt[:b], tgt[b:])


@pytest.mark.parametrize("only_active", [False, True])
def test_eta_positive_reproducible_and_matches_matched_noise(only_active):
    z0, t = _batch(seed=1)
    abar = _sdxl_alphas_cumprod()
    eta = 0.1
    zt, tgt = ddim_inversion_target(_toy_eps if not only_active else Recorder(), z0, t, abar, eta=eta,
                                    generator=torch.Generator().manual_seed(7), only_active=only_active)
    zt2, tgt2 = ddim_inversion_target(_toy_eps if not only_active else Recorder(), z0, t, abar, eta=eta,
                                      generator=torch.Generator().manual_seed(7), only_active=only_active)
    assert torch.equal(zt, zt2) and torch.equal(tgt, tgt2)
    # documented draw order: one full-shape randn (compute dtype) per executed step, in step order
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(z0.shape, generator=g, dtype=torch.float64) for _ in range(10)]
    ref_zt, ref_tgt = _reference(z0, t, abar, eta=eta, noises=noises)
    assert _rel(zt, ref_zt) < 1e-6
    assert _rel(tgt, ref_tgt) < 1e-6
    # the noise matters, and a different seed gives a different result
    det, _ = ddim_inversion_target(_toy_eps, z0, t, abar, eta=0.0)
    assert not torch.allclose(zt, det)
    zt3, _ = ddim_inversion_target(_toy_eps, z0, t, abar, eta=eta, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(zt, zt3)


@pytest.mark.parametrize("first_timestep, first_fed", [("authors", -99), ("zero", 0)])
def test_unet_called_at_source_timesteps_full_batch(first_timestep, first_fed):
    z0, t = _batch()
    rec = Recorder()
    ddim_inversion_target(rec, z0, t, _sdxl_alphas_cumprod(), eta=0.0, first_timestep=first_timestep)
    fed = [int(s[0]) for s, _, _ in rec.calls]
    # the authors' trainer feeds the first grid entry (-99) as is; "zero" clamps it; max depth 10 -> 10 calls
    assert fed == [first_fed] + list(range(1, 802, 100))
    for s, n, index in rec.calls:
        assert n == z0.shape[0] and index is None  # one batched call over all samples (masked)
        assert torch.equal(s, torch.full_like(s, int(s[0])))


def test_unet_called_on_active_samples_only():
    z0, t = _batch()
    rec = Recorder()
    ddim_inversion_target(rec, z0, t, _sdxl_alphas_cumprod(), eta=0.0, only_active=True)
    fed = [int(s[0]) for s, _, _ in rec.calls]
    assert fed == GRID
    # per-sample depth = number of calls the sample took part in
    depth = torch.zeros(z0.shape[0], dtype=torch.long)
    for k, (s, n, index) in enumerate(rec.calls):
        assert torch.equal(index, (t > GRID[k]).nonzero(as_tuple=True)[0])
        depth[index] += 1
    assert depth.tolist() == [EXPECTED_DEPTH[int(ti)] for ti in t]


def test_shallow_batch_stops_early():
    z0, _ = _batch()
    t = torch.tensor([0, 1] * (z0.shape[0] // 2))
    rec = Recorder()
    ddim_inversion_target(rec, z0, t, _sdxl_alphas_cumprod(), eta=0.0)
    assert len(rec.calls) == 1 and int(rec.calls[0][0][0]) == -99


def test_matches_modern_diffusers_scheduler_with_source_level_unet():
    """Cross-check with diffusers' DDIMInverseScheduler (new convention: step(e, dest) moves dest-100 -> dest)."""
    inv = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    inv.set_timesteps(10)
    assert inv.timesteps.tolist() == list(range(1, 902, 100))
    fwd = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    z0, t = _batch(seed=2, dtype=torch.float32)
    eta = 0.1
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(z0.shape, generator=g, dtype=torch.float32) for _ in range(10)]
    ref = []
    for i in range(z0.shape[0]):
        x = z0[i : i + 1].clone()
        for k, dest in enumerate(inv.timesteps.tolist()):
            src = dest - 100
            if src >= int(t[i]):
                break
            e = _toy_eps(x, torch.tensor([src]))
            x = inv.step(e, dest, x).prev_sample
            x = x + eta * fwd._get_variance(dest, src) ** 0.5 * noises[k][i : i + 1]
        ref.append(x)
    ref = torch.cat(ref)
    zt, tgt = ddim_inversion_target(_toy_eps, z0, t, inv.alphas_cumprod, eta=eta, generator=torch.Generator().manual_seed(3))
    assert zt.dtype == torch.float32
    torch.testing.assert_close(zt, ref, rtol=1e-4, atol=1e-4)
    abar_t = inv.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(tgt, (ref - abar_t.sqrt() * z0) / (1 - abar_t).sqrt(), rtol=1e-3, atol=2e-3)


def test_oracle_noise_is_recovered_exactly():
    """With a constant-noise oracle and abar(-99) = 1, inversion walks the forward-process line: zt = add_noise."""
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(4, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 4, 4, 4, generator=g, dtype=torch.float64)
    abar = _sdxl_alphas_cumprod()

    def oracle(x, s, index=None):
        return eps if index is None else eps[index]

    # t equal to the destination level of its last step: 101 (2 steps), 201 (3), 501 (6), 901 (10)
    t = torch.tensor([101, 201, 501, 901])
    for only_active in (False, True):
        zt, tgt = ddim_inversion_target(oracle, z0, t, abar, eta=0.0, initial_alpha_cumprod=1.0, only_active=only_active)
        a = abar[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(zt, a.sqrt() * z0 + (1 - a).sqrt() * eps, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(tgt, eps, rtol=1e-9, atol=1e-9)
    # default abar(-99) = alphas_cumprod[0]: z0 is read as a level-0 latent sqrt(a0) x0 + sqrt(1 - a0) eps,
    # so the walk follows the line through x0 = (z0 - sqrt(1 - a0) eps) / sqrt(a0) instead of z0
    zt0, tgt0 = ddim_inversion_target(oracle, z0, t, abar, eta=0.0)
    a0 = abar[0]
    x0 = (z0 - (1 - a0).sqrt() * eps) / a0.sqrt()
    torch.testing.assert_close(zt0, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tgt0, eps + (a / (1 - a)).sqrt() * (x0 - z0), rtol=1e-9, atol=1e-9)


def test_half_precision_inputs_compute_in_fp32_and_no_grad():
    z0, t = _batch(seed=5, dtype=torch.float16)
    w = torch.tensor(0.5, requires_grad=True)
    zt, tgt = ddim_inversion_target(lambda x, s: w * _toy_eps(x, s), z0, t, _sdxl_alphas_cumprod().float(), eta=0.1,
                                    generator=torch.Generator().manual_seed(0))
    assert zt.dtype == torch.float32 and tgt.dtype == torch.float32
    assert not zt.requires_grad and not tgt.requires_grad
    assert torch.isfinite(tgt).all()


def test_input_validation():
    z0, t = _batch()
    abar = _sdxl_alphas_cumprod()
    with pytest.raises(ValueError, match="one timestep per sample"):
        ddim_inversion_target(_toy_eps, z0, t[:3], abar)
    with pytest.raises(ValueError, match="must lie in"):
        ddim_inversion_target(_toy_eps, z0, torch.full_like(t, 1000), abar)
    with pytest.raises(ValueError, match="eta"):
        ddim_inversion_target(_toy_eps, z0, t, abar, eta=-1.0)
