"""The nnsight engine on the models a user brings: already wrapped in nnsight, carrying
trained ReFT interventions, offloaded by accelerate, or meant for NDIF.

Every check compares against the hook engine (or the unsplit model) on the
same graph: outputs, caches and gradients of trainable interventions (DAS,
LoReFT) on tiny LLaMA, GPT-2 and BERT and on SmolLM2-135M; a ReftModel's
forward; models split by ``dispatch_model`` / ``cpu_offload`` with disk and CPU
offload; and the request ``remote=True`` hands to nnsight's NDIF backend,
opened up to the network boundary (model key, shipped code, weights, saves).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.abc
import io
import linecache
import sys

import pytest
import torch
import zstandard

import steerlab as sl
from steerlab.reft import LoReFT, ReftConfig, get_reft_model
from tests.archs import tiny_inputs, tiny_model
from tests.interventions._helpers import in_fresh_interpreter, wrapped
from tests.interventions.test_nnsight_engine import _out, _strip_nnsight
from tests.reliability import assert_unchanged, one_thread_fixture, snapshot

_one_thread = one_thread_fixture()


def _tokenizer():
    from transformers import AutoTokenizer

    from steerlab.models import embedded_path

    return AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))


# -- a model the user already wrapped in nnsight ------------------------------------------------


@pytest.mark.parametrize("kind", ["NNsight", "LanguageModel"])
def test_wraps_a_users_nnsight_model_and_traces_through_it(kind, monkeypatch):
    import warnings

    import nnsight

    from steerlab.interventions import nnsight_engine

    model, tok = tiny_model("llama"), _tokenizer()
    base, src = tiny_inputs("llama", pad=2, side="left"), tiny_inputs("llama", seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel is deprecated in favour of TransformersModel (same class)
        lm = nnsight.NNsight(model) if kind == "NNsight" else nnsight.LanguageModel(model, tokenizer=tok)
    try:
        with torch.no_grad(), lm.trace(**base):  # the user's own nnsight work, before and after
            before = lm.model.layers[1].output.save()
        lab = sl.wrap(lm)
        assert lab.model is model and lab.nnsight_model is lm
        assert lab.tokenizer is (tok if kind == "LanguageModel" else None)
        ivs = [sl.Interchange("blocks.1.resid_post", positions=-1, source=src), sl.Collect("blocks.2.mlp.out", positions=-1)]
        expected = lab.run(base, ivs)

        def refuse(*a):
            raise AssertionError("a private wrapper was built")

        monkeypatch.setattr(nnsight_engine, "_private_envoy", refuse)
        got = lab.run(base, ivs, engine="nnsight")
        assert (expected.logits - lab.run(base).logits).abs().max() > 1e-3
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.cache["blocks.2.mlp.out"], expected.cache["blocks.2.mlp.out"], rtol=1e-6, atol=1e-6)
        assert lab.unwrap() is model
        with torch.no_grad(), lm.trace(**base):
            after = lm.model.layers[1].output.save()
        assert torch.equal(after, before)
    finally:
        _strip_nnsight(model)


def test_a_foreign_or_missing_nnsight_model_is_refused():
    model = tiny_model("llama")
    base = tiny_inputs("llama")
    with wrapped(model) as lab:
        with pytest.raises(sl.ConfigError, match=r"remote execution needs the nnsight model that names the remote checkpoint: .*lab = wrap\(lm\)"):
            lab.run(base, engine=sl.NNsightEngine(remote=True))
    with pytest.raises(TypeError, match="wrap\\(\\) takes an nn.Module or an nnsight model; got str"):
        sl.wrap("gpt2")


# -- every graph kind, with gradients, on three architectures -----------------------------------


def _kinds_graph(arch: str, d: int):
    side = "right" if arch == "bert" else "left"
    base, src = tiny_inputs(arch, pad=2, side=side), tiny_inputs(arch, seed=7, pad=1, side=side)
    torch.manual_seed(0)
    das = sl.SubspaceInterchange("blocks.1.resid_post", size=4, width=d, positions=[-1])
    loreft = LoReFT("blocks.0.resid_post", rank=2, width=d, positions="f1+l1")
    g = sl.Graph()
    clean = g.run(src, name="clean")
    das.source = clean
    out = g.run(base, [
        sl.Interchange("blocks.0.attn.out", positions=[0], source=clean),
        loreft,
        das,
        sl.Collect("blocks.1.mlp.out", positions=[-1]),
        sl.Collect("blocks.2.resid_post"),
    ], name="out")
    return g, out, das, loreft


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_every_graph_kind_agrees_including_gradients(arch):
    """Interchange, DAS (trainable subspace), LoReFT and Collect in one graph: outputs, caches,
    and the gradients reaching the DAS rotation and every LoReFT parameter."""
    model = tiny_model(arch)
    with wrapped(model) as lab:
        g, out, das, loreft = _kinds_graph(arch, lab.d_model)
        params = [das.rotation.weight, *loreft.parameters()]
        seen = {}
        for engine in ("hooks", "nnsight"):
            for p in params:
                p.grad = None
            res = lab.execute(g, engine=engine)[out]
            (_out(res, arch)[:, -1] ** 2).sum().backward()
            seen[engine] = (res, [p.grad.clone() for p in params])
        with torch.no_grad():  # the trained-intervention path: inference only
            infer = lab.execute(g, engine="nnsight")[out]
    (a, ga), (b, gb) = seen["hooks"], seen["nnsight"]
    torch.testing.assert_close(_out(b, arch), _out(a, arch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_out(infer, arch), _out(a, arch).detach(), rtol=1e-5, atol=1e-5)
    assert set(b.cache.keys()) == {"blocks.1.mlp.out", "blocks.2.resid_post"}
    for k in a.cache.keys():
        torch.testing.assert_close(b.cache[k], a.cache[k], rtol=1e-5, atol=1e-5)
    assert len(ga) == 4 and all(x.abs().sum() > 0 for x in ga)  # R of DAS; R, W, b of LoReFT
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


def test_smollm_das_and_loreft_agree_through_a_language_model(smollm):
    """SmolLM2-135M wrapped by the user as an nnsight LanguageModel: a DAS step's gradient and a
    LoReFT edit equal the hook engine's."""
    import warnings

    import nnsight

    model, tok = smollm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(model, tokenizer=tok)
    base = ["The capital of France is", "My favourite colour is"]
    src = ["The capital of Japan is", "My favourite food is"]
    try:
        lab = sl.wrap(lm)
        try:
            torch.manual_seed(0)
            das = sl.SubspaceInterchange("blocks.5.resid_post", size=8, width=576, positions=[-1], source=src)
            loreft = LoReFT("blocks.9.resid_post", rank=4, width=576, positions="l1")
            grads, logits = [], []
            for engine in ("hooks", "nnsight"):
                das.rotation.weight.grad = None
                res = lab.run(base, [das, loreft], engine=engine)
                res.logits[:, -1].log_softmax(-1)[:, 0].sum().backward()
                grads.append(das.rotation.weight.grad.clone())
                logits.append(res.logits.detach())
            plain = lab.run(base).logits
        finally:
            lab.unwrap()
    finally:
        _strip_nnsight(model)
    assert (logits[0] - plain).abs().max() > 0.1 and grads[0].abs().sum() > 0
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


# -- a ReftModel's interventions ----------------------------------------------------------------


def test_reft_model_runs_through_nnsight():
    """A ReftModel with two weight groups (first and last positions, untied), trained three steps
    by its own (hook) forward, then run through nnsight: logits and gradients agree."""
    model = tiny_model("llama")
    base = tiny_inputs("llama", pad=2, side="left")
    pos = torch.tensor([[[2], [5]], [[0], [3]]])  # [batch, groups, k]: per-example first / last real token
    rm = get_reft_model(model, ReftConfig(layers=[0, 2], rank=2, positions="f1+l1", tied=False))
    try:
        assert rm.n_groups == 2
        opt = torch.optim.Adam([p for p in rm.parameters() if p.requires_grad], lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            rm(**base, intervention_positions=pos).logits[:, -1].logsumexp(-1).sum().backward()
            opt.step()
        engine = sl.NNsightEngine()
        grads, logits = [], []
        for run in (lambda: rm(**base, intervention_positions=pos), lambda: rm(**base, intervention_positions=pos, engine=engine)):
            opt.zero_grad()
            lg = run().logits
            lg[:, -1].logsumexp(-1).sum().backward()
            logits.append(lg.detach())
            grads.append([p.grad.clone() for p in rm.interventions.parameters()])
        assert rm.enabled and all(iv.positions.to_json() in ("f1", "l1") for iv in rm.interventions)
        with rm.disabled():
            plain = rm.model(**base).logits
        with pytest.raises(sl.UnitError, match=r"intervention_positions has shape \(2, 1\); expected \[batch, 2, k\]"):
            rm(**base, intervention_positions=pos[:, 0], engine=engine)
    finally:
        rm.unwrap()
    assert (logits[0] - plain).abs().max() > 1e-3
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(*grads):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


# -- models split by accelerate, with CPU and disk offload ----------------------------------------


def _offloaded(model, how: str, folder) -> torch.nn.Module:
    from accelerate import cpu_offload, dispatch_model

    if how == "cpu_offload":  # every weight on meta, loaded onto the execution device per forward
        return cpu_offload(model, execution_device=torch.device("cpu"))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu"}
    return dispatch_model(model, device_map=device_map, offload_dir=str(folder))


@pytest.mark.parametrize("how", ["dispatch_disk", "cpu_offload"])
def test_offloaded_model_equals_the_unsplit_one_on_both_engines(how, tmp_path):
    ref = tiny_model("llama")
    split = _offloaded(copy.deepcopy(ref), how, tmp_path)
    assert split.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # really offloaded
    base, src = tiny_inputs("llama", pad=2, side="left"), tiny_inputs("llama", seed=4)

    def ivs():
        torch.manual_seed(0)
        return [sl.Interchange("blocks.0.resid_post", positions=-1, source=src),
                sl.SubspaceInterchange("blocks.1.mlp.out", size=3, width=32, positions=-1, source=src),  # on the offloaded layer
                LoReFT("blocks.1.resid_post", rank=2, width=32, positions="l1"),
                sl.Collect("blocks.1.attn.z", heads=[1], positions=-1)]

    with wrapped(ref) as lab:
        expected = lab.run(base, ivs())
    forwards = {n: m.__dict__.get("forward") for n, m in split.named_modules()}
    results = {}
    with wrapped(split) as lab:
        assert lab.device == torch.device("cpu")
        before = snapshot(split, contents=False)
        for engine in ("hooks", "nnsight"):
            mine = ivs()
            results[engine] = lab.run(base, mine, engine=engine)
            assert all(p.device.type == "cpu" for iv in mine for p in iv.parameters()), "an intervention left its site's device"
            results[engine].logits[:, -1].sum().backward()
            results[engine + " grad"] = mine[1].rotation.weight.grad
        assert_unchanged(split, before, what="an offloaded run")
    assert {n: m.__dict__.get("forward") for n, m in split.named_modules()} == forwards  # accelerate's forwards kept
    for engine in ("hooks", "nnsight"):
        torch.testing.assert_close(results[engine].logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[engine].cache["blocks.1.attn.z"], expected.cache["blocks.1.attn.z"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["nnsight grad"], results["hooks grad"], rtol=1e-4, atol=1e-6)
    assert results["hooks grad"].abs().sum() > 0


# -- remote=True, opened up to the network boundary ------------------------------------------------


class _NotOnTheServer(importlib.abc.MetaPathFinder):
    """steerlab and the tests are not installed on an NDIF server (the editable install's
    finder would otherwise still import them after the sys.path entries are hidden)."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("steerlab", "tests"):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the server)")
        return None


@contextlib.contextmanager
def _as_on_a_server(lm, filename: str):
    """Local modules hidden (nnsight's rehearsal does as much), steerlab unimportable;
    the block source nnsight registers in ``linecache`` forgotten afterwards (a fresh process there)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    sim, line, finder = LocalSimulationBackend(lm), linecache.cache.get(filename), _NotOnTheServer()
    hidden = sim._hide_local_modules()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sim._restore(hidden)
        linecache.cache.pop(filename, None)
        if line is not None:
            linecache.cache[filename] = line


def _ivs_of(program) -> list:
    return [h.iv for hs in (program.first, *(s.handlers for s in program.steps)) for h in hs]


def test_remote_request_carries_model_key_code_weights_and_saves():
    """``remote=True`` goes through nnsight's RemoteBackend; at the network boundary
    (``RemoteBackend.request``) the payload is opened as NDIF would: it names the model by key,
    carries steerlab's code by value (it runs with steerlab unimportable) and the interventions'
    weights as copies, and saves only the box of results; the answer returns through nnsight's own
    ``finalize`` and equals the hook engine's. In a fresh interpreter (see ``in_fresh_interpreter``)."""
    in_fresh_interpreter("tests.interventions.test_nnsight_models:_remote_request_roundtrip")


def _remote_request_roundtrip() -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        import nnsight
        from nnsight.intervention.backends import remote as remote_mod
        from nnsight.intervention.serialization import loads
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves

        model = tiny_model("llama")
        lm = nnsight.TransformersModel(model, tokenizer=_tokenizer())
        key = "nnsight.modeling.transformers.TransformersModel:tiny-llama"
        monkeypatch.setattr(type(lm), "to_model_key", lambda self: key)
        monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "my-ndif-key")
        sent = []

        def ndif(self, request, tracer):
            blob = self._serialize(tracer)  # the bytes RemoteBackend would POST
            raw = zstandard.ZstdDecompressor().decompress(blob) if self.compress else blob
            persistent = lm._remoteable_persistent_objects()
            with _as_on_a_server(lm, tracer.info.frame.f_code.co_filename):
                _, (source, _, variables) = loads(raw, persistent)
                restored = RequestModel.deserialize(blob, persistent, compress=self.compress)
                restored.execute(restored.info.code)
                saved = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in _saves()}
            sent.append({"key": request.model_key, "api_key": self.api_key, "raw": raw, "source": source, "variables": variables, "saved": saved})
            buf = io.BytesIO()
            torch.save(saved, buf)
            data = buf.getvalue()
            return self.finalize(zstandard.ZstdCompressor().compress(data) if self.compress else data)

        monkeypatch.setattr(remote_mod.RemoteBackend, "request", ndif)
        base, src = tiny_inputs("llama", pad=2, side="left"), tiny_inputs("llama", seed=4)
        torch.manual_seed(0)
        loreft = LoReFT("blocks.0.resid_post", rank=2, width=32, positions="l1")
        g = sl.Graph()
        clean = g.run(src, name="clean")
        out = g.run(base, [sl.Interchange("blocks.1.resid_post", positions=-1, source=clean),
                           sl.SubspaceInterchange("blocks.0.resid_mid", size=4, width=32, positions="l2", source=clean),
                           loreft, sl.Collect("blocks.2.resid_post")], name="out")
        try:
            lab = sl.wrap(lm)
            try:
                expected = lab.execute(g)[out]
                got = lab.execute(g, engine=sl.NNsightEngine(remote=True))[out]
            finally:
                lab.unwrap()
        finally:
            _strip_nnsight(model)
        assert [(s["key"], s["api_key"]) for s in sent] == [(key, "my-ndif-key")] * 2  # the source run, then the base
        for s in sent:
            assert "program.run(tracer)" in s["source"] and "nnsight.save(box)" in s["source"]
            assert set(s["variables"]) == {"program", "tracer", "nnsight"}
            assert set(s["saved"]) == {"box"}  # only the box of results comes back
        assert set(sent[0]["saved"]["box"]["store"]) and "output" not in sent[0]["saved"]["box"]  # a source run: its reads only
        code = sent[1]["raw"]
        assert b"def subspace_edit" in code and b"def learned_source" in code and b"LoReFT" in code  # steerlab's source, shipped by value
        shipped = [iv for iv in _ivs_of(sent[1]["variables"]["program"]) if type(iv).__name__ == "LoReFT"]
        assert len(shipped) == 1
        for name, w in loreft.state_dict().items():
            there = shipped[0].state_dict()[name]
            assert torch.equal(there, w) and there.data_ptr() != w.data_ptr(), name  # the trained weights, as a copy
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.cache["blocks.2.resid_post"], expected.cache["blocks.2.resid_post"], rtol=1e-5, atol=1e-5)
