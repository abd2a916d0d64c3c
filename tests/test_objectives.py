"""Objectives against independent formulas written here (docs/ALGORITHMS.md sections 1-2)."""
import math

import pytest
import torch

from t2ialign.objectives import (
    LN2,
    OBJECTIVES,
    ObjectiveSpec,
    dpo_loss,
    get_objective,
    mapo_loss,
    objective_params,
    sft_loss,
)

B = 8


def _errors(seed=0, n=B, scale=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.rand(n, generator=g, dtype=dtype) + 0.05 for _ in range(4)]


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


# ----------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("beta", [2000.0, 5000.0, 0.5])
def test_dpo_matches_equivalent_half_beta_form(beta):
    m_w, m_l, r_w, r_l = _errors(1)
    out = dpo_loss(m_w, m_l, r_w, r_l, beta=beta)
    z = (beta / 2) * ((r_w - r_l) - (m_w - m_l))
    expected = -torch.log(torch.sigmoid(z)).mean()
    assert out.loss.dtype == torch.float64
    assert _rel(out.loss, expected) < 1e-6
    assert out.metrics["implicit_acc"].item() == pytest.approx((z > 0).double().mean().item())


def test_dpo_init_self_checks_and_gradient():
    m_w, m_l, _, _ = _errors(2)
    m_w = m_w.clone().requires_grad_(True)
    m_l = m_l.clone().requires_grad_(True)
    beta = 5000.0
    out = dpo_loss(m_w, m_l, m_w.detach().clone(), m_l.detach().clone(), beta=beta)
    assert out.loss.item() == pytest.approx(math.log(2.0), abs=1e-12)
    assert LN2 == pytest.approx(0.693147, abs=1e-6)
    assert out.metrics["implicit_acc"].item() == 0.5  # all ties, counted half
    out.loss.backward()
    torch.testing.assert_close(m_w.grad, torch.full_like(m_w, beta / (4 * B)), rtol=1e-12, atol=0)
    torch.testing.assert_close(m_l.grad, torch.full_like(m_l, -beta / (4 * B)), rtol=1e-12, atol=0)


def test_dpo_ties_count_half():
    m_w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    r_w = m_w.clone()
    m_l = torch.tensor([0.2, 0.1, 0.3, 0.4], dtype=torch.float64)  # win, lose, tie, tie
    r_l = m_w.clone()
    out = dpo_loss(m_w, m_l, r_w, r_l, beta=10.0)
    # inside = -5 * ((m_w - m_l) - 0) -> [+, -, 0, 0] -> (1 + 0.5 + 0.5) / 4
    assert out.metrics["implicit_acc"].item() == pytest.approx(0.5)
    m_l2 = torch.tensor([0.2, 0.3, 0.3, 0.5], dtype=torch.float64)  # win, win, tie, win
    out2 = dpo_loss(m_w, m_l2, r_w, r_l, beta=10.0)
    assert out2.metrics["implicit_acc"].item() == pytest.approx(3.5 / 4)


def test_dpo_sum_form_with_beta_over_2d_equals_mean_form():
    g = torch.Generator().manual_seed(3)
    shape = (B, 4, 3, 5)
    d = 4 * 3 * 5
    sq = [torch.rand(shape, generator=g, dtype=torch.float64) * 0.2 for _ in range(4)]  # squared errors
    beta = 5000.0
    mean_form = dpo_loss(*[s.mean(dim=(1, 2, 3)) for s in sq], beta=beta).loss
    sums = [s.sum(dim=(1, 2, 3)) for s in sq]
    beta_sum = beta / (2 * d)
    # the paper's pseudocode: no 1/2, sums over elements
    sum_form = -torch.log(torch.sigmoid(-beta_sum * ((sums[0] - sums[1]) - (sums[2] - sums[3])))).mean()
    assert _rel(mean_form, sum_form) < 1e-10


def test_dpo_keeps_dtype():
    for dtype in (torch.float32, torch.float64):
        out = dpo_loss(*_errors(4, dtype=dtype))
        assert out.loss.dtype == dtype
        assert all(v.dtype == dtype for v in out.metrics.values())


# ---------------------------------------------------------------------------------------- MaPO
def _literal_f(x):
    return x / (torch.exp(x) - 1)


def _literal_mapo(m_w, m_l, beta=0.1, a=0.5, T=1000):
    margin = _literal_f(a * m_w) - _literal_f(a * m_l)
    return m_w.mean() - (beta * torch.log(torch.sigmoid(T * margin))).mean()


def test_mapo_matches_literal_formula_away_from_zero():
    g = torch.Generator().manual_seed(5)
    m_w = 0.01 + torch.rand(B, generator=g, dtype=torch.float64) * 3.0
    m_l = 0.01 + torch.rand(B, generator=g, dtype=torch.float64) * 3.0
    out = mapo_loss(m_w, m_l)
    assert out.loss.dtype == torch.float64
    assert _rel(out.loss, _literal_mapo(m_w, m_l)) < 1e-6
    # also over a wide range of arguments, including the series / tail branches of the link
    for lo, hi in [(0.002, 0.004), (5.0, 60.0), (1e-4, 1e-3)]:
        m_w = lo + torch.rand(B, generator=g, dtype=torch.float64) * (hi - lo)
        m_l = lo + torch.rand(B, generator=g, dtype=torch.float64) * (hi - lo)
        for beta, a in [(0.1, 0.5), (1.0, 2.0)]:
            out = mapo_loss(m_w, m_l, beta=beta, snr_value=a)
            assert _rel(out.loss, _literal_mapo(m_w, m_l, beta, a)) < 1e-6


def test_mapo_logged_scores():
    g = torch.Generator().manual_seed(6)
    m_w = 0.05 + torch.rand(B, generator=g, dtype=torch.float64)
    m_l = 0.05 + torch.rand(B, generator=g, dtype=torch.float64)
    out = mapo_loss(m_w, m_l, beta=0.1, snr_value=0.5, num_train_timesteps=1000)
    win = _literal_f(0.5 * m_w)
    lose = _literal_f(0.5 * m_l)
    assert _rel(out.metrics["win_score"], win.mean()) < 1e-9
    assert _rel(out.metrics["lose_score"], lose.mean()) < 1e-9
    margin_loss = -(0.1 * torch.log(torch.sigmoid(1000 * (win - lose)))).mean()
    assert _rel(out.metrics["margin_loss"], margin_loss) < 1e-6
    assert _rel(out.loss, m_w.mean() + margin_loss) < 1e-9
    assert out.metrics["implicit_acc"].item() == pytest.approx((win > lose).double().mean().item())
    assert all(v.dtype == torch.float64 for v in out.metrics.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.0, 1e3, 1e5])
def test_mapo_finite_value_and_gradient_at_extremes(dtype, value):
    m_w = torch.full((4,), value, dtype=dtype, requires_grad=True)
    m_l = torch.tensor([0.0, 0.5, 1e3, 1e5], dtype=dtype, requires_grad=True)
    out = mapo_loss(m_w, m_l)
    assert out.loss.dtype == dtype
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(m_w.grad).all() and torch.isfinite(m_l.grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
    # the literal form is NaN at exactly zero; the robust one takes the limit f(0) = 1
    if value == 0.0:
        assert out.metrics["win_score"].item() == pytest.approx(1.0, abs=1e-12)
    else:
        assert out.metrics["win_score"].item() == pytest.approx(0.0, abs=1e-30)


def test_mapo_small_error_slope_is_250():
    m_w = torch.full((B,), 1e-4, dtype=torch.float64)
    m_l = torch.full((B,), 1e-4, dtype=torch.float64, requires_grad=True)
    a, T = 0.5, 1000

    # T * margin from the package's link, via the logged scores' definition
    def t_margin(ml):
        from t2ialign.objectives import _bounded_link

        return (T * (_bounded_link(a * m_w) - _bounded_link(a * ml))).sum()

    (grad,) = torch.autograd.grad(t_margin(m_l), m_l)
    assert grad.mean().item() == pytest.approx(250.0, rel=1e-3)
    # and through the loss: d loss / d m_l_i = -beta * sigmoid(-T margin) * 250 / B = -beta * 0.5 * 250 / B at a tie
    m_l0 = m_w.clone().requires_grad_(True)
    mapo_loss(m_w, m_l0, beta=0.1).loss.backward()
    torch.testing.assert_close(m_l0.grad, torch.full_like(m_l0, -0.1 * 0.5 * 250 / B), rtol=1e-3, atol=0)


def test_mapo_link_at_zero_has_slope_minus_half():
    from t2ialign.objectives import _bounded_link

    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(3, dtype=dtype, requires_grad=True)
        y = _bounded_link(x)
        y.sum().backward()
        assert y.dtype == dtype
        torch.testing.assert_close(y.detach(), torch.ones_like(y))
        torch.testing.assert_close(x.grad, torch.full_like(x, -0.5))


# ----------------------------------------------------------------------------------------- SFT
def test_sft_equals_mse_on_winners():
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(2 * B, 4, 6, 6, generator=g, dtype=torch.float64)
    tgt = torch.randn(2 * B, 4, 6, 6, generator=g, dtype=torch.float64)
    err = ((pred - tgt) ** 2).mean(dim=(1, 2, 3))
    err_w, err_l = err.chunk(2)
    out = sft_loss(err_w, err_l)
    expected = torch.nn.functional.mse_loss(pred[:B], tgt[:B])
    assert out.loss.dtype == torch.float64
    assert _rel(out.loss, expected) < 1e-12
    assert sft_loss(err_w).loss.item() == out.loss.item()


# ------------------------------------------------------------------------------------ registry
def test_get_objective_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'mapo'"):
        get_objective("mappo")
    with pytest.raises(ValueError, match="available: "):
        get_objective("zzzzzz")
    assert get_objective("dpo").fn is dpo_loss


def test_spec_flags():
    assert set(OBJECTIVES) >= {"dpo", "mapo", "dcpo", "inpo", "sft"}
    assert get_objective("dpo").needs_reference
    assert not get_objective("mapo").needs_reference
    assert not get_objective("sft").needs_reference
    assert not get_objective("sft").uses_loser
    assert get_objective("dcpo").per_image_captions and get_objective("dcpo").needs_reference
    assert get_objective("inpo").uses_inversion and get_objective("inpo").needs_reference
    assert not get_objective("dpo").uses_inversion and not get_objective("dpo").per_image_captions


def test_spec_call_dispatch():
    m_w, m_l, r_w, r_l = _errors(8)
    dpo = get_objective("dpo")
    with pytest.raises(ValueError, match="reference"):
        dpo(m_w, m_l)
    assert dpo(m_w, m_l, r_w, r_l, beta=100.0).loss.item() == dpo_loss(m_w, m_l, r_w, r_l, beta=100.0).loss.item()
    assert get_objective("mapo")(m_w, m_l).loss.item() == mapo_loss(m_w, m_l).loss.item()
    assert get_objective("sft")(m_w, m_l).loss.item() == m_w.mean().item()


def test_objective_params_merging():
    dpo = get_objective("dpo")
    assert dpo.param_names == ("beta",)
    assert objective_params(dpo, None, {}) == {"beta": 5000.0}
    assert objective_params(dpo, 2000, {}) == {"beta": 2000.0}
    mapo = get_objective("mapo")
    assert objective_params(mapo, None, {}) == {"beta": 0.1, "snr_value": 0.5, "num_train_timesteps": 1000}
    merged = objective_params(mapo, 0.2, {"snr_value": 1.0})
    assert merged == {"beta": 0.2, "snr_value": 1.0, "num_train_timesteps": 1000}
    assert objective_params(get_objective("sft"), None, {}) == {}
    with pytest.raises(ValueError, match="no beta"):
        objective_params(get_objective("sft"), 1.0, {})
    with pytest.raises(ValueError, match="did you mean 'snr_value'"):
        objective_params(mapo, None, {"snr_valu": 1.0})


def test_register_custom_objective():
    from t2ialign.objectives import register_objective

    def hinge(model_err_w, model_err_l, ref_err_w, ref_err_l, beta: float = 10.0):
        from t2ialign.objectives import ObjectiveOutput

        z = beta * ((ref_err_w - ref_err_l) - (model_err_w - model_err_l))
        return ObjectiveOutput(torch.relu(1 - z).mean())

    spec = register_objective(ObjectiveSpec("test_hinge", hinge))
    try:
        assert get_objective("test_hinge") is spec
        assert spec.defaults == {"beta": 10.0}
        m_w, m_l, r_w, r_l = _errors(9)
        assert torch.isfinite(spec(m_w, m_l, r_w, r_l, **objective_params(spec, None, {})).loss)
    finally:
        OBJECTIVES.pop("test_hinge", None)
