"""steerlab's DAS interventions equal pyvene 0.1.8's given the same rotation: outputs and gradients.

- ``SubspaceInterchange`` ↔ ``LowRankRotatedSpaceIntervention``: two layers in one forward, each
  with its own source, base and sources padded (left and right) to different lengths, per-example
  positions; fp32 and bf16.
- ``BoundlessSubspaceInterchange`` ↔ ``BoundlessRotatedSpaceIntervention``.
- A DAS step as :class:`~steerlab.alignment.DAS` runs it (the runner: cached prefix, cached source
  slices, the key/value cache of the positions before the edit) ↔ pyvene's full forward with
  ``RotatedSpaceIntervention`` (a full rotation, its first ``k`` rotated coordinates swapped):
  forward and backward, on padded variable-length inputs.

steerlab's ``R`` is ``[k, d]`` with orthonormal rows; pyvene's rotate layer holds ``Rᵀ``. Where
pyvene's rotation is a plain leaf its ``∂L/∂Rᵀ`` pulls back through a plain-torch QR to steerlab's
``∂L/∂A`` (:func:`tests.peers.qr_pullback`); where pyvene's map is a full ``d × d`` rotation, the
two losses are the same function on the orthogonal group but not off it, so their gradients are
compared along it (:func:`tests.peers.group_gradient`).
"""

from __future__ import annotations


import pytest
import pyvene as pv
import torch

import steerlab as sl
from steerlab.alignment import CausalModel, CounterfactualDataset, Encoder
from steerlab.alignment._activations import Runner
from steerlab.alignment.das import store_for
from tests.archs import tiny_model
from tests.peers import BF16_U, group_gradient, padded_batch, padded_positions, qr_pullback, qr_rows, ulp
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()

K, D, VOCAB = 4, 32, 96
LAYERS = (0, 2)
BASE_POS = torch.tensor([[3], [1], [5]])  # real-token indices, per example
SOURCE_POS = torch.tensor([[4], [2], [0]])


def orthogonal(seed: int) -> torch.Tensor:
    """A random orthogonal ``[d, d]``."""
    return torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))[0]


def the_intervention(ivm: pv.IntervenableModel, i: int = 0):
    piv = list(ivm.interventions.values())[i]
    return piv[0] if isinstance(piv, tuple) else piv


def pyvene_model(model, kind, layers=(0,), **config) -> pv.IntervenableModel:
    reps = [{"layer": layer, "component": "block_output", "intervention_type": kind, **config} for layer in layers]
    ivm = pv.IntervenableModel(pv.IntervenableConfig(reps), model)
    ivm.disable_model_gradients()
    return ivm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_two_layers_padded_interchange_and_gradients_equal_pyvene(side, dtype):
    ours_model, theirs_model = tiny_model("llama", dtype=dtype), tiny_model("llama", dtype=dtype)
    lab = sl.wrap(ours_model)
    base = padded_batch([7, 4, 6], side, seed=1)
    sources = [padded_batch([5, 6, 3], side, seed=2), padded_batch([6, 3, 4], side, seed=3)]
    Ws = [orthogonal(10 + i)[:, :K] for i in range(len(LAYERS))]  # pyvene's [d, k]; steerlab's R is its transpose
    das = [sl.SubspaceInterchange(f"blocks.{layer}.resid_post", size=K, width=D, init=w.T, source=src)
           for layer, w, src in zip(LAYERS, Ws, sources)]
    probe = torch.randn(3, 7, VOCAB, generator=torch.Generator().manual_seed(4)) * base["attention_mask"][..., None]
    out = lab.run(base, das, positions=BASE_POS, source_positions=SOURCE_POS).logits
    (out.float() * probe).sum().backward()

    ivm = pyvene_model(theirs_model, pv.LowRankRotatedSpaceIntervention, LAYERS, low_rank_dimension=K)
    leaves = []
    for i, w in enumerate(Ws):
        leaf = pv.models.interventions.LowRankRotateLayer(D, K, init_orth=False)
        with torch.no_grad():
            leaf.weight.copy_(w)
        the_intervention(ivm, i).rotate_layer = leaf  # the same maths with a plain leaf, so dL/dR compares directly
        leaves.append(leaf)
    src_pos = [padded_positions(SOURCE_POS, s["attention_mask"]) for s in sources]
    base_pos = padded_positions(BASE_POS, base["attention_mask"])
    _, theirs = ivm(base, sources, unit_locations={"sources->base": (src_pos, [base_pos] * len(LAYERS))})
    (theirs.logits.float() * probe).sum().backward()

    mask = base["attention_mask"].bool()
    effect = (out - ours_model(**base).logits)[mask].abs().max()
    if dtype == torch.float32:
        torch.testing.assert_close(out, theirs.logits, atol=2e-6, rtol=1e-5)
        assert effect > 1e-2  # the subspace edits act
        for iv, leaf in zip(das, leaves):
            torch.testing.assert_close(iv.rotation.weight.grad, qr_pullback(iv.rotation.weight, leaf.weight.grad.T), atol=1e-5, rtol=1e-4)
            assert iv.rotation.weight.grad.abs().max() > 1e-3
    else:
        # both compute the edit in fp32 and round once (pyvene's rotate layer stays fp32): only the order
        # of fp32 operations differs, which can move a site value by one bf16 ulp, and later bf16 layers
        # round again; measured: bitwise equal logits
        gap = (out.float() - theirs.logits.float())[mask].abs().max()
        assert gap <= 2 * ulp(out), (float(gap), ulp(out))
        assert effect > 40 * ulp(out)
        for iv, leaf in zip(das, leaves):
            want = qr_pullback(iv.rotation.weight, leaf.weight.grad.T)
            # the gradient comes back through bf16 layers, rounded at each: a few bf16 ulps (measured: 1)
            torch.testing.assert_close(iv.rotation.weight.grad, want, atol=4 * BF16_U * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_boundless_das_equals_pyvene(side):
    """Boundless DAS. pyvene's mask is ``σ((i - 0)/τ) σ((βd - i)/τ)``: a lower boundary at 0 that
    caps the first rotated coordinate at ½ (σ(0)); steerlab's is one-sided, ``σ((βd - i)/τ)``.
    Shifting pyvene's index by ``c`` with ``c/τ >= 17`` makes its lower factor exactly 1 in fp32,
    and moving its boundary by ``c/d`` gives the same upper factor: then the maths coincide."""
    ours_model, theirs_model = tiny_model("llama"), tiny_model("llama")
    lab = sl.wrap(ours_model)
    base, source = padded_batch([7, 4, 6], side, seed=1), padded_batch([5, 6, 3], side, seed=2)
    W, tau, beta, shift = orthogonal(5), 1.0, 0.3, 20  # the shifted boundary 0.3 + 20/32 stays below pyvene's clamp at 1
    iv = sl.BoundlessSubspaceInterchange(f"blocks.{LAYERS[1]}.resid_post", width=D, init_boundary=beta, temperature=tau, source=source)
    with torch.no_grad():
        iv.rotation.weight.copy_(W)  # A = W, so R = Q(W)ᵀ = Wᵀ
    torch.testing.assert_close(qr_rows(iv.rotation.weight), W.T, atol=1e-6, rtol=0)
    probe = torch.randn(3, 7, VOCAB, generator=torch.Generator().manual_seed(4)) * base["attention_mask"][..., None]
    out = lab.run(base, [iv], positions=BASE_POS, source_positions=SOURCE_POS).logits
    (out * probe).sum().backward()

    ivm = pyvene_model(theirs_model, pv.BoundlessRotatedSpaceIntervention, [LAYERS[1]])
    piv = the_intervention(ivm)
    leaf = pv.models.layers.RotateLayer(D, init_orth=False)
    with torch.no_grad():
        leaf.weight.copy_(W)
        piv.intervention_boundaries.copy_(torch.tensor([beta + shift / D]))
        piv.intervention_population.copy_(torch.arange(D) + shift)
    piv.rotate_layer = leaf
    piv.set_temperature(torch.tensor(tau))
    unit = {"sources->base": ([padded_positions(SOURCE_POS, source["attention_mask"])], [padded_positions(BASE_POS, base["attention_mask"])])}
    _, theirs = ivm(base, [source], unit_locations=unit)
    (theirs.logits * probe).sum().backward()

    torch.testing.assert_close(out, theirs.logits, atol=2e-6, rtol=1e-5)
    mask = base["attention_mask"].bool()
    assert (out - ours_model(**base).logits)[mask].abs().max() > 1e-2
    torch.testing.assert_close(iv.boundary.grad.reshape(1), piv.intervention_boundaries.grad, atol=1e-5, rtol=1e-4)
    assert iv.boundary.grad.abs() > 1e-3
    ours_g, theirs_g = group_gradient(W, iv.rotation.weight.grad), group_gradient(W, leaf.weight.grad)
    torch.testing.assert_close(ours_g, theirs_g, atol=1e-5, rtol=1e-4)
    assert ours_g.abs().max() > 1e-3


class Ids(Encoder):
    """Input ``I`` (0-7) is a fixed sequence of ``4 + I % 4`` tokens; a batch is padded on ``side``.
    The edit sits at the second-to-last real token (left padding) or at token 1 (right padding); the
    label scores are two logits at the last column (left: every example's last token) or at column 3,
    the last one every example reaches (right), counted from the end as a suffix run's output is."""

    labels = (0, 1)

    def __init__(self, side: str):
        self.side = side
        self.column = -1 if side == "left" else 3 - 7  # the dataset's longest input has 7 tokens

    def encode(self, settings):
        rows = [torch.randint(3, 90, (4 + s["I"] % 4,), generator=torch.Generator().manual_seed(100 + s["I"])) for s in settings]
        seq = max(len(r) for r in rows)
        ids, mask = torch.zeros(len(rows), seq, dtype=torch.long), torch.zeros(len(rows), seq, dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(0, len(r)) if self.side == "right" else slice(seq - len(r), seq)
            ids[i, cols], mask[i, cols] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def lengths(self, encoded):
        return encoded["attention_mask"].sum(-1)

    def positions(self, name, settings, encoded):
        return (self.lengths(encoded) - 2)[:, None] if self.side == "left" else torch.full((len(settings), 1), 1)

    def scores(self, output):
        return output.logits[:, self.column, :2]


@pytest.mark.parametrize("side", ["left", "right"])
def test_runner_step_forward_and_backward_equal_pyvene_rotated_space(side):
    """What a DAS step computes from its caches, and the gradient it trains on, equal pyvene's
    ``RotatedSpaceIntervention`` (full rotation ``W``, first ``k`` coordinates) on full forwards."""
    cm = CausalModel({"I": tuple(range(8)), "P": (0, 1)}, {"P": ["I"]}, {"P": lambda i: i % 2})
    enc = Ids(side)
    data = CounterfactualDataset.from_pairs(cm, enc, [{"I": i} for i in range(4)], {"P": [{"I": 7 - i} for i in range(4)]})
    lab = sl.wrap(tiny_model("llama"))
    site = "blocks.1.resid_post"  # a block above it reads the edited position; one below it is cached
    runner = Runner(store_for(lab, [data], [site]), data, site, "mine")
    W = orthogonal(3)
    das = sl.SubspaceInterchange(site, size=K, width=D, init=W[:, :K].T)
    rows = torch.arange(4)
    probe = torch.randn(4, 2, generator=torch.Generator().manual_seed(6))
    ours = runner.run(rows, [das])
    (ours * probe).sum().backward()

    store = runner.store
    b_rows, s_rows = runner.base_rows(rows), runner.source_rows(rows, 0)
    base, source = store.inputs_for(b_rows), store.inputs_for(s_rows)
    real, _ = store.positions("mine")
    ivm = pyvene_model(tiny_model("llama"), pv.RotatedSpaceIntervention, [1])
    piv = the_intervention(ivm)
    leaf = pv.models.layers.RotateLayer(D, init_orth=False)
    with torch.no_grad():
        leaf.weight.copy_(W)
    piv.rotate_layer = leaf
    piv.set_interchange_dim(K)
    unit = {"sources->base": ([padded_positions(real[s_rows], source["attention_mask"])], [padded_positions(real[b_rows], base["attention_mask"])])}
    _, out = ivm(base, [source], unit_locations=unit)
    theirs = enc.scores(out)
    (theirs * probe).sum().backward()

    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    with torch.no_grad():
        assert (ours - enc.scores(lab.model(**base))).abs().max() > 1e-3  # the interchange changes the scores
    ours_g, theirs_g = group_gradient(W, das.rotation.weight.grad), group_gradient(W, leaf.weight.grad)
    torch.testing.assert_close(ours_g, theirs_g, atol=1e-6, rtol=1e-4)
    assert ours_g.abs().max() > 1e-4
