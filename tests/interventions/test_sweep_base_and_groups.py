"""The sweep's two generalisations against the serial loop and a hand-spliced run.

* ``base_interventions``: every cell equals ``lab.run(base, [*base_interventions, Interchange(...)])``,
  a seeded ``Noise`` included (each packed copy draws what the base run drew), and a base
  intervention at the input of a block where a chunk resumes is applied once, not twice.
* site groups: an entry of ``sites`` that is a list patches its sites together.

Tolerance as in ``test_sweeps.py`` (packed matmuls may sum in another order).
"""

from __future__ import annotations

import math

import pytest
import torch

import steerlab as sl
from steerlab.interventions.inputs import Inputs
from tests.interventions._helpers import hooks, read_output, replace_output, wrapped
from tests.interventions.test_sweeps import assert_equal_cells, make_inputs, model_of, readout
from tests.reliability import assert_unchanged, one_thread_fixture, snapshot

_one_thread = one_thread_fixture()

TOL = 1e-5


def serial(lab, base, source, result, metric, base_ivs, groups) -> torch.Tensor:
    """One ``lab.run`` per configuration: the base interventions, then the group's patches."""
    out = torch.full_like(result.per_example, math.nan)
    inp = Inputs.of(base)
    for g, group in enumerate(groups):
        for q, slot in enumerate(result.positions):
            patches = [sl.Interchange(site, positions=slot, source=source) for site in group]
            out[g, q, 0] = metric(lab.run(base, [*base_ivs, *patches]).output, inp)
    return out


def noise_at(positions: torch.Tensor, seed: int = 3) -> sl.Noise:
    return sl.Noise("embed", std=2.0, seed=seed, positions=positions)


def test_noised_base_equals_serial_loop():
    """Causal tracing's shape: noise on some tokens' embeddings in the base, clean source = the same inputs."""
    model = model_of("llama")
    base = make_inputs([6, 6, 6], 6, "right", 1)
    subject = torch.tensor([[1, 2], [0, -1], [2, 3]])  # per example, -1: an empty slot
    base_ivs = [noise_at(subject)]
    metric = readout("llama")
    before = snapshot(model)
    with wrapped(model) as lab:
        sites = [f"blocks.*.{k}" for k in ("resid_post", "mlp.out", "attn.out")]
        res = sl.sweep(lab, base, base, sites=sites, metric=metric, base_interventions=base_ivs, configs_per_forward=7)
        groups = [[s] for s in res.sites]
        want = serial(lab, base, base, res, metric, base_ivs, groups)
        corrupted = metric(lab.run(base, base_ivs).output, Inputs.of(base))
        clean = metric(lab.run(base).output, Inputs.of(base))
    assert_unchanged(model, before, what="sweep with base interventions")
    assert res.forwards == math.ceil(9 * 6 / 7)  # packed: several copies of the noised base per forward
    assert_equal_cells(res.per_example, want, TOL)
    torch.testing.assert_close(res.base_metric, corrupted, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.source_metric, clean, rtol=0, atol=1e-6)
    assert (corrupted - clean).abs().min() > 1e-3  # the noise does corrupt every example
    # restoring the whole last residual state at the last token gives the clean run back
    last = res.sites.index("blocks.2.resid_post")
    torch.testing.assert_close(res.per_example[last, -1, 0], clean, rtol=0, atol=1e-5)


def test_noised_base_equals_a_hand_spliced_run():
    """One cell against plain PyTorch hooks: noise drawn as ``Noise`` documents it, added to the
    embedding output at the subject tokens; block 1's output at position 4 taken from the clean run."""
    model = model_of("llama")
    base = make_inputs([6, 6], 6, "right", 2)
    subject = torch.tensor([[1, 2], [1, 2]])
    metric = readout("llama")
    with wrapped(model) as lab:
        res = sl.sweep(lab, base, base, sites="blocks.1.resid_post", positions=[4], metric=metric, base_interventions=[noise_at(subject, seed=5)])
    store: dict = {}
    gen = torch.Generator().manual_seed(5)
    eps = 2.0 * torch.randn((2, 2, 32), generator=gen)

    def add_noise(y):
        y = y.clone()
        y[:, 1:3] += eps
        return y

    def splice(y):
        y = y.clone()
        y[:, 4] = store["clean"][:, 4]
        return y

    with torch.no_grad():
        with hooks(read_output(model.model.layers[1], store, "clean")):
            model(**base)
        with hooks(replace_output(model.model.embed_tokens, add_noise), replace_output(model.model.layers[1], splice)):
            logits = model(**base).logits
    by_hand = logits[:, -1, 5] - logits[:, -1, 7]
    torch.testing.assert_close(res.per_example[0, 0, 0], by_hand, rtol=0, atol=1e-5)


def test_base_intervention_at_a_resumed_block_input_applies_once():
    """An ``Add`` at block 2's input and a sweep whose chunks resume at block 2: a prefix there
    would already hold the edit, so the chunk must resume lower and apply it once."""
    model = model_of("llama")
    base, source = make_inputs([5, 5], 5, "left", 3), make_inputs([5, 5], 5, "left", 4)
    base_ivs = [sl.Add("blocks.2.resid_pre", vector=torch.randn(32), positions=[1]), sl.Zero("blocks.1.attn.out", positions=[0])]
    metric = readout("llama")
    with wrapped(model) as lab:
        res = sl.sweep(lab, base, source, sites=["blocks.2.resid_pre", "blocks.2.mlp.out"], metric=metric, base_interventions=base_ivs)
        want = serial(lab, base, source, res, metric, base_ivs, [[s] for s in res.sites])
    assert_equal_cells(res.per_example, want, TOL)


def test_sourced_base_intervention_reads_a_source_value():
    """Freezing heads to a reference run (path patching's shape): an Interchange from a SourceValue."""
    model = model_of("llama")
    base, source, ref = (make_inputs([5, 5], 5, "right", s) for s in (5, 6, 7))
    with wrapped(model) as lab:
        frozen = sl.Interchange("blocks.2.attn.z", heads=[0, 1])
        frozen.source = lab.source_value(frozen, ref)
        metric = readout("llama")
        res = sl.sweep(lab, base, source, sites="blocks.*.attn.z", heads="all", positions=[-1], metric=metric, base_interventions=[frozen])
        want = torch.full_like(res.per_example, math.nan)
        for s, site in enumerate(res.sites):
            for h, head in enumerate(res.heads):
                iv = sl.Interchange(site, heads=[head], positions=[-1], source=source)
                want[s, 0, h] = metric(lab.run(base, [frozen, iv]).output, Inputs.of(base))
    assert_equal_cells(res.per_example, want, TOL)
    # the patch comes after the freeze: at a frozen head of layer 2 the source's value wins
    assert not torch.allclose(res.per_example[2, 0, 0], res.base_metric)


def test_site_groups_patch_together():
    """ROME's windows: each group's sites patched in the same run, beside single sites."""
    model = model_of("gpt2")
    base, source = make_inputs([5, 4], 5, "left", 8), make_inputs([5, 4], 5, "left", 9)
    windows = [[f"blocks.{i}.mlp.out" for i in range(lo, min(lo + 2, 3))] for lo in range(3)]
    sites = [*windows, "blocks.1.attn.out", ["blocks.*.attn.out"]]
    metric = readout("gpt2")
    with wrapped(model) as lab:
        res = sl.sweep(lab, base, source, sites=sites, positions=[0, -1, [1, 2]], metric=metric, configs_per_forward=5)
        groups = [*windows, ["blocks.1.attn.out"], [f"blocks.{i}.attn.out" for i in range(3)]]
        want = serial(lab, base, source, res, metric, [], groups)
    assert res.sites == ["+".join(g) for g in groups]
    assert res.layers == [None, None, 2, 1, None]  # a group over several layers has no one layer
    assert res.row_axis == "site"
    assert_equal_cells(res.per_example, want, TOL)
    assert not torch.allclose(res.per_example[0], res.per_example[1])


def test_bad_base_interventions_and_groups_are_refused_before_compute():
    model = model_of("llama")
    base, source = make_inputs([5, 5], 5, "right", 10), make_inputs([5, 5], 5, "right", 11)
    metric = readout("llama")
    before = snapshot(model)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with wrapped(model) as lab:
            lab.sites  # probe forwards happen here, before counting
            calls.clear()
            with pytest.raises(sl.SourceError, match="SourceValue"):
                sl.sweep(lab, base, source, metric=metric, base_interventions=[sl.Interchange("blocks.0.resid_post", source=source)])
            bad = sl.Interchange("blocks.0.resid_post", source=sl.SourceValue(torch.zeros(3, 5, 32)))
            with pytest.raises(sl.BatchMismatch, match="batch 3"):
                sl.sweep(lab, base, source, metric=metric, base_interventions=[bad])
            with pytest.raises(sl.ConfigError, match="base_interventions"):
                sl.sweep(lab, base, source, metric=metric, base_interventions=["noise"])
            with pytest.raises(sl.ConfigError, match="group of sites"):
                sl.sweep(lab, base, source, metric=metric, sites=[[]])
            with pytest.raises(sl.SiteNotFound):
                sl.sweep(lab, base, source, metric=metric, sites=[["blocks.0.mlp.out", "blocks.9.mlp.out"]])
            assert calls == []
    finally:
        handle.remove()
    assert_unchanged(model, before, what="refused sweeps")


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_a_base_intervention_failing_mid_sweep_leaves_the_model_as_found(fault):
    """The second packed forward's base intervention raises (an exception, or an interrupt that torch's
    always-call hooks do not see): the model's hooks, methods and weights are as before, and the
    next sweep gives the numbers of an untouched model."""
    model = model_of("llama")
    base = make_inputs([5, 5], 5, "right", 12)
    metric = readout("llama")
    calls = [0]

    def noisy(x):
        calls[0] += 1
        if calls[0] == 4:  # the base run calls it once, each packed forward once per copy: the second forward
            raise fault("injected")
        return x + 0.5

    before = snapshot(model)
    with wrapped(model) as lab:
        want = sl.sweep(lab, base, base, sites="blocks.*.mlp.out", metric=metric, configs_per_forward=2,
                        base_interventions=[sl.Lambda("embed", lambda x: x + 0.5, positions=[1])])
        with pytest.raises(fault, match="injected"):
            sl.sweep(lab, base, base, sites="blocks.*.mlp.out", metric=metric, configs_per_forward=2,
                     base_interventions=[sl.Lambda("embed", noisy, positions=[1])])
        again = sl.sweep(lab, base, base, sites="blocks.*.mlp.out", metric=metric, configs_per_forward=2,
                         base_interventions=[sl.Lambda("embed", lambda x: x + 0.5, positions=[1])])
    assert_unchanged(model, before, what="a failed sweep")
    torch.testing.assert_close(again.per_example, want.per_example, rtol=0, atol=0)
