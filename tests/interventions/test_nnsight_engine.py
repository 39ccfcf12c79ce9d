"""The nnsight engine: the same run graphs as the hook engine, through nnsight traces.

Checked against the hook engine (same graphs, outputs and caches to rounding)
on tiny LLaMA, GPT-2 and BERT and on SmolLM2; against a hand-written nnsight
trace (nnsight's own indexing, no steerlab code in the loop); that it really
runs through nnsight (the hook engine disabled); early exit and batched
sources; gradients; bad input (the hook engine's errors, before compute);
the remote path (nnsight's serverless rehearsal; ``remote=True`` is opened up
to the network boundary in test_nnsight_models.py); and the fault battery of
RELIABILITY rows 1-2 (every fault kind, on a graph call and on a DAS training
step, with the user's own hooks in place).
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.interventions import hooks as hooks_mod
from tests.archs import tiny_inputs, tiny_model
from tests.interventions._helpers import in_fresh_interpreter, wrapped
from tests.reliability import (
    CALL_TYPES,
    NO_FAULT,
    CallType,
    Scenario,
    UserHooks,
    assert_unchanged,
    check_fault,
    fault_cases,
    one_thread_fixture,
    register_call_type,
    snapshot,
)

_one_thread = one_thread_fixture()


def _out(res, arch: str) -> torch.Tensor:
    return res.output.last_hidden_state if arch == "bert" else res.logits


def _plain(model, inputs, arch: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if arch == "bert" else out.logits


def _rich_graph(arch: str, width: int, n_layers: int):
    """Base + two sources + path patching, every kind of unit and several intervention types."""
    side = "right" if arch == "bert" else "left"
    base = tiny_inputs(arch, pad=2, side=side)
    src1 = tiny_inputs(arch, seed=5, pad=1, side=side)
    src2 = tiny_inputs(arch, seed=9)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(4)
    graph = sl.Graph()
    clean = graph.run(src1, name="clean")
    mid = graph.run(base, [sl.Interchange("blocks.0.attn.z", heads=[1, 3], positions=-1, source=clean)], name="mid")
    last = n_layers - 1
    out = graph.run(
        base,
        [
            sl.Interchange("blocks.0.resid_post", positions=[0, -1], source=clean),
            sl.SubspaceInterchange("blocks.1.resid_mid", size=3, positions="f1+l2", source=src2),  # in place where the arch has it
            sl.Add("blocks.1.mlp.out", torch.randn(width, generator=g), positions=-2),
            sl.Zero("blocks.1.attn.v", heads=[0], positions=0),
            sl.Scale("blocks.2.mlp.post", factor=1.7),
            sl.Collect("blocks.1.resid_post"),
            sl.Collect("blocks.0.attn.q", heads=[2], positions=[0, -1]),
            sl.Interchange(f"blocks.{last}.resid_post", positions=-1, source=mid),  # path patching
        ],
        name="out",
    )
    return graph, out, base


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_agrees_with_hook_engine_on_tiny_models(arch):
    model = tiny_model(arch)
    with wrapped(model) as lab:
        graph, out, base = _rich_graph(arch, lab.d_model, lab.n_layers)
        before = snapshot(model)
        by_hooks = lab.execute(graph)[out]
        by_nnsight = lab.execute(graph, engine="nnsight")[out]
        assert_unchanged(model, before, what="the nnsight engine")
    a, b = _out(by_hooks, arch), _out(by_nnsight, arch)
    assert (a - _plain(model, base, arch)).abs().max() > 1e-2, "the graph must change the output"
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert set(by_nnsight.cache.keys()) == set(by_hooks.cache.keys()) == {"blocks.1.resid_post", "blocks.0.attn.q"}
    for k in by_hooks.cache.keys():
        torch.testing.assert_close(by_nnsight.cache[k], by_hooks.cache[k], rtol=1e-5, atol=1e-5)


def test_agrees_with_hook_engine_on_smollm(smollm):
    model, tok = smollm
    prompts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]
    other = ["The capital of Japan is", "When Alice and Bob went to the park, Bob gave a ball to"]
    with wrapped(model, tok) as lab:
        g = sl.Graph()
        clean = g.run(other, name="clean")
        out = g.run(
            prompts,
            [
                sl.Interchange("blocks.3.attn.z", heads=[0, 5], positions=-1, source=clean),
                sl.SubspaceInterchange("blocks.6.resid_mid", size=8, positions=[-2, -1], source=clean),
                sl.Add("blocks.8.resid_post", torch.randn(576, generator=torch.Generator().manual_seed(0)), alpha=2.0, positions=-1),
                sl.Collect("blocks.10.resid_post", positions=-1),
            ],
        )
        by_hooks = lab.execute(g)[out]
        before = snapshot(model, contents=False)
        by_nnsight = lab.execute(g, engine="nnsight")[out]
        assert_unchanged(model, before, what="the nnsight engine")
        plain = lab.run(prompts).logits
    assert (by_hooks.logits - plain).abs().max() > 0.1
    torch.testing.assert_close(by_nnsight.logits, by_hooks.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_nnsight.cache["blocks.10.resid_post"], by_hooks.cache["blocks.10.resid_post"], rtol=1e-5, atol=1e-5)


def _strip_nnsight(model) -> None:
    """Undo a user's own nnsight wrapping (test cleanup)."""
    from nnsight.intervention.source import STATE

    for m in model.modules():
        if STATE in m.__dict__:
            del m.__dict__[STATE]
            m.__dict__.pop("forward", None)
        m.__dict__.pop("_persistent_id", None)


def test_matches_a_handwritten_nnsight_trace(smollm):
    """Activation patching written in plain nnsight (its own indexing) equals the engine's."""
    import nnsight

    model, tok = smollm
    enc = tok(["The Eiffel Tower is in the city of", "The Colosseum is in the city of"], return_tensors="pt", padding=True, padding_side="left")
    src = {k: v.flip(0) for k, v in enc.items()}
    envoy = nnsight.NNsight(model)
    try:
        with envoy.trace(**src):
            h = envoy.model.layers[7].output[:, -1].clone().save()
        with envoy.trace(**enc):
            envoy.model.layers[7].output[:, -1] = h
            expected = envoy.output.logits.save()
    finally:
        _strip_nnsight(model)
    with wrapped(model, tok) as lab:
        got = lab.run(enc, sl.Interchange("blocks.7.resid_post", positions=-1, source=src), engine="nnsight").logits
        plain = lab.run(enc).logits
    assert (expected - plain).abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_runs_through_nnsight_not_hooks(monkeypatch):
    model = tiny_model("llama")
    base, src = tiny_inputs("llama", pad=1, side="left"), tiny_inputs("llama", seed=4)
    with wrapped(model) as lab:
        iv = sl.Interchange("blocks.1.resid_post", positions=-1, source=src)
        expected = lab.run(base, iv).logits

        def refuse(self, *args, **kwargs):
            raise AssertionError("the hook engine ran")

        monkeypatch.setattr(hooks_mod.HookSet, "install", refuse)
        got = lab.run(base, iv, engine="nnsight").logits
        with pytest.raises(AssertionError, match="the hook engine ran"):
            lab.run(base, iv)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_only_visited_modules_are_instrumented_and_the_tree_follows_model_changes():
    from nnsight.intervention.source import STATE

    model = tiny_model("llama")
    base = tiny_inputs("llama", pad=1, side="left")
    seen: dict[str, bool] = {}

    def look(h):
        seen.update({n: STATE in m.__dict__ for n, m in model.named_modules()})
        return h

    with wrapped(model) as lab:
        ivs = [sl.Lambda("blocks.1.resid_post", look), sl.Add("blocks.2.mlp.out", torch.ones(32), positions=-1)]
        lab.run(base, ivs, engine="nnsight")
        assert {n for n, on in seen.items() if on} == {"", "model.layers.1", "model.layers.2.mlp"}
        assert not any(STATE in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
        # a module replaced after the first call (as an adapter library would): the tree is rebuilt
        old = model.model.layers[2].mlp.down_proj
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight.data = old.weight.data * 2
        model.model.layers[2].mlp.down_proj = new
        iv = sl.Scale("blocks.2.mlp.post", factor=0.5, positions=-1)
        torch.testing.assert_close(lab.run(base, iv, engine="nnsight").logits, lab.run(base, iv).logits, rtol=1e-6, atol=1e-6)


def test_source_runs_stop_early_and_plain_sources_share_a_forward():
    model = tiny_model("llama")
    base = tiny_inputs("llama", pad=2, side="left")
    s1, s2 = tiny_inputs("llama", seed=4), tiny_inputs("llama", seed=6)
    with wrapped(model) as lab:
        ivs = [sl.Interchange("blocks.0.resid_post", positions=-1, source=s1), sl.Interchange("blocks.1.attn.out", positions=0, source=s2)]
        expected = lab.run(base, ivs).logits
        lab.run(base, ivs, engine="nnsight")  # the engine's one-off probe of the forward order, not counted
        calls = {"root": 0, "last": 0, "rows": []}

        def on_root(mod, args, kwargs):
            calls["root"] += 1
            calls["rows"].append(kwargs["input_ids"].shape[0])

        def on_last(mod, args, out):
            calls["last"] += 1

        h1 = model.register_forward_pre_hook(on_root, with_kwargs=True)
        h2 = lab.layers[-1].register_forward_hook(on_last)  # the user's hooks keep firing
        try:
            got = lab.run(base, ivs, engine="nnsight").logits
        finally:
            h1.remove()
            h2.remove()
    assert calls["root"] == 2 and calls["rows"] == [4, 2], calls  # both sources in one forward, then the base
    assert calls["last"] == 1, "the sources ran past their last site"
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_gradients_agree():
    model = tiny_model("gpt2")
    base, src = tiny_inputs("gpt2", pad=1, side="left"), tiny_inputs("gpt2", seed=8)
    grads = []
    with wrapped(model) as lab:
        for engine in ("hooks", "nnsight"):
            torch.manual_seed(0)
            steer = sl.Add("blocks.1.resid_post", positions=-1, trainable=True, width=32)
            das = sl.SubspaceInterchange("blocks.0.resid_post", size=4, width=32, positions=[-1], source=src)
            loss = lab.run(base, [das, steer], engine=engine).logits[:, -1].logsumexp(-1).sum()
            loss.backward()
            grads.append((steer.vector.grad.clone(), das.rotation.weight.grad.clone()))
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# -- bad input: the hook engine's errors, before any compute -------------------------------

_BAD = {
    "unknown site": lambda src: [sl.Interchange("blocks.1.resid_psot", positions=-1, source=src)],
    "position beyond a sequence": lambda src: [sl.Add("blocks.1.resid_post", torch.zeros(32), positions=6)],
    "batch mismatch": lambda src: [sl.Interchange("blocks.1.resid_post", positions=-1, source={k: v[:1].repeat(3, 1) for k, v in src.items()})],
    "subspace too large": lambda src: [sl.SubspaceInterchange("blocks.1.resid_post", size=40, positions=-1, source=src)],
    "heads out of range": lambda src: [sl.Interchange("blocks.1.attn.z", heads=[7], positions=-1, source=src)],
    "no source": lambda src: [sl.Interchange("blocks.1.resid_post", positions=-1)],
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_input_raises_the_hook_engines_error_before_compute(case):
    model = tiny_model("llama")
    base, src = tiny_inputs("llama", pad=2, side="left"), tiny_inputs("llama", seed=4)
    with wrapped(model) as lab:
        lab.sites  # noqa: B018 - probe the shapes now, so a forward below is a real one
        errors = []
        for engine in ("hooks", "nnsight"):
            calls = []
            before = snapshot(model)
            h = model.register_forward_pre_hook(lambda *a: calls.append(1))
            try:
                with pytest.raises(sl.SteerlabError) as info:
                    lab.run(base, _BAD[case](src), engine=engine)
            finally:
                h.remove()
            assert not calls, f"{engine}: a forward ran before the error"
            assert_unchanged(model, before, what=f"{engine} raising")
            errors.append(info.value)
    assert type(errors[1]) is type(errors[0]) and str(errors[1]) == str(errors[0])


def test_engine_arguments_are_checked():
    model, other = tiny_model("llama"), tiny_model("gpt2")
    base = tiny_inputs("llama")
    with wrapped(model) as lab:
        with pytest.raises(sl.ConfigError, match=r"engine='nnsigth': expected 'hooks', 'nnsight' or an engine object"):
            lab.run(base, engine="nnsigth")
        prefix = lab.prefix(base, 1)
        with pytest.raises(sl.ConfigError, match="prefix= is not supported by the nnsight engine"):
            lab.run(base, engine="nnsight", prefix=prefix)
        import nnsight

        foreign = nnsight.NNsight(other)
        try:
            with pytest.raises(sl.ConfigError, match="wraps GPT2LMHeadModel, not this lab's model"):
                lab.run(base, engine=sl.NNsightEngine(foreign))
        finally:
            _strip_nnsight(other)


# -- the remote path, without a network ------------------------------------------------------


def _remote_graph():
    base, src = tiny_inputs("llama", pad=2, side="left"), tiny_inputs("llama", seed=4)
    g = sl.Graph()
    clean = g.run(src, name="clean")
    out = g.run(base, [sl.Interchange("blocks.1.resid_post", positions=-1, source=clean),
                       sl.SubspaceInterchange("blocks.0.resid_mid", size=4, positions="l2", source=clean),
                       sl.Collect("blocks.2.resid_post")])
    return g, out


def _rehearse_remote() -> None:
    import nnsight
    from transformers import AutoTokenizer

    from steerlab.models import embedded_path

    model = tiny_model("llama")
    lm = nnsight.TransformersModel(model, tokenizer=AutoTokenizer.from_pretrained(embedded_path("smollm2-135m")))
    g, out = _remote_graph()
    with wrapped(model) as lab:
        expected = lab.execute(g)[out]
        got = lab.execute(g, engine=sl.NNsightEngine(lm, remote="local"))[out]
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cache["blocks.2.resid_post"], expected.cache["blocks.2.resid_post"], rtol=1e-5, atol=1e-5)


def test_remote_rehearsal_serialises_the_whole_program():
    """``remote='local'``: nnsight serialises each trace as for NDIF, hides steerlab (absent on a
    server), rebuilds the program from the request alone, and runs it (in a fresh interpreter:
    steerlab's code travels by value, see ``in_fresh_interpreter``)."""
    in_fresh_interpreter("tests.interventions.test_nnsight_engine:_rehearse_remote")


# -- RELIABILITY rows 1-2: the fault battery, through the nnsight engine ------------------------


def _call_train_step_nnsight(sc: Scenario, f) -> torch.Tensor:
    """One optimisation step of a DAS subspace and a LoReFT, the forward an nnsight trace."""
    from steerlab.reft import LoReFT

    torch.manual_seed(0)
    das = sl.SubspaceInterchange(sc.site(1, "resid_post"), size=2, width=sc.width, positions=[-1], source=f.source_inputs(sc, sc.source))
    loreft = LoReFT(sc.site(0, "resid_post"), rank=2, width=sc.width, positions=[-1])
    opt = torch.optim.Adam([*das.parameters(), *loreft.parameters()], lr=0.05)
    ivs = [loreft, das, *f.interventions(sc, sc.site(2, "mlp.out"))]
    res = sc.lab.run(sc.base, ivs, positions=f.positions(sc), engine="nnsight", **f.model_kwargs(sc))
    loss = f.backward_wrap(torch.nn.functional.cross_entropy(res.logits[:, -1].float(), torch.tensor([5, 9])))
    loss.backward()
    opt.step()
    return torch.cat([res.logits.detach().flatten(), das.R.detach().flatten(), loreft.R.detach().flatten()])


_CHANNELS = frozenset({"intervention", "source", "kwargs", "positions"})
NNSIGHT_CALLS = {
    "execute_nnsight": CALL_TYPES["execute_nnsight"],  # tests/reliability.py
    "train_step_nnsight": register_call_type(CallType("train_step_nnsight", _call_train_step_nnsight, _CHANNELS | {"backward"})),
}
_SCENARIO: dict[str, tuple] = {}


def _scenario(call: str):
    if "llama" not in _SCENARIO:
        model = tiny_model("llama")
        sc = Scenario.of(model)
        hooks = UserHooks().install(model, sc.lab.layers, [sc.lab.resolve(sc.site(1, "mlp.out")).module])
        _SCENARIO["llama"] = (sc, hooks)
    sc, hooks = _SCENARIO["llama"]
    if call not in _SCENARIO:
        _SCENARIO[call] = NNSIGHT_CALLS[call].fn(sc, NO_FAULT)
    return sc, hooks, _SCENARIO[call]


@pytest.mark.parametrize(("call", "fault"), list(fault_cases(list(NNSIGHT_CALLS))), ids=lambda x: x.name)
def test_fault_leaves_model_as_found(call, fault):
    """RELIABILITY rows 1-2: after each fault, hook registries as before, outputs bit-identical
    to the untouched model's, the clean call reproducible, the user's hooks registered and firing."""
    sc, hooks, clean = _scenario(call.name)
    check_fault(sc, call, fault, clean=clean, user_hooks=hooks)
