"""RELIABILITY row 17: threads. Per-call interventions act on the call that installed them only.

Two threads make 50 calls each of ``run``, ``sweep`` and ``generate`` on one model, interleaved, each
call with its own interventions; every result equals the same call made alone, bit for bit. A third
kind of thread runs the plain model (a forward, ``model.generate``) while steerlab calls run in
another: it sees the untouched model. Attached interventions, by design, act on every thread.
"""

from __future__ import annotations

import threading

import pytest
import torch

import steerlab as sl
from tests.archs import tiny_model
from tests.reliability import Scenario, plain_logits

N = 50


@pytest.fixture(scope="module")
def sc() -> Scenario:
    return Scenario.of(tiny_model("llama"))


def _vec(sc: Scenario, t: int, i: int) -> torch.Tensor:
    return torch.randn(sc.width, generator=torch.Generator().manual_seed(1000 * t + i))


def _call(sc: Scenario, t: int, i: int) -> torch.Tensor:
    """Call ``i`` of thread ``t``: a run, a sweep or a generation with its own numbers."""
    kind = i % 3
    if kind == 0:
        ivs = [sl.Add(sc.site(1, "resid_post"), _vec(sc, t, i), positions=[-1]),
               sl.Interchange(sc.site(0, "resid_post"), positions=[0, -1], source=sc.source)]
        return sc.lab.run(sc.base, ivs, positions=torch.tensor([[t, 6], [i % 5, 4]])).logits
    if kind == 1:
        src = {k: v.roll(t + i, 1) if k == "input_ids" else v for k, v in sc.source.items()}
        res = sl.sweep(sc.lab, sc.base, src, sites=[sc.site(0, "resid_post"), sc.site(2, "resid_post")], positions=[0, -1],
                       metric=sl.metrics.logit_diff(5, 7), configs_per_forward=2)
        return res.per_example
    gen = sc.lab.generate(sc.base, [sl.Add(sc.site(1, "resid_post"), 3 * _vec(sc, t, i), positions=[-1])], decode=t == 1,
                          max_new_tokens=3, do_sample=False, pad_token_id=0)
    return gen.sequences


def _in_threads(fns: list) -> list:
    """Run ``fns`` (one per thread) at once; their results, or the first error."""
    out: list = [None] * len(fns)
    errors: list = []
    start = threading.Barrier(len(fns))

    def work(k: int) -> None:
        try:
            start.wait()
            out[k] = fns[k]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return out


def test_two_threads_of_run_sweep_generate_give_the_single_threaded_numbers(sc):
    alone = {(t, i): _call(sc, t, i) for t in (0, 1) for i in range(3 * N)}
    together = _in_threads([lambda t=t: [_call(sc, t, i) for i in range(3 * N)] for t in (0, 1)])
    wrong = [(t, i) for t in (0, 1) for i in range(3 * N) if not torch.equal(together[t][i], alone[(t, i)])]
    assert not wrong, f"{len(wrong)} of {6 * N} results differ from the same call made alone: {wrong[:10]}"
    assert not sc.lab.attachments


def test_a_plain_forward_in_another_thread_sees_the_untouched_model(sc):
    """While one thread makes steered calls, another thread's plain forwards and ``model.generate``
    are exactly the untouched model's."""
    want = sc.reference_logits()
    with torch.no_grad():
        want_gen = sc.reference.generate(**sc.base, max_new_tokens=3, do_sample=False, pad_token_id=0)

    def steered() -> None:
        for i in range(3 * N):
            _call(sc, 0, i)

    def plain() -> list[bool]:
        ok = []
        for j in range(2 * N):
            if j % 4 == 3:
                with torch.no_grad():
                    ok.append(torch.equal(sc.model.generate(**sc.base, max_new_tokens=3, do_sample=False, pad_token_id=0), want_gen))
            else:
                ok.append(torch.equal(plain_logits(sc.model, sc.base), want))
        return ok

    _, ok = _in_threads([steered, plain])
    assert all(ok), f"{ok.count(False)} of {len(ok)} plain calls saw another thread's interventions"


def test_attached_interventions_act_on_every_thread(sc):
    """Attaching is for every forward of the model, whatever the thread (documented)."""
    add = sl.Add(sc.site(1, "resid_post"), torch.full((sc.width,), 2.0), positions=[-1])
    with sc.lab.attach(add):
        (got,) = _in_threads([lambda: plain_logits(sc.model, sc.base)])
    assert torch.equal(got, sc.lab.run(sc.base, [add]).logits)
    assert not torch.equal(got, sc.reference_logits())


def test_the_nnsight_engine_refuses_to_share_the_model_with_another_thread(sc):
    """The nnsight engine instruments the model's modules for its call: a call from another thread
    meanwhile is refused with a named error, never run on a half-instrumented model."""
    from steerlab.interventions.call import running

    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with running(sc.model, "hook-engine"):
            entered.set()
            leave.wait(10)

    th = threading.Thread(target=hold)
    th.start()
    try:
        entered.wait(10)
        with pytest.raises(sl.ConcurrentCall, match="another thread"):
            sc.lab.run(sc.base, engine="nnsight")
    finally:
        leave.set()
        th.join()
    assert sc.lab.run(sc.base, engine="nnsight").logits.shape == sc.reference_logits().shape
