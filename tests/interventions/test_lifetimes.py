"""The attached lifetime: attach()/detach(), ``with``, gradient checkpointing, per-forward positions, user hooks."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from tests.archs import tiny_model
from tests.interventions._helpers import hook_counts, wrapped
from tests.interventions._manual import resolve, run_edits
from tests.interventions.test_interchange import make_inputs


def _add_at(slots, v):
    def edit(part):
        for i, row in enumerate(slots):
            for j in row:
                if j is not None:
                    part[i, j] = part[i, j] + v

    return edit


def test_attach_detach_and_with():
    model = tiny_model("llama")
    inputs = make_inputs("llama", [7, 4], 7, "left", 1)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 3
    want = run_edits(model, "llama", inputs, [(1, "attn.out", _add_at(resolve([0, -1], inputs["attention_mask"]), v))]).logits
    with torch.no_grad():
        plain = model(**inputs).logits
    before = hook_counts(model)
    with wrapped(model) as lab:
        iv = sl.Add("blocks.1.attn.out", v, positions=[0, -1])
        att = lab.attach(iv)
        assert att.attached
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, want)
            assert torch.equal(model(**inputs).logits, want)  # every forward while attached
        att.detach()
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, plain)
        assert hook_counts(model) == before
        with lab.attach([iv]):
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, want)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, plain)
        with pytest.raises(RuntimeError), lab.attach([iv]):
            raise RuntimeError("a failure inside the block")
        assert hook_counts(model) == before
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, plain)


def test_attached_source_value_interchange():
    model = tiny_model("llama")
    base, src = make_inputs("llama", [7, 5], 7, "left", 2), make_inputs("llama", [6, 7], 7, "left", 3)
    with wrapped(model) as lab:
        iv = sl.Interchange("blocks.1.resid_post", positions=-1, source=src)
        per_call = lab.run(base, [iv]).logits
        sv = lab.source_value(iv)
        with lab.attach(sl.Interchange("blocks.1.resid_post", positions=-1, source=sv)), torch.no_grad():
            attached = model(**base).logits
    assert torch.equal(attached, per_call)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_while_attached(reentrant):
    """The edit sits inside checkpointed layers; backward replays them with the hooks still in place."""
    torch.manual_seed(0)
    inputs = make_inputs("llama", [7, 5], 7, "left", 4)
    src = make_inputs("llama", [6, 7], 7, "left", 5)
    target = torch.tensor([3, 7])
    R = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(6)))[0][:3]
    grads = {}
    for ckpt in (False, True):
        model = tiny_model("llama")
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        with wrapped(model) as lab:
            sv = lab.source_value(sl.Interchange("blocks.1.attn.z", heads=[0, 2], positions=-1, source=src))
            das = sl.SubspaceInterchange("blocks.1.attn.z", size=3, init=R, heads=[0, 2], positions=-1, source=sv)
            steer = sl.Add("blocks.0.mlp.post", torch.zeros(64), trainable=True, positions=[0, 1])
            with lab.attach([das, steer]):
                logits = model(**inputs).logits[:, -1]
                loss = torch.nn.functional.cross_entropy(logits, target)
                loss.backward()
            grads[ckpt] = (das.rotation.weight.grad.clone(), steer.vector.grad.clone(), loss.detach())
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert grads[True][0].abs().sum() > 0 and grads[True][1].abs().sum() > 0


def test_intervention_positions_kwarg_per_forward():
    model = tiny_model("llama")
    inputs = make_inputs("llama", [7, 4], 7, "right", 6)
    v = torch.randn(32, generator=torch.Generator().manual_seed(2)) * 3
    with wrapped(model) as lab:
        with lab.attach(sl.Add("blocks.1.resid_post", v, positions="per-call")), torch.no_grad():
            outs = [model(**inputs, intervention_positions=p).logits for p in (torch.tensor([[0, 6], [3, -1]]), torch.tensor([[2], [1]]))]
    for p, got in zip((torch.tensor([[0, 6], [3, -1]]), torch.tensor([[2], [1]])), outs):
        want = run_edits(model, "llama", inputs, [(1, "resid_post", _add_at(resolve(p, inputs["attention_mask"]), v))]).logits
        assert torch.equal(got, want)


def test_user_hooks_are_never_touched():
    model = tiny_model("llama")
    inputs = make_inputs("llama", [7, 6], 7, "left", 7)
    calls = []
    h1 = model.model.layers[1].register_forward_hook(lambda m, a, o: calls.append("post"))
    h2 = model.model.layers[1].self_attn.register_forward_pre_hook(lambda m, a, k: calls.append("pre"), with_kwargs=True)
    h3 = model.register_forward_pre_hook(lambda m, a: calls.append("root"))
    mine = {id(h) for h in (h1, h2, h3)}
    registries = lambda: [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]  # noqa: E731
    before = registries()
    with wrapped(model) as lab:
        lab.run(inputs, [sl.Scale("blocks.1.resid_post", factor=2.0), sl.Zero("blocks.1.attn.z", heads=[0])])
        lab.collect(inputs, ["blocks.*.attn.z", "blocks.1.resid_post"])
        with lab.attach(sl.Scale("blocks.1.resid_post", factor=2.0)), torch.no_grad():
            calls.clear()
            model(**inputs)
            assert calls == ["root", "pre", "post"]  # the user's hooks still run, in their order
    assert registries() == before
    assert len(mine) == 3
    for h in (h1, h2, h3):
        h.remove()


def test_per_call_run_refuses_gradient_checkpointing_before_compute():
    """A per-call run's hooks are gone when backward replays checkpointed layers: refused, model untouched."""
    model = tiny_model("llama")
    model.train()
    model.gradient_checkpointing_enable()
    inputs = make_inputs("llama", [7, 5], 7, "left", 8)
    with wrapped(model) as lab:
        lab.sites
        before = hook_counts(model)
        calls = []
        h = model.register_forward_pre_hook(lambda m, a: calls.append(1))
        steer = sl.Add("blocks.0.mlp.post", torch.zeros(64), trainable=True)
        with pytest.raises(sl.LifetimeError, match=r"gradient checkpointing is on .* lab\.attach"):
            lab.run(inputs, [steer])
        h.remove()
        assert calls == [] and hook_counts(model) == before
        with torch.no_grad():  # no gradient needed: allowed
            lab.run(inputs, [steer])
        model.eval()  # checkpointing acts in training mode only
        lab.run(inputs, [steer])


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_with_two_forwards_before_one_backward(reentrant):
    """Each forward's layers are replayed with that forward's positions (same batch size, different padding)."""
    a, b = make_inputs("llama", [7, 3], 7, "left", 9), make_inputs("llama", [4, 7], 7, "left", 10)
    src = make_inputs("llama", [5, 6], 7, "left", 11)
    R = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(7)))[0][:4]
    grads = {}
    for ckpt in (False, True):
        model = tiny_model("llama")
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        with wrapped(model) as lab:
            sv = lab.source_value(sl.Interchange("blocks.1.resid_post", positions=-1, source=src))
            das = sl.SubspaceInterchange("blocks.1.resid_post", size=4, init=R, positions=-1, source=sv)
            steer = sl.Add("blocks.0.mlp.post", torch.zeros(64), trainable=True, positions=[0, -1])
            with lab.attach([das, steer]):
                loss = model(**a).logits.pow(2).mean() + 2 * model(**b).logits.pow(2).mean()
                loss.backward()
        grads[ckpt] = (steer.vector.grad.clone(), das.rotation.weight.grad.clone())
    for x, y in zip(grads[False], grads[True]):
        torch.testing.assert_close(x, y, atol=1e-7, rtol=1e-5)
