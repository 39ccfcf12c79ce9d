"""A NaN basis is never a subspace: ``Subspace`` refuses one (``NaN > tol`` is false, so an
orthonormality check alone would pass it), and so a DAS fit on NaN activations ends in that
named error instead of returning a NaN basis."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.alignment import DAS, tasks
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_basis_with_nan_or_inf_is_refused(bad):
    basis = torch.eye(6)[:2].clone()
    basis[0, 0] = bad
    with pytest.raises(sl.SubspaceSizeError, match="the basis holds 1 NaN or infinite value"):
        sl.Subspace(basis, "blocks.0.resid_post")


def test_a_das_fit_on_nan_activations_raises_a_named_error():
    task = tasks.hierarchical_equality()
    torch.manual_seed(0)
    mlp = task.model(seed=0).eval()  # untrained: the point is the NaN, not the alignment
    with torch.no_grad():
        next(mlp.parameters())[0, 0] = float("nan")  # every activation above the first layer is NaN
    lab = sl.wrap(mlp, example_input=task.example_input())
    train, test = task.datasets(n_train=128, n_test=64, seed=0)
    with pytest.raises(sl.SubspaceSizeError, match="NaN or infinite value.*a fit on NaN activations"):
        DAS(lab, site=task.site(1), size=4, epochs=1, batch_size=64, lr=0.01, seed=0).fit(train, test)
