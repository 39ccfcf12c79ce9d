"""Attribution patching on tiny models: equal to hand-written gradient × difference, exact where the
model is linear in the patched site, AtP*'s QK fix equal to a softmax recomputed by the model itself,
GradDrop equal to hand-dropped gradients, refinement equal to exact patches; bad input refused."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from torch import nn

import steerlab as sl
from steerlab.interventions.errors import BatchMismatch, ConfigError, FileFormatError, ShapeMismatch, UnitError
from tests.archs import ARCHS, ENCODERS, tiny_model
from tests.interventions._helpers import hook_counts, hooks, real_index, replace_input, replace_output, wrapped
from tests.reliability import CallType, Fault, Scenario, UserHooks, check_fault, fault_cases


def padded(lengths: list[int], seq: int, side: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, seq - n :] = 1
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


METRIC = sl.metrics.logit_diff(5, 7)

# the module whose output (or input) each site is, written out by hand per architecture
PORTS = {
    "llama": {"resid_post": lambda m, L: ("out", m.model.layers[L]), "attn.z": lambda m, L: ("in", m.model.layers[L].self_attn.o_proj),
              "mlp.post": lambda m, L: ("in", m.model.layers[L].mlp.down_proj)},
    "gpt2": {"resid_post": lambda m, L: ("out", m.transformer.h[L]), "attn.z": lambda m, L: ("in", m.transformer.h[L].attn.c_proj),
             "mlp.post": lambda m, L: ("in", m.transformer.h[L].mlp.c_proj)},
}


def hand_values_and_grads(model, arch, site, inputs, layers):
    """Every layer's value at ``site`` and the metric's gradient there, with manual hooks adding zero leaves."""
    leaves, handles = {}, []
    for L in layers:
        side, module = PORTS[arch][site](model, L)

        def add(x, L=L):
            leaves[L] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[L]

        handles.append(replace_output(module, add) if side == "out" else replace_input(module, add))
    with hooks(*handles):
        out = model(**inputs)
        value = METRIC(out.logits, inputs)
        grads = torch.autograd.grad(value.sum(), [leaves[L] for L in layers])
    vals = {L: None for L in layers}
    keep, handles = {}, []
    for L in layers:
        side, module = PORTS[arch][site](model, L)
        handles.append(replace_output(module, lambda x, L=L: keep.__setitem__(L, x.detach()) or x) if side == "out"
                       else replace_input(module, lambda x, L=L: keep.__setitem__(L, x.detach()) or x))
    with hooks(*handles), torch.no_grad():
        model(**inputs)
    vals.update(keep)
    return vals, dict(zip(layers, grads, strict=True)), value.detach()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_atp_equals_hand_gradient_times_difference(arch):
    """Layers × positions, layers × heads (attn.z) and layers × neurons (mlp.post), padded batches on
    different sides: every cell is Σ (a_source − a_base)·∂metric/∂a computed by hand, in fp32."""
    model = tiny_model(arch)
    base, source = padded([6, 4], 6, "left", 1), padded([6, 5], 7, "right", 2)
    positions = [0, 1, -2, -1, [1, 2]]
    layers = [0, 1, 2]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        hand = {site: (hand_values_and_grads(model, arch, site, base, layers), hand_values_and_grads(model, arch, site, source, layers)[0])
                for site in ("resid_post", "attn.z", "mlp.post")}
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    with wrapped(model) as lab:
        res = {
            "resid_post": sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.resid_post", positions=positions),
            "attn.z": sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.attn.z", heads="all", positions=positions),
            "mlp.post": sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.mlp.post", neurons=[0, 5, 17], positions=positions),
        }
    for site, ((bv, bg, metric_value), sv) in hand.items():
        r = res[site]
        torch.testing.assert_close(r.base_metric, metric_value, atol=1e-6, rtol=1e-5)  # logits of the last position only
        for L in layers:
            for j, slot in enumerate(positions):
                for i in range(2):
                    est = torch.zeros(())
                    per = None
                    for p in slot if isinstance(slot, list) else [slot]:
                        bj, sj = real_index(base["attention_mask"], i, p), real_index(source["attention_mask"], i, p)
                        prod = (sv[L][i, sj] - bv[L][i, bj]) * bg[L][i, bj]
                        per = prod if per is None else per + prod
                    if site == "resid_post":
                        est = per.sum()[None]
                    elif site == "attn.z":
                        est = per.view(4, 8).sum(-1)
                    else:
                        est = per[[0, 5, 17]]
                    got = r.per_example[L, j, :, i] - r.base_metric[i]
                    torch.testing.assert_close(got, est, atol=2e-7, rtol=1e-5)
    assert res["attn.z"].dims == ("layer", "position", "head") and res["mlp.post"].dims == ("layer", "position", "neuron")
    assert res["resid_post"].estimate.abs().max() > 1e-4  # the estimates are not all zero


class LinearMixer(nn.Module):
    """A model linear in every site: embed, mix positions causally with fixed weights, read out."""

    def __init__(self, d=8, vocab=11, seq=5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.inp = nn.Linear(d, 16)
        self.mix = nn.Linear(16, 16, bias=False)
        self.register_buffer("weights", torch.rand(seq, seq, generator=g).tril())
        self.out = nn.Linear(16, vocab)
        self.post = nn.Identity()

    def forward(self, x):
        h = self.inp(x)
        h = self.post(torch.einsum("ts,bsd->btd", self.weights, self.mix(h)))
        return self.out(h)


def test_atp_is_exact_for_a_model_linear_in_the_site():
    """Where the metric is linear in the patched site, AtP equals the exact patch: the final norm's
    output of a LLaMA under a logit difference, and every site of a linear model (groups of positions,
    neurons, all positions at once)."""
    model = tiny_model("llama")
    base, source = padded([6, 4], 6, "left", 1), padded([6, 5], 6, "right", 2)
    with wrapped(model) as lab:
        for metric in (METRIC, sl.metrics.logit(9)):
            est = sl.attribution_patching(lab, base, source, metric=metric, sites="final_norm", positions=[0, [1, 2], -1])
            exact = sl.sweep(lab, base, source, metric=metric, sites="final_norm", positions=[0, [1, 2], -1])
            assert exact.effect.abs().max() > 1e-3
            torch.testing.assert_close(est.per_example, exact.per_example, atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    lin = LinearMixer().eval()
    x0, x1 = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    lab = sl.wrap(lin, example_input=x0)
    sites = ["module:inp:output", "module:mix:output", "module:post:output"]
    for kw in ({"positions": "all"}, {"positions": [[0, 2], 4]}, {"positions": None}, {"positions": "all", "neurons": [1, 7]}):
        est = sl.attribution_patching(lab, x0, x1, metric=METRIC, sites=sites, **kw)
        slots = est.positions
        units = est.heads or [None]
        for i, s in enumerate(sites):
            for j, slot in enumerate(slots):
                for u, n in enumerate(units):
                    iv = sl.Interchange(s, positions=slot, dims=None if n is None else [n], source=x1)
                    want = METRIC(lab.run(x0, [iv]).output)
                    torch.testing.assert_close(est.per_example[i, j, u], want, atol=2e-6, rtol=1e-5)
    assert est.effect.abs().max() > 1e-3


def eager(arch: str):
    torch.manual_seed(0)
    cfg = ARCHS[arch]()
    cfg._attn_implementation = "eager"
    return T.AutoModelForCausalLM.from_config(cfg).eval()


DECODERS = sorted(a for a in ARCHS if a not in ENCODERS)


@pytest.mark.parametrize("arch", DECODERS)
def test_qk_fix_equals_the_models_own_softmax_or_is_refused(arch):
    """AtP*'s QK fix on query and key patches (single positions, groups, GQA, left padding): equal to
    Σ ∂metric/∂A · (A' − A) with A' the attention pattern the model itself computes under the patch
    (eager attention) and ∂metric/∂A by autograd through the model; an architecture whose attention
    the fix does not model is refused with a named error, never answered wrongly."""
    model = eager(arch)
    base, source = padded([6, 4], 6, "left", 1), padded([6, 5], 6, "left", 2)
    L = 1
    cases = [("attn.q", [0, -1, [1, 2]]), ("attn.k", [0, -1]), ("attn.k", [[0, 1], [-2, -1]])]
    with wrapped(model) as lab:
        try:
            results = [sl.attribution_patching(lab, base, source, metric=METRIC, sites=f"blocks.{L}.{s}", heads="all", positions=p, qk_fix=True)
                       for s, p in cases]
        except ConfigError as e:
            assert "qk_fix" in str(e)
            assert arch in {"gemma2", "gemma3_text", "qwen3", "olmo2", "gpt_neo"}, f"{arch} refused: {e}"
            return
        emb = model.get_input_embeddings()(base["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, attention_mask=base["attention_mask"], output_attentions=True)
        A = out.attentions[L]
        (gA,) = torch.autograd.grad(METRIC(out.logits, base).sum(), A)
        for (site, positions), r in zip(cases, results, strict=True):
            for j, p in enumerate(positions):
                for u, h in enumerate(r.heads):
                    iv = sl.Interchange(f"blocks.{L}.{site}", positions=p if isinstance(p, list) else [p], heads=[h], source=source)
                    with torch.no_grad():
                        A2 = lab.run(base, [iv], output_attentions=True).output.attentions[L]
                    want = ((A2 - A) * gA).sum((1, 2, 3))
                    torch.testing.assert_close(r.per_example[0, j, u] - r.base_metric, want, atol=1e-7, rtol=1e-4)
    assert arch not in {"gemma2", "gemma3_text", "qwen3", "olmo2"}


def test_qk_fix_closes_a_saturated_softmax():
    """Key patches that move a saturated attention pattern (layer 1's queries and keys scaled 20×):
    plain AtP's linear step through the softmax misreads them (Pearson 0.61 with the exact effects when
    measured); the QK fix recomputes the softmax and is within what follows the pattern (0.998)."""
    model = eager("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(20.0)
        model.model.layers[1].self_attn.k_proj.weight.mul_(20.0)
    base, source = padded([6], 6, "left", 1), padded([6], 6, "left", 4)
    with wrapped(model) as lab:
        kw = dict(metric=METRIC, sites="blocks.1.attn.k", heads="all", positions="all")
        plain = sl.attribution_patching(lab, base, source, **kw)
        fixed = sl.attribution_patching(lab, base, source, qk_fix=True, **kw)
        exact = sl.sweep(lab, base, source, metric=METRIC, sites="blocks.1.attn.k", heads="all", positions="all")
    e_plain = (plain.effect - exact.effect).abs().max()
    e_fixed = (fixed.effect - exact.effect).abs().max()
    assert e_fixed < 0.2 * e_plain, (float(e_fixed), float(e_plain))
    assert plain.compare(exact).pearson < 0.8 < 0.99 < fixed.compare(exact).pearson
    assert fixed.method == "AtP+QK"


def test_grad_drop_equals_hand_dropped_gradients():
    """GradDrop's score: per layer l, the gradient through layer l's attn.out and mlp.out zeroed by
    hand-written hooks; score = Σ_l |estimate_l| / (L or L − 1)."""
    model = tiny_model("llama")
    base, source = padded([6, 4], 6, "left", 1), padded([6, 5], 6, "left", 2)
    with wrapped(model) as lab:
        r = sl.attribution_patching(lab, base, source, metric=METRIC, sites=["blocks.0.resid_post", "blocks.1.mlp.out"],
                                    positions=[0, -1], grad_drop=True)
        src = lab.collect(source, ["blocks.0.resid_post", "blocks.1.mlp.out"])
    blocks = model.model.layers
    ports = {"blocks.0.resid_post": ("out", blocks[0]), "blocks.1.mlp.out": ("out", blocks[1].mlp)}
    for p in model.parameters():
        p.requires_grad_(False)
    scores = torch.zeros(2, 2, 2)
    try:
        for drop in range(3):
            leaves, hs = {}, []
            for name, (_, module) in ports.items():
                def add(x, name=name):
                    leaves[name] = torch.zeros_like(x, requires_grad=True)
                    return x + leaves[name]
                hs.append(replace_output(module, add))
            stop = lambda x: x.detach() + 0 * x  # noqa: E731  the gradient through it is zero
            hs += [replace_output(blocks[drop].self_attn, stop), replace_output(blocks[drop].mlp, stop)]
            with hooks(*hs):
                out = model(**base)
                g = torch.autograd.grad(METRIC(out.logits, base).sum(), [leaves[n] for n in ports])
            for k, name in enumerate(ports):
                with hooks(replace_output(ports[name][1], lambda x, name=name: leaves.__setitem__("v", x.detach()) or x)), torch.no_grad():
                    model(**base)
                for j, p in enumerate([0, -1]):
                    for i in range(2):
                        bj = real_index(base["attention_mask"], i, p)
                        sj = real_index(source["attention_mask"], i, p)
                        scores[k, j, i] += ((src[name][i, sj] - leaves["v"][i, bj]) * g[k][i, bj]).sum().abs()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    scores[0] /= 3  # a residual site: no layer's drop cuts it at the root
    scores[1] /= 2  # layer 1's MLP output: its own layer's drop zeroes it
    torch.testing.assert_close(r.score[:, :, 0], scores, atol=1e-7, rtol=1e-5)
    assert r.method == "AtP+GradDrop" and r.meta["backwards"] == 4
    assert r.top_cells(1)[0] == tuple(int(x) for x in torch.nonzero(r.score.mean(-1) == r.score.mean(-1).max())[0])


def test_refine_patches_the_top_cells_exactly():
    model = tiny_model("llama")
    base, source = padded([6, 4], 6, "left", 1), padded([6, 5], 6, "left", 2)
    with wrapped(model) as lab:
        r = sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.attn.z", heads="all", positions=[0, -1], refine=5)
        exact = sl.sweep(lab, base, source, metric=METRIC, sites="blocks.*.attn.z", heads="all", positions=[0, -1])
        n = sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.1.mlp.post", neurons="all", positions=[-1], refine=3)
        neuron_exact = []
        for i, j, u in n.top_cells(3):
            iv = sl.Interchange("blocks.1.mlp.post", positions=[-1], dims=[n.heads[u]], source=source)
            neuron_exact.append(METRIC(lab.run(base, [iv]), base))
    done = ~r.exact.isnan()
    assert int(done[..., 0].sum()) == 5
    for i, j, u in r.top_cells(5):
        assert done[i, j, u].all()
    torch.testing.assert_close(r.exact[done], exact.per_example[done])
    assert len(r.refined()) == 5 and "refined" in r.table() and r.meta["refine_forwards"] >= 3 * len({i for i, _, _ in r.top_cells(5)})  # a sweep per site touched
    for (i, j, u), want in zip(n.top_cells(3), neuron_exact, strict=True):
        torch.testing.assert_close(n.exact[i, j, u], want)


def test_result_views_compare_and_round_trip(tmp_path):
    model = tiny_model("llama")
    base, source = padded([6, 6], 6, "left", 1), padded([6, 6], 6, "left", 2)
    with wrapped(model) as lab:
        r = sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.attn.z", heads="all", positions=[-1], grad_drop=True, refine=2)
        exact = sl.sweep(lab, base, source, metric=METRIC, sites="blocks.*.attn.z", heads="all", positions=[-1])
        other = sl.sweep(lab, base, source, metric=METRIC, sites="blocks.*.attn.z", heads="all", positions=[0])
    c = r.compare(exact, k=4)
    assert -1 <= c.spearman <= 1 and 0 <= c.overlap <= 1
    assert c.rows()[0]["cells"] == 3 * 4 and "Spearman" in c.table()
    worst = c.failures(3)
    errors = (r.effect - exact.effect).abs().flatten().sort(descending=True).values[:3]
    assert [abs(f["error"]) for f in worst] == pytest.approx(errors.tolist(), rel=1e-5)
    assert all(f["error"] == pytest.approx(f["estimate"] - f["exact"], abs=1e-6) for f in worst)
    with pytest.raises(ShapeMismatch, match="positions"):
        r.compare(other)
    with pytest.raises(ConfigError, match="exact SweepResult"):
        r.compare(r)
    assert r.dims == ("layer", "head") and "AtP+GradDrop" in repr(r)
    fig = r.plot()
    assert fig.data[0].z is not None and "GradDrop" in fig.layout.title.text
    assert len(r.plot(value="score").data) == 1
    cmp = c.plot()
    assert [t.type for t in cmp.data] == ["heatmap", "heatmap", "scatter", "scatter"]
    assert len(cmp.data[2].x) == 12 and list(cmp.data[2].x) == [float(x) for x in exact.effect.flatten()]
    r.save(tmp_path / "a")
    back = sl.AttributionResult.load(tmp_path / "a")
    assert torch.equal(back.per_example, r.per_example) and torch.equal(back.score, r.score)
    assert torch.equal(back.exact.nan_to_num(7.0), r.exact.nan_to_num(7.0)) and back.method == r.method and back.unit == "head"
    with pytest.raises(FileFormatError):
        sl.SweepResult.load(tmp_path / "a")


def test_bad_input_is_refused_before_compute_and_the_model_is_left_as_found():
    model = tiny_model("llama")
    base, source = padded([6, 4], 6, "left", 1), padded([6, 5], 6, "left", 2)
    before = hook_counts(model)
    flags = [p.requires_grad for p in model.parameters()]
    with wrapped(model) as lab:
        cases = [
            (dict(metric=sl.metrics.kl_to_base()), ConfigError, "kl_to_base"),
            (dict(heads="all", neurons=True, sites="blocks.*.attn.z"), UnitError, "not both"),
            (dict(neurons=True, sites="blocks.*.attn.z"), UnitError, "per-head"),
            (dict(heads="all", sites="blocks.*.resid_post"), UnitError, "not a per-head site"),
            (dict(neurons=True, sites=["blocks.0.mlp.post", "blocks.0.resid_post"]), UnitError, "one width"),
            (dict(refine=-1), ConfigError, "refine"),
            (dict(qk_fix="yes"), ConfigError, "qk_fix"),
            (dict(positions="all"), ShapeMismatch, "real lengths differ"),
            (dict(positions=[9]), UnitError, "9"),
            (dict(sites="blocks.7.resid_post"), KeyError, "out of range"),
            (dict(heads=[4], sites="blocks.0.attn.z"), UnitError, "out of range"),
        ]
        for kw, err, text in cases:
            args = {"metric": METRIC, "sites": "blocks.*.resid_post", "positions": [-1], **kw}
            with pytest.raises(err, match=text):
                sl.attribution_patching(lab, base, source, **args)
        with pytest.raises(BatchMismatch, match="batch 3"):
            sl.attribution_patching(lab, base, padded([6, 6, 6], 6, "left", 3), metric=METRIC, positions=[-1])

        def boom(output, inputs):
            raise RuntimeError("metric failed")

        with pytest.raises(RuntimeError, match="metric failed"):
            sl.attribution_patching(lab, base, source, metric=boom, positions=[-1], grad_drop=True)
        with pytest.raises(KeyboardInterrupt):
            sl.attribution_patching(lab, base, source, metric=lambda o, i: (_ for _ in ()).throw(KeyboardInterrupt()), positions=[-1])
        assert hook_counts(model) == before
        out = lab.run(base).logits
    assert [p.requires_grad for p in model.parameters()] == flags
    with torch.no_grad():
        assert torch.equal(out, model(**base).logits)
    assert not math.isnan(float(out.sum()))


# -------------------------------------------------------------------------- faults (RELIABILITY rows 1-2, 15)
def _call_attribution(sc: Scenario, f: Fault) -> torch.Tensor:
    """AtP* over an in-place site and a residual site (GradDrop's extra backwards), the QK fix at keys, and
    integrated gradients inside a subspace; the metric's backward is where the backward faults enter."""
    source = f.source_inputs(sc, sc.source)

    def metric(out, inputs):
        return f.backward_wrap(METRIC(out, inputs))

    a = sl.attribution_patching(sc.lab, sc.base, source, metric=metric, sites=[sc.site(0, "resid_mid"), sc.site(1, "resid_post")],
                                positions=[0, -1], grad_drop=True)
    b = sl.attribution_patching(sc.lab, sc.base, source, metric=metric, sites=sc.site(1, "attn.k"), heads="all", positions=[-1], qk_fix=True)
    S = sl.Subspace(basis_rows(2, sc.width), sc.site(1, "resid_post"), positions=-1)
    c = sl.integrated_gradients(sc.lab, sc.base, source, S, metric=metric, steps=2)
    return torch.cat([a.per_example.flatten(), a.score.flatten(), b.per_example.flatten(), c.attributions.flatten()])


def basis_rows(k: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.linalg.qr(torch.randn(d, k, generator=g))[0].T.contiguous()


ATTRIBUTION = CallType("attribution", _call_attribution, frozenset({"source", "backward"}))
ATTRIBUTION_FAULTS = list({f.name: f for _, f in fault_cases(faults=None) if f.channel in ATTRIBUTION.channels | {"context"}
                           and f.make_iv is None}.values())
_SC: dict[str, tuple[Scenario, UserHooks]] = {}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("fault", ATTRIBUTION_FAULTS, ids=[f.name for f in ATTRIBUTION_FAULTS])
def test_attribution_fault_leaves_model_as_found(arch, fault):
    """A failing source, a failing backward, a user hook or the model raising mid-forward, an interrupt:
    the model's hooks, flags and outputs are as before, the user's hooks still fire, and the next
    call's numbers equal a clean call's exactly."""
    if arch not in _SC:
        sc = Scenario.of(tiny_model(arch))
        _SC[arch] = (sc, UserHooks().install(sc.model, sc.lab.layers, [sc.lab.resolve(sc.site(1, "mlp.out")).module]))
    sc, user = _SC[arch]
    check_fault(sc, ATTRIBUTION, fault, user_hooks=user)


def test_long_calls_draw_their_bars_on_stderr_only(capsys):
    """GradDrop's passes, refine's exact patches and integrated gradients' chunks draw a progress bar when
    asked (and none when not); results never go to stdout."""
    model = tiny_model("llama")
    base, source = padded([6, 6], 6, "left", 1), padded([6, 6], 6, "left", 2)
    with wrapped(model) as lab:
        sl.attribution_patching(lab, base, source, metric=METRIC, positions=[-1], grad_drop=True, refine=2, progress=False)
        assert capsys.readouterr().err == ""
        sl.attribution_patching(lab, base, source, metric=METRIC, positions=[-1], grad_drop=True, refine=2, progress=True)
        S = sl.Subspace(basis_rows(2, 32), "blocks.1.resid_post", positions=-1)
        sl.integrated_gradients(lab, base, source, S, metric=METRIC, steps=4, chunk=2, progress=True)
    captured = capsys.readouterr()
    assert "GradDrop: 100%" in captured.err and "refine: exact patches: 100%" in captured.err
    assert "integrated gradients: 100%" in captured.err and captured.out == ""


def test_a_nan_estimate_is_a_nan_cell_never_dropped():
    """The sibling of SweepResult's NaN rule: an example whose estimate is NaN makes its cell's mean,
    ranking and top entries NaN instead of silently averaging the other examples."""
    import math

    from steerlab.interventions.attribution_result import AttributionResult

    per = torch.tensor([[[[1.0, 3.0]], [[2.0, float("nan")]]]])  # site 1 x slot 2 x unit 1 x batch 2
    r = AttributionResult(per_example=per, base_metric=torch.zeros(2), source_metric=torch.ones(2), sites=["s"], layers=[0],
                          positions=[[0], [1]], tokens=["a", "b"], heads=None, metric="logit_diff", forwards=2,
                          configs_per_forward=0, filled=torch.ones(per.shape, dtype=torch.bool))
    assert r.values.flatten()[0].item() == 2.0 and math.isnan(r.values.flatten()[1].item())
    assert math.isnan(r.ranking.flatten()[1].item())
