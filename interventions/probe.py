"""A linear probe: L2-regularised logistic regression on activations.

``fit_logistic`` minimises ``mean BCE(z w + b, y) + weight_decay |w|²`` over
standardised features ``z = (x − μ) / σ`` with L-BFGS from zero, in ``x``'s
dtype. Standardising makes ``weight_decay`` mean the same at every site
(residual streams differ in scale by orders of magnitude across layers).
Used by the probe direction (:func:`steerlab.alignment.directions.probe`)
and the probe judge (:class:`steerlab.reft.judges.ProbeJudge`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["LogisticFit", "fit_logistic"]


@dataclass(frozen=True)
class LogisticFit:
    """``p(y=1 | x) = σ(w · (x − mean) / std + b)``: the weights act on standardised features."""

    w: Float[Tensor, " width"]
    b: Float[Tensor, ""]
    mean: Float[Tensor, " width"]
    std: Float[Tensor, " width"]

    def in_input_space(self) -> tuple[Float[Tensor, " width"], Float[Tensor, ""]]:
        """``(w_x, b_x)`` with ``σ(x · w_x + b_x)`` the same probability: ``w_x = w / std``,
        ``b_x = b − mean · w_x``."""
        w_x = self.w / self.std
        return w_x, self.b - (self.mean * self.w / self.std).sum()


def fit_logistic(x: Float[Tensor, "batch width"], y: Float[Tensor, " batch"], *, weight_decay: float, max_iter: int = 200) -> LogisticFit:
    """Fit the probe (module docstring); ``std`` is clamped at 1e-6 so a constant feature gets weight 0."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    y = y.to(x.dtype)
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticFit(w.detach(), b.detach(), mu, sd)
