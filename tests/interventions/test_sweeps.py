"""Packed patching sweeps against the serial loop of ``lab.run(base, [Interchange(...)])``.

Every cell of a sweep must equal the metric of one serial patched run to
<= 1e-5 (fp32): a packed forward multiplies matrices with C times more rows
than a serial one, and the CPU kernels may then sum in another order (seen:
0 to 5e-8 on the tiny decoders, ~1e-6 on BERT, whose attention takes another
path for a larger batch). A wrong row, position or head is off by > 1e-2.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import pytest
import torch

import steerlab as sl
from steerlab.interventions.inputs import Inputs
from tests.archs import tiny_model
from tests.interventions._helpers import hidden_arg, wrapped
from tests.reliability import (
    CALL_TYPES,
    Fault,
    InjectedFault,
    Scenario,
    UserHooks,
    assert_unchanged,
    check_fault,
    fault_cases,
    one_thread_fixture,
    snapshot,
)

_one_thread = one_thread_fixture()

TOL = 1e-5
KINDS = ["resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out"]


@functools.cache
def model_of(arch: str):
    return tiny_model(arch)


def make_inputs(lengths: list[int], seq: int, side: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1 if side == "right" else 0
        if side == "left":
            mask[i, seq - n :] = 1
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def readout(arch: str):
    """A metric for every architecture: the logit difference of tokens 5 and 7 at the
    last real token; BERT (no LM head) reads a fixed projection of its last hidden state."""
    if arch != "bert":
        return sl.metrics.logit_diff(5, 7)
    w = torch.randn(32, generator=torch.Generator().manual_seed(3))

    def last_projection(output, inputs):
        h = output.last_hidden_state
        last = inputs.mask_info().starts + inputs.mask_info().lengths - 1
        return h[torch.arange(h.shape[0]), last] @ w

    return last_projection


def serial(lab, base, source, result, metric) -> torch.Tensor:
    """The same grid, one ``lab.run`` per configuration (NaN where a slot is past an example)."""
    out = torch.full_like(result.per_example, math.nan)
    inp = Inputs.of(base)
    for s, site in enumerate(result.sites):
        for q, slot in enumerate(result.positions):
            for h, head in enumerate(result.heads or [None]):
                iv = sl.Interchange(site, positions=slot, heads=None if head is None else [head], source=source)
                out[s, q, h] = metric(lab.run(base, [iv]).output, inp)
    return out


def assert_equal_cells(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    diff = (got - want).nan_to_num(0).abs().max().item()
    assert diff <= tol, f"packed sweep differs from the serial loop by {diff}"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "bert"])
def test_site_sweep_equals_serial_loop(arch):
    model = model_of(arch)
    base, source = make_inputs([5, 5], 5, "right", 1), make_inputs([5, 5], 5, "right", 2)
    metric = readout(arch)
    before = snapshot(model)
    with wrapped(model) as lab:
        # 7 configurations per forward: chunks straddle sites and layers, so prefixes start mid-chunk
        res = sl.sweep(lab, base, source, sites=[f"blocks.*.{k}" for k in KINDS], metric=metric, configs_per_forward=7)
        want = serial(lab, base, source, res, metric)
    assert_unchanged(model, before, what="sweep")
    assert res.dims == ("site", "position") and res.values.shape == (15, 5)
    assert res.forwards == math.ceil(75 / 7)
    assert_equal_cells(res.per_example, want, TOL)
    assert res.per_example.std() > 0  # the patches do move the metric


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "bert"])
def test_head_sweep_equals_serial_loop(arch):
    model = model_of(arch)
    base, source = make_inputs([6, 4], 6, "left", 3), make_inputs([6, 4], 6, "left", 4)
    metric = readout(arch)
    with wrapped(model) as lab:
        every = sl.sweep(lab, base, source, sites="blocks.*.attn.z", heads="all", metric=metric, configs_per_forward=5)
        assert every.dims == ("layer", "head") and every.values.shape == (3, 4)
        assert_equal_cells(every.per_example, serial(lab, base, source, every, metric), TOL)
        some = sl.sweep(lab, base, source, sites="blocks.1.attn.z", heads=[1, 3], positions=[0, [1, 2], -1], metric=metric)
        assert some.dims == ("layer", "position", "head") and some.values.shape == (1, 3, 2)
        assert_equal_cells(some.per_example, serial(lab, base, source, some, metric), TOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_all_positions_under_padding(side):
    """``positions="all"`` over examples of different lengths: slot p patches real token p
    of each example that has one (checked with per-example positions), NaN elsewhere."""
    model = model_of("llama")
    lengths = [6, 4, 5]
    base, source = make_inputs(lengths, 7, side, 5), make_inputs(lengths, 7, side, 6)
    metric = readout("llama")
    with wrapped(model) as lab:
        res = sl.sweep(lab, base, source, sites=["blocks.0.resid_post", "blocks.2.mlp.out"], metric=metric, configs_per_forward=4)
        assert res.positions == [[p] for p in range(6)]
        want = torch.full_like(res.per_example, math.nan)
        for s, site in enumerate(res.sites):
            for p in range(6):
                per_example = torch.tensor([[p if p < n else -1] for n in lengths])
                out = lab.run(base, [sl.Interchange(site, positions=per_example, source=source)])
                v = metric(out.output, base)
                want[s, p, 0] = torch.where(torch.tensor([p < n for n in lengths]), v, math.nan)
    assert_equal_cells(res.per_example, want, TOL)
    assert res.per_example[:, 5, 0, 1:].isnan().all() and not res.per_example[:, 3].isnan().any()
    # means skip the empty cells
    torch.testing.assert_close(res.values[:, 4], res.per_example[:, 4, 0, [0, 2]].mean(-1), rtol=0, atol=0)


def test_source_of_one_is_broadcast():
    model = model_of("gpt2")
    base, source = make_inputs([5, 5, 5], 5, "right", 7), make_inputs([5], 5, "right", 8)
    metric = readout("gpt2")
    with wrapped(model) as lab:
        res = sl.sweep(lab, base, source, sites="blocks.1.resid_pre", positions=[1, -1], metric=metric)
        want = serial(lab, base, source, res, metric)
        src3 = {k: v.repeat(3, 1) for k, v in source.items()}
        torch.testing.assert_close(res.source_metric, metric(lab.run(src3).output, Inputs.of(src3)), rtol=0, atol=0)
    assert_equal_cells(res.per_example, want, TOL)


def test_packing_and_prefix_reuse():
    """A layer-2 sweep packs C configurations per forward and never recomputes blocks 0 and 1."""
    model = model_of("llama")
    base, source = make_inputs([6, 6], 6, "right", 9), make_inputs([6, 6], 6, "right", 10)
    calls: dict[str, list[int]] = {"block0": [], "block2": [], "root": []}
    with wrapped(model) as lab:
        run = lambda: sl.sweep(lab, base, source, sites="blocks.2.resid_post", metric=readout("llama"), configs_per_forward=4)  # noqa: E731
        run()  # the lab learns its site shapes (tiny probe forwards) once
        hooks = [
            model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: calls["block0"].append(a[0].shape[0])),
            model.model.layers[2].mlp.register_forward_hook(lambda m, a, o: calls["block2"].append(a[0].shape[0])),
            model.register_forward_hook(lambda m, a, o: calls["root"].append(1)),
        ]
        try:
            res = run()
        finally:
            for h in hooks:
                h.remove()
    assert res.forwards == 2  # 6 positions, 4 per forward
    assert len(calls["root"]) == 2 + 2  # the base and source runs, then the packed forwards
    assert calls["block0"] == [2, 2]  # only the unpatched base and source runs compute block 0
    assert calls["block2"] == [2, 2, 4 * 2, 2 * 2]  # packed: configurations x examples rows


def test_metric_restores_the_source_where_it_must():
    """Two closed forms: patching every position of block 0's input, or the last position
    of the last block's output, makes the run the source run (normalised effect 1)."""
    model = model_of("llama")
    base, source = make_inputs([5, 5], 5, "right", 11), make_inputs([5, 5], 5, "right", 12)
    with wrapped(model) as lab:
        whole = sl.sweep(lab, base, source, sites="blocks.0.resid_pre", positions=None, metric=readout("llama"))
        last = sl.sweep(lab, base, source, sites="blocks.2.resid_post", positions=[-1, 0], metric=readout("llama"))
    torch.testing.assert_close(whole.per_example[0, 0, 0], whole.source_metric, rtol=0, atol=1e-6)
    assert whole.normalised.item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(last.per_example[0, 0, 0], last.source_metric, rtol=0, atol=1e-6)
    torch.testing.assert_close(last.per_example[0, 1, 0], last.base_metric, rtol=0, atol=1e-6)  # position 0 is not read


@pytest.mark.slow
def test_smollm_sweep_equals_serial_loop(smollm):
    model, tok = smollm
    base = ["The Eiffel Tower is in the city of", "The Louvre museum is in the city of"]
    source = ["The Colosseum is located in the city of", "The Vatican museums are in the city of"]
    enc = lambda texts: dict(tok(texts, return_tensors="pt", padding=True))  # noqa: E731
    b, s = enc(base), enc(source)
    metric = sl.metrics.logit_diff(" Rome", " Paris", tokenizer=tok)
    with wrapped(model, tok) as lab:
        res = sl.sweep(lab, b, s, sites=["blocks.4.resid_post", "blocks.12.attn.out", "blocks.29.resid_pre"], positions=[2, -1], metric=metric)
        want = serial(lab, b, s, res, metric)
        heads = sl.sweep(lab, b, s, sites="blocks.20.attn.z", heads=[3, 8], positions=-1, metric=metric)
        want_heads = serial(lab, b, s, heads, metric)
    assert_equal_cells(res.per_example, want, 1e-5)
    assert_equal_cells(heads.per_example, want_heads, 1e-5)
    assert res.source_value > 0 > res.base_value  # the model knows both cities
    assert res.tokens[-1] == " of" and res.dims == ("site", "position")


# -------------------------------------------------------------------------- the result object
def test_result_views_and_round_trip(tmp_path):
    model = model_of("gpt2")
    base, source = make_inputs([4, 4], 4, "right", 13), make_inputs([4, 4], 4, "right", 14)
    with wrapped(model) as lab:
        res = sl.sweep(lab, base, source, sites="blocks.*.attn.out", metric=sl.metrics.logit_diff(5, 7))
    b, s = res.base_metric.mean(), res.source_metric.mean()
    torch.testing.assert_close(res.values, res.per_example[:, :, 0].mean(-1))
    torch.testing.assert_close(res.normalised, (res.values - b) / (s - b))
    text = res.table()
    assert text.splitlines()[1].split() == ["layer", "'0'", "'1'", "'2'", "'3'"]  # no tokenizer: positions
    assert f"{res.values[2, 3].item():.3f}" in text.splitlines()[-1]
    assert "<table>" in res._repr_html_() and "logit_diff(5, 7)" in repr(res)
    top = res.top(1)[0]
    assert abs(top[2]) == res.effect.abs().max().item()
    res.save(tmp_path / "sweep")
    back = sl.SweepResult.load(tmp_path / "sweep")
    assert torch.equal(back.per_example, res.per_example) and back.per_example.dtype == res.per_example.dtype
    assert (back.sites, back.positions, back.tokens, back.heads, back.metric) == (res.sites, res.positions, res.tokens, res.heads, res.metric)
    with pytest.raises(sl.FileFormatError, match="; expected 'patching-sweep'"):
        with wrapped(model) as lab:
            lab.save(tmp_path / "ivs", [sl.Zero("blocks.0.resid_post")])
        sl.SweepResult.load(tmp_path / "ivs")
    # a file whose grid does not match its labels is refused
    res.positions = res.positions[:-1]
    res.tokens = res.tokens[:-1]
    res.save(tmp_path / "bad")
    with pytest.raises(sl.FileFormatError, match=r"per_example is float32\[3, 4, 1, 2\]; the configuration says shape \[3, 3, 1, 2\]"):
        sl.SweepResult.load(tmp_path / "bad")
    with pytest.raises(sl.FingerprintMismatch, match="saved for another model"):
        back.save(tmp_path / "fp", fingerprint={"model_type": "gpt2", "width": 32})
        sl.SweepResult.load(tmp_path / "fp", fingerprint={"model_type": "gpt2", "width": 64})


def test_a_nan_metric_is_a_nan_mean_and_empty_cells_are_skipped(tmp_path):
    """Empty cells (a slot beyond an example's length) are known from the plan (``filled``); a NaN the
    metric returns for a patched example is a NaN mean, never dropped as nanmean would."""
    model = model_of("llama")
    lengths = [6, 4, 5]
    base, source = make_inputs(lengths, 7, "left", 5), make_inputs(lengths, 7, "left", 6)
    plain = readout("llama")

    def nan_on_the_second(output, inputs):
        v = plain(output, inputs).clone()
        v.view(-1, len(lengths))[:, 1] = math.nan  # example 1 of every packed config: 4 tokens, so patched in slots 0..3 only
        return v

    with wrapped(model) as lab:
        res = sl.sweep(lab, base, source, sites=["blocks.0.resid_post"], metric=nan_on_the_second)
    assert res.filled[0, :, 0].tolist() == [[p < n for n in lengths] for p in range(6)]
    assert res.values[0, :4].isnan().all()  # a patched example's NaN makes the mean NaN
    torch.testing.assert_close(res.values[0, 4], res.per_example[0, 4, 0, [0, 2]].mean(), rtol=0, atol=0)  # empty for 1
    torch.testing.assert_close(res.values[0, 5], res.per_example[0, 5, 0, 0], rtol=0, atol=0)  # only example 0 has 6 tokens
    res.save(tmp_path / "s")
    back = sl.SweepResult.load(tmp_path / "s")
    assert torch.equal(back.filled, res.filled) and torch.equal(back.values.isnan(), res.values.isnan())


# -------------------------------------------------------------------------- bad input
@pytest.fixture
def lab_llama():
    model = model_of("llama")
    before = snapshot(model)
    with wrapped(model) as lab:
        yield lab
    assert_unchanged(model, before, what="a sweep that raised")


def _both(lengths=(5, 5)):
    return make_inputs(list(lengths), 5, "right", 1), make_inputs(list(lengths), 5, "right", 2)


def test_unknown_site_pattern(lab_llama):
    b, s = _both()
    with pytest.raises(sl.SiteNotFound, match=r"unknown site 'blocks\.\*\.resid_psot': the pattern matches no site"):
        sl.sweep(lab_llama, b, s, sites="blocks.*.resid_psot", metric=sl.metrics.logit(5))
    with pytest.raises(sl.SiteNotFound, match=r"'blocks\.7\.resid_post': layer 7 is out of range: the model has 3 layers"):
        sl.sweep(lab_llama, b, s, sites="blocks.7.resid_post", metric=sl.metrics.logit(5))


def test_batch_and_length_mismatch(lab_llama):
    b, _ = _both()
    s3 = make_inputs([5, 5, 5], 5, "right", 2)
    with pytest.raises(sl.BatchMismatch, match=r"the source has batch 3 but the base has 2; expected equal batches \(or a source of 1"):
        sl.sweep(lab_llama, b, s3, metric=sl.metrics.logit(5))
    longer = make_inputs([6, 6], 6, "right", 2)
    with pytest.raises(sl.ShapeMismatch, match=r"real lengths differ \(base \[5, 5\], source \[6, 6\]\); give positions="):
        sl.sweep(lab_llama, b, longer, metric=sl.metrics.logit(5))
    # explicit positions align each side's own real tokens: fine
    res = sl.sweep(lab_llama, b, longer, positions=[-1], sites="blocks.2.resid_post", metric=sl.metrics.logit(5))
    assert res.values.shape == (1, 1)
    spec = sl.sweep(lab_llama, b, longer, positions="f1+l2", sites="blocks.2.resid_post", metric=sl.metrics.logit(5))
    assert spec.positions == [[0], [-2], [-1]]
    with pytest.raises(sl.PositionOutOfRange, match=r"positions=5 is beyond example 0, which has 5 real tokens"):
        sl.sweep(lab_llama, b, longer, positions=[0, 5], metric=sl.metrics.logit(5))


def test_heads_on_a_site_without_heads(lab_llama):
    b, s = _both()
    with pytest.raises(sl.UnitError, match=r"heads='all' sweeps heads, but 'blocks\.0\.resid_post' is not a per-head site"):
        sl.sweep(lab_llama, b, s, sites="blocks.*.resid_post", heads="all", metric=sl.metrics.logit(5))
    with pytest.raises(sl.UnitError, match=r"heads=\[4\] out of range: the swept sites have 4 heads \(0\.\.3\)"):
        sl.sweep(lab_llama, b, s, sites="blocks.*.attn.z", heads=[1, 4], metric=sl.metrics.logit(5))


def test_bad_arguments(lab_llama):
    b, s = _both()
    with pytest.raises(sl.ConfigError, match="configs_per_forward=0: expected a positive int"):
        sl.sweep(lab_llama, b, s, metric=sl.metrics.logit(5), configs_per_forward=0)
    with pytest.raises(sl.UnitError, match=r"each entry is a position \(int\) or a group"):
        sl.sweep(lab_llama, b, s, positions=[0, "x"], metric=sl.metrics.logit(5))
    with pytest.raises(sl.ConfigError, match="metric=3: expected a steerlab metric"):
        sl.sweep(lab_llama, b, s, metric=3)
    with pytest.raises(sl.ShapeMismatch, match=r"the metric 'scalar' returned \(\); expected one value per example, shape \(2,\)"):
        sl.sweep(lab_llama, b, s, metric=_named(lambda out, inp: out.logits.sum(), "scalar"), sites="blocks.0.resid_post")
    with pytest.raises(sl.ConfigError, match=r"' Paris' is a string but the metric has no tokenizer"):
        sl.sweep(lab_llama, b, s, metric=sl.metrics.logit_diff(" Paris", 3))


def _named(fn, name):
    fn.__name__ = name
    return fn


def test_multi_token_metric_token(smollm):
    model, tok = smollm
    with wrapped(model, tok) as lab:
        before = snapshot(model, contents=False)
        with pytest.raises(sl.ConfigError, match=r"bad=' Tchaikovsky' is \d+ tokens under this tokenizer \(\[.*\]\); a metric token must be a single token"):
            sl.sweep(lab, "The city of", "The town of", metric=sl.metrics.logit_diff(" Paris", " Tchaikovsky"))
        assert_unchanged(model, before, what="a sweep with a bad metric token")


# -------------------------------------------------------------------------- faults (RELIABILITY rows 1-2)
SWEEP = CALL_TYPES["sweep"]  # the battery's sweep call type (tests/reliability.py)


@contextmanager
def _packed_forward_raising(sc: Scenario, exc: BaseException):
    """The last block fails in the second packed forward, which resumes from a prefix (block 0 skipped)."""
    packed = [0]

    def hook(module, args, kwargs):
        if hidden_arg(args, kwargs).shape[0] > sc.base["input_ids"].shape[0]:
            packed[0] += 1
            if packed[0] == 2:
                assert "forward" in vars(sc.lab.layers[0]), "the prefix is not in use"
                raise exc

    h = sc.lab.layers[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


SWEEP_FAULTS = [f for _, f in fault_cases(faults=None) if f.channel in SWEEP.channels | {"context"}]
SWEEP_FAULTS = list({f.name: f for f in SWEEP_FAULTS}.values()) + [
    Fault("packed_forward_raises", "context", InjectedFault, "injected: packed",
          make_context=lambda sc: _packed_forward_raising(sc, InjectedFault("injected: packed forward failed"))),
    Fault("keyboard_interrupt_in_packed_forward", "context", KeyboardInterrupt,
          make_context=lambda sc: _packed_forward_raising(sc, KeyboardInterrupt())),
]
_SC: dict[str, tuple[Scenario, UserHooks]] = {}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("fault", SWEEP_FAULTS, ids=[f.name for f in SWEEP_FAULTS])
def test_sweep_fault_leaves_model_as_found(arch, fault):
    if arch not in _SC:
        sc = Scenario.of(tiny_model(arch))
        _SC[arch] = (sc, UserHooks().install(sc.model, sc.lab.layers, [sc.lab.resolve(sc.site(1, "mlp.out")).module]))
    sc, hooks = _SC[arch]
    check_fault(sc, SWEEP, fault, user_hooks=hooks)


def test_automatic_packing_follows_the_cost_model(monkeypatch):
    """Free forwards: one forward per start layer (each from its own prefix); costly
    forwards: everything in as few forwards as memory allows. Same numbers either way."""
    from steerlab.interventions import sweeps

    model = model_of("llama")
    base, source = make_inputs([5, 5], 5, "right", 15), make_inputs([5, 5], 5, "right", 16)
    metric = readout("llama")
    with wrapped(model) as lab:
        monkeypatch.setitem(sweeps.OVERHEAD, "cpu", 0.0)
        split = sl.sweep(lab, base, source, sites="blocks.*.resid_post", metric=metric)
        monkeypatch.setitem(sweeps.OVERHEAD, "cpu", 1e12)
        merged = sl.sweep(lab, base, source, sites="blocks.*.resid_post", metric=metric)
        monkeypatch.setitem(sweeps.AUTO_TOKENS, "cpu", 40)  # 4 configurations of 2 x 5 tokens
        capped = sl.sweep(lab, base, source, sites="blocks.*.resid_post", metric=metric)
    assert (split.forwards, split.configs_per_forward) == (3, 5)
    assert (merged.forwards, merged.configs_per_forward) == (1, 15)
    assert capped.forwards == 4 and capped.configs_per_forward == 4
    assert_equal_cells(split.per_example, merged.per_example, TOL)
    assert_equal_cells(capped.per_example, merged.per_example, TOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_forwards_compute_only_the_logits_the_metric_reads(side):
    """A last-token metric: the LM head runs on the last position (left padding) or on the
    window that holds every example's last real token (right padding); same numbers."""
    model = model_of("llama")
    base, source = make_inputs([6, 4], 6, side, 17), make_inputs([6, 4], 6, side, 18)
    metric = readout("llama")
    rows: list[tuple[int, ...]] = []
    with wrapped(model) as lab:
        h = model.lm_head.register_forward_hook(lambda m, a, o: rows.append(tuple(o.shape[:2])))
        try:
            res = sl.sweep(lab, base, source, sites="blocks.*.mlp.out", positions=[0, -1], metric=metric, configs_per_forward=6)
        finally:
            h.remove()
        want = serial(lab, base, source, res, metric)
    assert rows[-3:] == [(2, 6), (2, 6), (12, 1 if side == "left" else 3)]  # the full base and source runs, then packed
    assert_equal_cells(res.per_example, want, TOL)
