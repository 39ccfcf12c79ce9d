"""Path patching and faithfulness against hand-spliced runs on a tiny LLaMA.

The hand versions use plain PyTorch hooks on ``o_proj``'s input (every head's output,
``[batch, seq, heads * d_head]``) and on ``q_proj``'s output (the queries before rotary
embedding), never steerlab: a sender run freezes every head at its clean output except the
sender's, taken from the corrupted run; a receiver run takes the receiver heads' queries at
their positions from the sender run; a mean-ablated run writes each dropped head's mean over
its group's corrupted examples. Packed rows may sum in another order: cells agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.alignment import Circuit, Receiver, faithfulness, head_means, path_patching
from tests.archs import tiny_model
from tests.interventions._helpers import hooks, wrapped
from tests.reliability import assert_unchanged, one_thread_fixture, snapshot

_one_thread = one_thread_fixture()

H, D = 4, 8  # the tiny LLaMA: 3 layers, 4 query heads of 8 dims (2 KV heads)
TOL = 1e-5


def inputs(seed: int, lengths=(6, 6, 5, 4)) -> dict:
    """Left-padded token ids; every call with the same lengths has the same layout."""
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(3, 90, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, seq - n :] = 1
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 5] - logits[:, -1, 7]


def record_z(model, batch) -> dict[int, torch.Tensor]:
    """Every layer's per-head outputs (``o_proj``'s input) in a plain run."""
    store = {}
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, L=L: store.__setitem__(L, a[0].detach().clone()))
        for L, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad(), hooks(*handles):
        model(**batch)
    return store


def write_z(model, values: dict[int, torch.Tensor]):
    """Hooks replacing ``o_proj``'s input at each layer in ``values`` by that value."""
    return [
        model.model.layers[L].self_attn.o_proj.register_forward_pre_hook(lambda m, a, v=v: (v,)) for L, v in values.items()
    ]


def sender_values(z_clean, z_bad, sender, layers, where=None) -> dict[int, torch.Tensor]:
    out = {}
    for L in layers:
        v = z_clean[L].clone()
        if L == sender[0]:
            cols = slice(sender[1] * D, (sender[1] + 1) * D)
            if where is None:
                v[:, :, cols] = z_bad[L][:, :, cols]
            else:
                i = torch.arange(v.shape[0])
                v[i, where, cols] = z_bad[L][i, where, cols]
        out[L] = v
    return out


def test_path_patching_to_the_logits_equals_hand_spliced_runs():
    model = tiny_model("llama")
    clean, bad = inputs(1), inputs(2)
    before = snapshot(model)
    with wrapped(model) as lab:
        res = path_patching(lab, clean, bad, metric=sl.metrics.logit_diff(5, 7), configs_per_forward=5)
    assert_unchanged(model, before, what="path patching")
    z_clean, z_bad = record_z(model, clean), record_z(model, bad)
    assert res.senders == [(L, h) for L in range(3) for h in range(H)] and res.forwards == 3
    with torch.no_grad():
        base = metric(model(**clean).logits)
        torch.testing.assert_close(res.clean_metric, base, rtol=0, atol=1e-6)
        torch.testing.assert_close(res.corrupt_metric, metric(model(**bad).logits), rtol=0, atol=1e-6)
        for s, sender in enumerate(res.senders):
            with hooks(*write_z(model, sender_values(z_clean, z_bad, sender, range(sender[0], 3)))):
                want = metric(model(**clean).logits)
            torch.testing.assert_close(res.per_example[s], want, rtol=0, atol=TOL)
    torch.testing.assert_close(res.effect[1, 2], (res.per_example[6] - base).mean(), rtol=0, atol=1e-6)
    assert res.per_example.sub(base).abs().max() > 1e-3  # some paths matter
    # a last-layer head has only its direct path: freezing the others changes nothing for it
    lone = sl.Interchange("blocks.2.attn.z", heads=[3], source=bad)
    with wrapped(model) as lab:
        direct = lab.run(clean, [lone]).logits
    torch.testing.assert_close(res.per_example[res.senders.index((2, 3))], metric(direct), rtol=0, atol=TOL)


def test_path_patching_to_queries_equals_hand_spliced_runs():
    model = tiny_model("llama")
    clean, bad = inputs(3), inputs(4)
    ends = torch.tensor([5, 5, 4, 3])  # each example's last real token
    recv = [Receiver(2, (1, 3), "q", positions=ends), Receiver(2, (0,), "q", positions=-2)]
    with wrapped(model) as lab:
        res = path_patching(lab, clean, bad, metric=sl.metrics.logit_diff(5, 7), senders=[(0, 1), (1, 0), (1, 3)], receivers=recv, sender_positions=-1, configs_per_forward=2)
    z_clean, z_bad = record_z(model, clean), record_z(model, bad)
    q_proj = model.model.layers[2].self_attn.q_proj
    starts = torch.tensor([0, 0, 1, 2])
    for s, sender in enumerate(res.senders):
        where = starts + ends  # sender_positions=-1: the last real token, padded
        rec = {}
        with torch.no_grad():
            with hooks(*write_z(model, sender_values(z_clean, z_bad, sender, range(sender[0], 2), where)),
                       q_proj.register_forward_hook(lambda m, a, o: rec.__setitem__("q", o.detach().clone()))):
                model(**clean)

            def splice(m, a, o):
                o = o.clone()
                i = torch.arange(4)
                for h in (1, 3):
                    o[i, starts + ends, h * D : (h + 1) * D] = rec["q"][i, starts + ends, h * D : (h + 1) * D]
                o[i, starts + ends - 1, 0:D] = rec["q"][i, starts + ends - 1, 0:D]
                return o

            with hooks(q_proj.register_forward_hook(splice)):
                want = metric(model(**clean).logits)
        torch.testing.assert_close(res.per_example[s], want, rtol=0, atol=TOL)
    assert res.per_example.sub(res.clean_metric).abs().max() > 1e-4
    assert res.receivers[0].startswith("Receiver(blocks.2.attn.q")


def test_faithfulness_equals_hand_mean_ablation():
    model = tiny_model("llama")
    lengths = (6, 6, 6, 4, 4)
    clean, bad = inputs(5, lengths), inputs(6, lengths)
    groups = torch.tensor([0, 0, 0, 1, 1])  # one layout per group
    circuit = Circuit.of([(0, 1), (2, 0), (2, 3)], "test")
    with wrapped(model) as lab:
        res = faithfulness(lab, circuit, clean, bad, metric=sl.metrics.logit_diff(5, 7), groups=groups, random_circuits=3, seed=1)
        means = head_means(lab, bad, groups=groups)
    z_bad = record_z(model, bad)
    by_hand = {}
    for L in range(3):
        m = z_bad[L].clone()
        for g in (0, 1):
            rows = groups == g
            m[rows] = z_bad[L][rows].mean(0)
        by_hand[L] = m
        torch.testing.assert_close(means[L].flatten(2), m, rtol=0, atol=1e-6)

    def ablate(keep):
        values = {}
        for L in range(3):
            z = {}
            def write(mod, a, L=L):
                v = a[0].clone()
                for h in range(H):
                    if (L, h) not in keep:
                        v[:, :, h * D : (h + 1) * D] = by_hand[L][:, :, h * D : (h + 1) * D]
                return (v,)
            values[L] = write
            del z
        handles = [model.model.layers[L].self_attn.o_proj.register_forward_pre_hook(f) for L, f in values.items()]
        with torch.no_grad(), hooks(*handles):
            return metric(model(**clean).logits)

    with torch.no_grad():
        full = metric(model(**clean).logits)
    torch.testing.assert_close(res.full, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.kept, ablate(circuit.heads), rtol=0, atol=TOL)
    torch.testing.assert_close(res.empty, ablate(frozenset()), rtol=0, atol=TOL)
    for c, r in zip(res.random_circuits, res.random, strict=True):
        assert len(c) == 3
        torch.testing.assert_close(r, ablate(c.heads), rtol=0, atol=TOL)
    assert res.score == pytest.approx(float(res.kept.mean() / full.mean()))
    assert len({c.heads for c in res.random_circuits}) == 3  # three different draws
    text = res.table()
    assert "faithfulness" in text and "3 random circuits" in text
    fig = res.plot()
    assert list(fig.data[0].y) == pytest.approx([res.score, *res.random_scores, res.empty_score])


def test_path_patching_result_views():
    model = tiny_model("llama")
    with wrapped(model) as lab:
        res = path_patching(lab, inputs(7), inputs(8), metric=sl.metrics.logit_diff(5, 7), senders=[(0, 0), (1, 2), (2, 1)])
    rel = res.relative
    assert torch.isnan(rel[0, 1]) and not torch.isnan(rel[1, 2])
    ranked = res.top(3)
    assert [v for _, v in ranked] == sorted(v for _, v in ranked)  # most negative first
    assert ranked[0][1] == pytest.approx(float(rel[ranked[0][0]]))
    middle = sorted(float(rel[h]) for h in res.senders)[1]
    assert res.heads(-middle) == [ranked[0][0]]  # the one head below the middle value
    assert res.heads(middle, sign=1) == [ranked[-1][0]]  # and the one above it
    fig = res.plot()
    z = fig.data[0].z
    assert z[1][2] == pytest.approx(float(rel[1, 2])) and z[0][1] is None
    assert "path patching to logits" in res.table()


def test_bad_arguments_are_refused_before_compute():
    model = tiny_model("llama")
    before = snapshot(model)
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    m = sl.metrics.logit_diff(5, 7)
    try:
        with wrapped(model) as lab:
            lab.sites
            calls.clear()
            with pytest.raises(sl.ShapeMismatch, match="token layout"):
                path_patching(lab, inputs(1), inputs(2, (6, 5, 5, 4)), metric=m)
            with pytest.raises(sl.BatchMismatch):
                path_patching(lab, inputs(1), inputs(2, (6, 6, 5)), metric=m)
            with pytest.raises(sl.ConfigError, match="not below"):
                path_patching(lab, inputs(1), inputs(2), metric=m, senders=[(2, 0)], receivers=[Receiver(2, (0,))])
            with pytest.raises(sl.UnitError, match="out of range"):
                path_patching(lab, inputs(1), inputs(2), metric=m, senders=[(0, 4)])
            with pytest.raises(sl.UnitError, match="heads"):
                path_patching(lab, inputs(1), inputs(2), metric=m, senders=[(0, 0)], receivers=[Receiver(1, (9,))])
            with pytest.raises(sl.UnitError, match="outside"):
                path_patching(lab, inputs(1), inputs(2), metric=m, sender_positions=5)
            with pytest.raises(sl.ConfigError, match="groups"):
                faithfulness(lab, [(0, 0)], inputs(1), inputs(2), metric=m, groups=torch.zeros(3, dtype=torch.long))
            with pytest.raises(sl.ShapeMismatch, match="layouts"):
                faithfulness(lab, [(0, 0)], inputs(1), inputs(2), metric=m)  # one group, two lengths
            assert calls == []
    finally:
        h.remove()
    assert_unchanged(model, before, what="refused calls")
