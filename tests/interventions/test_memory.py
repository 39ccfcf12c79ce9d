"""RELIABILITY row 13: no memory growth.

After 50 intervened calls of each kind, at least 48 of 50 weakly referenced
activations (the value an intervention saw in each call, and a block's output
as a user hook saw it) are freed; a Lab, its attachments, its interventions
and the model itself are freed when the user drops them.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch

import steerlab as sl
from tests.archs import tiny_model
from tests.reliability import Scenario, one_thread_fixture

_one_thread = one_thread_fixture()
N = 50


class Tracker:
    """One weak reference per call to the activation an intervention saw first, and to a block output."""

    def __init__(self, model, block):
        self.seen: list[weakref.ref] = []
        self.blocks: list[weakref.ref] = []
        self._new_call = True
        self._handle = block.register_forward_hook(self._block)

    def start_call(self) -> None:
        self._new_call = True
        self._block_taken = False

    def _block(self, module, args, out):
        if not self._block_taken:
            self._block_taken = True
            self.blocks.append(weakref.ref(out if isinstance(out, torch.Tensor) else out[0]))

    def lambda_fn(self, h):
        if self._new_call:
            self._new_call = False
            self.seen.append(weakref.ref(h))
        return h * 1.0

    def alive(self) -> tuple[int, int]:
        gc.collect()
        return sum(r() is not None for r in self.seen), sum(r() is not None for r in self.blocks)

    def close(self) -> None:
        self._handle.remove()


def _run(sc, tr, iv):
    return sc.lab.run(sc.base, [iv, sl.Interchange("blocks.0.resid_post", positions=[-1], source=sc.source),
                                sl.Add("blocks.2.resid_post", torch.ones(sc.width), positions=[-1])]).logits.sum().item()


def _execute(sc, tr, iv):
    g = sl.Graph()
    clean = g.run(sc.source)
    mid = g.run(sc.base, [sl.Interchange("blocks.0.attn.z", heads=[1], positions=[-1], source=clean), iv])
    out = g.run(sc.base, [sl.Interchange("blocks.2.resid_post", positions=[-1], source=mid)])
    return sc.lab.execute(g)[out].logits.sum().item()


def _collect(sc, tr, iv):
    cache = sc.lab.collect(sc.base, ["blocks.*.resid_post", "blocks.1.attn.z"])
    tr.seen.append(weakref.ref(cache["blocks.1.resid_post"]))  # the collected activation itself
    tr._new_call = False
    return float(cache.stack("blocks.*.resid_post").sum())


def _generate(sc, tr, iv):
    return sc.lab.generate(sc.base, [iv, sl.Add("blocks.2.resid_post", torch.ones(sc.width), positions=[-1])], decode=True,
                           max_new_tokens=3, do_sample=False, pad_token_id=0).sequences.sum().item()


def _attached_step(sc, tr, iv, _state={}):
    steer = _state.setdefault(id(sc), sl.Add("blocks.2.resid_post", positions=[-1], trainable=True, width=sc.width))
    opt = torch.optim.SGD(steer.parameters(), lr=0.01)
    with sc.lab.attach([iv, steer]):
        loss = sc.model(**sc.base).logits[:, -1].float().logsumexp(-1).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def _das_step(sc, tr, iv, _state={}):
    if id(sc) not in _state:
        sv = sc.lab.source_value(sl.Interchange("blocks.2.resid_post", positions=[-1], source=sc.source))
        das = sl.SubspaceInterchange("blocks.2.resid_post", size=2, width=sc.width, positions=[-1], source=sv)
        _state[id(sc)] = (das, sc.lab.prefix(sc.base, 1), torch.optim.Adam(das.parameters(), lr=0.01))
    das, prefix, opt = _state[id(sc)]
    res = sc.lab.run(sc.base, [iv, das], prefix=prefix)
    loss = res.logits[:, -1].float().logsumexp(-1).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


CALLS: dict[str, Callable] = {"run": _run, "execute": _execute, "collect": _collect, "generate": _generate,
                              "attached_step": _attached_step, "das_step": _das_step}


@pytest.mark.parametrize("call", list(CALLS))
def test_activations_of_50_calls_are_freed(call):
    sc = Scenario.of(tiny_model("llama"))
    tr = Tracker(sc.model, sc.lab.layers[1])
    try:
        for _ in range(N):
            tr.start_call()
            CALLS[call](sc, tr, sl.Lambda("blocks.1.mlp.out", tr.lambda_fn))
        assert len(tr.seen) == N and len(tr.blocks) == N
        seen, blocks = tr.alive()
        assert seen <= N - 48 and blocks <= N - 48, f"{call}: {seen} intervention inputs and {blocks} block outputs of {N} still alive"
    finally:
        tr.close()


def test_the_tracker_sees_a_leak():
    """Activations something keeps are counted alive, and freed once it lets go: the count above can fail."""
    sc = Scenario.of(tiny_model("llama"))
    tr = Tracker(sc.model, sc.lab.layers[1])
    leak = []

    def leaky(h):
        leak.append(h)  # what a cache that outlives its call would do
        return tr.lambda_fn(h)

    try:
        for _ in range(5):
            tr.start_call()
            sc.lab.run(sc.base, [sl.Lambda("blocks.1.mlp.out", leaky)])
        assert tr.alive()[0] == 5
        leak.clear()
        assert tr.alive()[0] == 0
    finally:
        tr.close()


def _weak(*objs):
    return [weakref.ref(o) for o in objs]


def test_a_lab_its_attachments_and_the_model_are_freed():
    model = tiny_model("llama")
    lab = sl.wrap(model)
    x = {"input_ids": torch.randint(3, 90, (2, 6))}
    steer = sl.Add("blocks.1.resid_post", torch.ones(32), positions=[-1])
    das = sl.SubspaceInterchange("blocks.0.resid_post", size=2, positions=[-1], source=x)
    lab.run(x, [steer, das])
    att = lab.attach([steer, sl.SubspaceInterchange("blocks.2.resid_post", size=2, width=32, positions=[-1], source=lab.source_value(das))])
    with torch.no_grad():
        model(**x)
    att.detach()
    with lab.attach(steer):
        lab.generate(x, max_new_tokens=2, pad_token_id=0)
    try:
        lab.run(x, [sl.Lambda("blocks.1.resid_post", lambda h: 1 / 0)])
    except ZeroDivisionError:
        pass
    refs = _weak(lab, att, steer, das, model)
    del lab, att, steer, das, model
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


def test_rewrapping_a_model_frees_the_old_lab():
    model = tiny_model("llama")
    first = sl.wrap(model)
    first.run({"input_ids": torch.randint(3, 90, (1, 4))}, [sl.Zero("blocks.0.mlp.out")])
    first.unwrap()
    ref = weakref.ref(first)
    del first
    second = sl.wrap(model)
    gc.collect()
    assert ref() is None
    assert second.run({"input_ids": torch.randint(3, 90, (1, 4))}).logits.shape == (1, 4, 96)
