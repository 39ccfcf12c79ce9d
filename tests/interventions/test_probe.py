"""The linear probe: a stationary point of its stated objective, and the input-space map exact."""

from __future__ import annotations

import torch

from steerlab.interventions.probe import fit_logistic


def _data(n=200, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1e-3, 1.0, 50.0, 1.0, 1.0, 3.0], dtype=torch.float64)[:d]  # wildly different feature scales
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 2.0
    logit = ((x - 2.0) / scale) @ torch.tensor([1.5, -2.0, 0.5, 0.0, 1.0, -0.5], dtype=torch.float64)[:d]
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(logit)).double()
    return x, y


def test_fit_is_a_stationary_point_of_the_stated_objective():
    x, y = _data()
    fit = fit_logistic(x, y, weight_decay=0.01)
    w = fit.w.clone().requires_grad_(True)
    b = fit.b.clone().requires_grad_(True)
    z = (x - x.mean(0)) / x.std(0)  # written out here, not taken from the fit
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + 0.01 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert gw.abs().max() < 1e-4 and gb.abs() < 1e-4  # L-BFGS's own tolerance; at w = 0 it is about 0.3
    w0 = torch.zeros_like(w, requires_grad=True)
    at_zero = torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(z @ w0 + b.detach(), y), w0)[0]
    assert at_zero.abs().max() > 0.1
    assert fit.w.abs().max() > 0.1  # it learned something (a zero fit would fail the next test's purpose)


def test_input_space_weights_give_the_same_probabilities():
    x, y = _data(seed=1)
    fit = fit_logistic(x, y, weight_decay=0.1)
    w_x, b_x = fit.in_input_space()
    standardised = (x - fit.mean) / fit.std @ fit.w + fit.b
    torch.testing.assert_close(x @ w_x + b_x, standardised, rtol=1e-9, atol=1e-9)


def test_weight_decay_shrinks_the_weights():
    x, y = _data(seed=2)
    small, large = fit_logistic(x, y, weight_decay=1e-4), fit_logistic(x, y, weight_decay=1.0)
    assert large.w.norm() < 0.5 * small.w.norm()
