"""The run graph: several sources and sites, path patching, batched sources, early exit, no_grad, gradients.

Forwards are counted and inspected with the test's own hooks on the model
(root and layers); expected outputs come from manual hooks.
"""

from __future__ import annotations

import functools

import torch

import steerlab as sl
from tests.archs import ENCODERS, tiny_model
from tests.interventions._helpers import wrapped
import pytest

from tests.interventions._manual import pairs, read_site, run_edited, run_edits
from tests.interventions.test_interchange import make_inputs


@functools.cache
def model_of(arch: str):
    return tiny_model(arch)


class ForwardLog:
    """The test's own record of each forward of ``model``: batch size, grad mode, the layers that ran."""

    def __init__(self, model, layers):
        self.forwards: list[dict] = []
        self.handles = [model.register_forward_pre_hook(self._root, with_kwargs=True)]
        self.handles += [layer.register_forward_pre_hook(lambda m, a, k, i=i: self._layer(i), with_kwargs=True) for i, layer in enumerate(layers)]
        self.handles.append(model.get_output_embeddings().register_forward_pre_hook(lambda m, a: self._layer("head")))

    def _root(self, module, args, kwargs):
        self.forwards.append({"batch": kwargs["input_ids"].shape[0], "grad": torch.is_grad_enabled(), "layers": []})

    def _layer(self, i):
        self.forwards[-1]["layers"].append(i)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _copy(src, todo, heads=None):
    def edit(part):
        for i, bj, sj in todo:
            if heads is None:
                part[i, bj] = src[i, sj]
            else:
                part[i, bj, heads] = src[i, sj, heads]

    return edit


def test_several_sources_and_sites_at_once():
    model = model_of("llama")
    base = make_inputs("llama", [7, 5], 7, "left", 1)
    a, b = make_inputs("llama", [6, 7], 7, "left", 2), make_inputs("llama", [4, 3], 4, "left", 3)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    sa, _ = read_site(model, "llama", 0, "resid_post", a)
    sb, _ = read_site(model, "llama", 2, "attn.z", b)
    m = base["attention_mask"]

    def add(part):
        part += v

    want = run_edits(
        model,
        "llama",
        base,
        [
            (0, "resid_post", _copy(sa, pairs(-1, m, a["attention_mask"]))),
            (1, "attn.out", add),
            (2, "attn.z", _copy(sb, pairs([0, -1], m, b["attention_mask"], [1, 2]), heads=[0, 3])),
        ],
    ).logits
    with wrapped(model) as lab:
        g = sl.Graph()
        ra, rb = g.run(a, name="a"), g.run(b, name="b")
        out = g.run(
            base,
            [
                sl.Interchange("blocks.0.resid_post", positions=-1, source=ra),
                sl.Add("blocks.1.attn.out", v),
                sl.Interchange("blocks.2.attn.z", heads=[0, 3], positions=[0, -1], source_positions=[1, 2], source=rb),
            ],
        )
        res = lab.execute(g)
    assert torch.equal(res[out].logits, want)
    assert ra not in res and rb not in res  # runs that only supply values keep no output


def test_path_patching_equals_manual_two_steps():
    """clean -> (corrupt with clean's head 1 at layer 0) -> its layer-2 residual patched into a third run."""
    model = model_of("llama")
    clean, corrupt, third = (make_inputs("llama", [7, 6], 7, "right", s) for s in (4, 5, 6))
    z_clean, _ = read_site(model, "llama", 0, "attn.z", clean)
    _, mid = run_edits(model, "llama", corrupt, [(0, "attn.z", _copy(z_clean, pairs(None, corrupt["attention_mask"], clean["attention_mask"]), heads=[1]))], read=(2, "resid_post"))
    plain_mid, _ = read_site(model, "llama", 2, "resid_post", corrupt)
    assert not torch.equal(mid, plain_mid)  # step 1 changed what step 2 reads
    want = run_edits(model, "llama", third, [(2, "resid_post", _copy(mid, pairs(-1, third["attention_mask"], corrupt["attention_mask"])))]).logits
    with wrapped(model) as lab:
        g = sl.Graph()
        c = g.run(clean)
        x = g.run(corrupt, [sl.Interchange("blocks.0.attn.z", heads=[1], source=c)])
        y = g.run(third, [sl.Interchange("blocks.2.resid_post", positions=-1, source=x)])
        lab.sites  # shapes are probed once per site with a tiny forward; do it before counting
        with ForwardLog(model, lab.layers) as log:
            res = lab.execute(g)
    assert torch.equal(res[y].logits, want)
    # clean stops after layer 0, x after layer 2 (no head), y runs to the end
    assert [f["layers"] for f in log.forwards] == [[0], [0, 1, 2], [0, 1, 2, "head"]]


def test_plain_sources_of_one_shape_share_one_forward_and_stop_early():
    model = model_of("llama")
    base = make_inputs("llama", [7, 5], 7, "left", 7)
    s1, s2 = make_inputs("llama", [6, 7], 7, "left", 8), make_inputs("llama", [7, 3], 7, "left", 9)
    m = base["attention_mask"]
    v1, _ = read_site(model, "llama", 0, "mlp.post", s1)
    v2, _ = read_site(model, "llama", 1, "attn.z", s2)
    want = run_edits(
        model,
        "llama",
        base,
        [(0, "mlp.post", _copy(v1, pairs(-1, m, s1["attention_mask"]))), (1, "attn.z", _copy(v2, pairs(-2, m, s2["attention_mask"]), heads=[2]))],
    ).logits
    with wrapped(model) as lab:
        ivs = [
            sl.Interchange("blocks.0.mlp.post", positions=-1, source=s1),
            sl.Interchange("blocks.1.attn.z", positions=-2, heads=[2], source=s2),
        ]
        lab.sites  # shapes are probed once per site with a tiny forward; do it before counting
        with ForwardLog(model, lab.layers) as log:
            got = lab.run(base, ivs).logits
    assert torch.equal(got, want)
    # one forward of both sources (batch 2 + 2), stopped in layer 1 (its attention output), then the base
    assert [(f["batch"], f["layers"]) for f in log.forwards] == [(4, [0, 1]), (2, [0, 1, 2, "head"])]


def test_source_runs_under_no_grad_unless_a_gradient_needs_them():
    model = model_of("llama")
    base, src, src2 = (make_inputs("llama", [7, 6], 7, "left", s) for s in (10, 11, 12))
    with wrapped(model) as lab:
        das = sl.SubspaceInterchange("blocks.1.resid_post", size=4, positions=-1, source=src)
        lab.sites  # shapes are probed once per site with a tiny forward; do it before counting
        with ForwardLog(model, lab.layers) as log:
            lab.run(base, [das]).logits.sum().backward()
        assert [f["grad"] for f in log.forwards] == [False, True]
        assert das.rotation.weight.grad is not None
        # a trainable intervention in a run that feeds another: that run needs its gradient
        g = sl.Graph()
        s = g.run(src2)
        x = g.run(src, [sl.Interchange("blocks.0.resid_pre", positions=0, source=s), sl.Add("blocks.0.mlp.out", torch.zeros(32), trainable=True)])
        y = g.run(base, [sl.Interchange("blocks.1.resid_post", positions=-1, source=x)])
        with ForwardLog(model, lab.layers) as log:
            lab.execute(g)[y]
        assert [f["grad"] for f in log.forwards] == [False, True, True]  # s: plain; x: trainable; y: the output
        with torch.no_grad(), ForwardLog(model, lab.layers) as log:
            lab.run(base, [das])
        assert [f["grad"] for f in log.forwards] == [False, False]


def test_gradients_reach_trainable_interventions_only():
    model = model_of("llama")
    base, src = make_inputs("llama", [7, 6], 7, "left", 13), make_inputs("llama", [7, 4], 7, "left", 14)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = torch.randint(0, 96, (2,), generator=torch.Generator().manual_seed(0))
    with wrapped(model) as lab:
        das = sl.SubspaceInterchange("blocks.1.resid_post", size=4, positions=-1, source=src)
        steer = sl.Add("blocks.0.mlp.out", torch.zeros(32), trainable=True, positions=[0, -1])
        frozen = sl.Add("blocks.2.attn.out", torch.ones(32) * 0.1, positions=-1)
        params = [p for iv in (das, steer, frozen) for p in iv.parameters()]
        opt = torch.optim.AdamW(params + list(model.parameters()), lr=0.05, weight_decay=0.1)
        start = [p.detach().clone() for p in params]
        for _ in range(3):
            logits = lab.run(base, [das, steer, frozen]).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            assert sum(p.grad is not None for p in model.parameters()) == 0
            assert das.rotation.weight.grad.abs().sum() > 0 and steer.vector.grad.abs().sum() > 0
            opt.step()
        assert not frozen.trainable and all(not p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a base parameter changed"
    assert all(not torch.equal(p, s) for p, s in zip(params[:2], start[:2]))


def test_add_gradient_equals_manual_hook_gradient():
    model = model_of("llama")
    base = make_inputs("llama", [7, 5], 7, "right", 15)
    v0 = torch.randn(32, generator=torch.Generator().manual_seed(3))
    slots = [[1, 6], [1, 4]]  # positions [1, -1] on lengths 7 and 5, right padding
    leaf = v0.clone().requires_grad_(True)
    for p in model.parameters():
        p.requires_grad_(False)

    def edit(part):
        for i in range(2):
            for j in slots[i]:
                part[i, j] = part[i, j] + leaf

    out = run_edits(model, "llama", base, [(1, "attn.out", edit)], grad=True)
    out.logits.pow(2).mean().backward()
    for p in model.parameters():
        p.requires_grad_(True)
    with wrapped(model) as lab:
        iv = sl.Add("blocks.1.attn.out", v0, trainable=True, positions=[1, -1])
        lab.run(base, [iv]).logits.pow(2).mean().backward()
    torch.testing.assert_close(iv.vector.grad, leaf.grad, atol=1e-6, rtol=1e-5)
    assert leaf.grad.abs().sum() > 0



@pytest.mark.parametrize("site", ["resid_mid", "resid_pre", "attn.v", "mlp.post"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "olmo2", "gpt_neox_seq", "phi3", "bert"])
def test_gradient_through_in_place_and_fused_sites_equals_manual(arch, site):
    """resid_mid is written in place into the residual: its gradient must reach both the MLP and the residual path."""
    model = model_of(arch)
    inputs = make_inputs(arch, [7, 5], 7, "right", 16)
    ff = getattr(model.config, "intermediate_size", None) or 4 * 32  # GPT-2: 4 d
    width = {"attn.v": 8, "mlp.post": ff}.get(site, 32)
    heads = [1] if site == "attn.v" else None
    v0 = torch.randn(width, generator=torch.Generator().manual_seed(5))
    proj = torch.randn(96 if arch not in ENCODERS else 32, generator=torch.Generator().manual_seed(6))
    slots = [[1, 6], [1, 4]]  # positions [1, -1] on lengths 7 and 5, right padding

    def loss_of(out):
        o = out.logits if arch not in ENCODERS else out.last_hidden_state
        return (o @ proj).pow(2).mean()

    leaf = v0.clone().requires_grad_(True)

    def edit(part):
        for i in range(2):
            for j in slots[i]:
                if heads is None:
                    part[i, j] = part[i, j] + leaf
                else:
                    part[i, j, heads] = part[i, j, heads] + leaf

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        loss_of(run_edited(model, arch, 1, site, inputs, edit, grad=True)).backward()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    with wrapped(model) as lab:
        iv = sl.Add(f"blocks.1.{site}", v0, trainable=True, positions=[1, -1], heads=heads)
        loss_of(lab.run(inputs, [iv]).output).backward()
    assert leaf.grad.abs().sum() > 0
    torch.testing.assert_close(iv.vector.grad, leaf.grad, atol=1e-7, rtol=1e-4)


def test_in_place_site_with_an_upstream_gradient():
    """resid_mid is edited in place while the residual already requires grad (a trainable edit below it):
    the gradients of both equal a manual, in-graph computation."""
    model = model_of("llama")
    inputs = make_inputs("llama", [7, 4], 7, "left", 17)
    R = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(8)))[0][:4]
    s = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(9))
    last = [6, 6]  # left padding: the last real token is the last index
    blk = model.model.layers[1]
    A0 = R.T.clone()  # Orthonormal stores Rᵀ; orthonormal columns come back unchanged from QR
    leaf_v = torch.zeros(64, requires_grad=True)
    leaf_a = A0.clone().requires_grad_(True)
    store = {}

    def up(m, args, kwargs):  # Add at blocks.0.mlp.post, positions [0, -1]
        x = args[0].clone() if args else kwargs["hidden_states"].clone()
        for i, js in enumerate([[0, 6], [3, 6]]):
            for j in js:
                x[i, j] = x[i, j] + leaf_v
        return ((x,), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def keep_in(m, args, kwargs):
        store["pre"] = args[0] if args else kwargs["hidden_states"]

    def attn_out(m, args, out):
        q, _ = torch.linalg.qr(leaf_a)
        r = (q * torch.sign(torch.diagonal(_)).unsqueeze(0)).T
        o = out[0]
        mid = store["pre"] + o
        delta = torch.zeros_like(o)
        for i, j in enumerate(last):
            h = mid[i, j]
            delta[i, j] = ((s[i, 0] - h) @ r.T) @ r
        return (o + delta, *out[1:])

    hs = [
        model.model.layers[0].mlp.down_proj.register_forward_pre_hook(up, with_kwargs=True),
        blk.register_forward_pre_hook(keep_in, with_kwargs=True),
        blk.self_attn.register_forward_hook(attn_out),
    ]
    try:
        model(**inputs).logits.pow(2).mean().backward()
    finally:
        for h in hs:
            h.remove()
    with wrapped(model) as lab:
        das = sl.SubspaceInterchange("blocks.1.resid_mid", size=4, init=R, positions=-1, source=sl.SourceValue(s))
        steer = sl.Add("blocks.0.mlp.post", torch.zeros(64), trainable=True, positions=[0, -1])
        lab.run(inputs, [steer, das]).logits.pow(2).mean().backward()
    torch.testing.assert_close(steer.vector.grad, leaf_v.grad, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(das.rotation.weight.grad, leaf_a.grad, atol=1e-7, rtol=1e-4)


def test_results_are_indexed_by_run_and_a_name_is_a_clear_error():
    lab = sl.wrap(tiny_model("llama"))
    g = sl.Graph()
    src = g.run(torch.tensor([[5, 6, 7]]), name="src")
    x = g.run(torch.tensor([[8, 9, 10]]), [sl.Interchange("blocks.0.resid_post", positions=[-1], source=src)], name="x")
    res = lab.execute(g)
    assert torch.equal(res[x].logits, lab.run(torch.tensor([[8, 9, 10]]), [sl.Interchange("blocks.0.resid_post", positions=[-1], source=torch.tensor([[5, 6, 7]]))]).logits)
    with pytest.raises(KeyError, match=r"Run\('src', 0 interventions\) kept no output: it only supplied values to other runs"):
        res[src]
    with pytest.raises(sl.GraphError, match="indexed by the Run that graph.run\\(...\\) returned; got str 'x'"):
        res["x"]
    lab.unwrap()
