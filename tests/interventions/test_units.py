"""Units: positions (real-token indexing, either padding side), heads, dims; batch invariance.

Expected values come from Hugging Face's hidden states and manual hooks;
slots are resolved by plain Python over the attention mask
(:func:`tests.interventions._manual.resolve`).
"""

from __future__ import annotations

import functools

import pytest
import torch

import steerlab as sl
from tests.archs import ARCHS, ENCODERS, tiny_model
from tests.interventions._helpers import real_index, wrapped
from tests.interventions._manual import pairs, read_site, resolve, run_edited
from tests.interventions.test_interchange import make_inputs


@functools.cache
def model_of(arch: str):
    return tiny_model(arch)


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


# encoders pad on the right only
ARCH_SIDES = [(a, s) for a in sorted(ARCHS) for s in (("right",) if a in ENCODERS else ("left", "right"))]


@pytest.mark.parametrize("arch,side", ARCH_SIDES)
def test_positions_count_real_tokens(arch, side):
    model = model_of(arch)
    inputs = make_inputs(arch, [7, 4, 2], 8, side, 3)
    spec = [0, -1, 1, -2]
    # GPT-Neo's own forward differs by ~1e-8 between use_cache=True and False (transformers 5.24,
    # its local-attention path); steerlab's collect runs without a cache, so compare to that forward
    kw = {"use_cache": False} if arch not in ENCODERS else {}
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True, **kw).hidden_states[2]  # = blocks.1.resid_post
    with wrapped(model) as lab:
        got = lab.collect(inputs, "blocks.1.resid_post", positions=spec)["blocks.1.resid_post"]
        neg = lab.collect(inputs, "blocks.1.resid_post", positions=-2)["blocks.1.resid_post"]
    mask = inputs["attention_mask"]
    want = torch.stack([hs[i, [real_index(mask, i, p) for p in spec]] for i in range(3)])
    assert torch.equal(got, want)
    assert torch.equal(neg[:, 0], torch.stack([hs[i, real_index(mask, i, -2)] for i in range(3)]))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("lengths", [[13, 5, 1, 9], [14, 7, 3, 13]])
def test_f7_l7_on_short_prompts_edits_each_real_token_once(side, lengths):
    """Prompts shorter than 14 tokens: every real token is touched exactly once, no padding ever."""
    model = model_of("llama")
    inputs = make_inputs("llama", lengths, 16, side, 4)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    slots = resolve("f7+l7", inputs["attention_mask"])
    for i, n in enumerate(lengths):
        filled = [j for j in slots[i] if j is not None]
        assert len(filled) == len(set(filled)) == min(n, 14)
        assert all(inputs["attention_mask"][i, j] == 1 for j in filled)

    def edit(part):
        for i in range(len(lengths)):
            for j in slots[i]:
                if j is not None:
                    part[i, j] += v

    want = run_edited(model, "llama", 1, "resid_post", inputs, edit).logits
    with wrapped(model) as lab:
        got = lab.run(inputs, [sl.Add("blocks.1.resid_post", v, positions="f7+l7")]).logits
        cache = lab.collect(inputs, "blocks.1.resid_post", positions="f7+l7")["blocks.1.resid_post"]
    assert torch.equal(got, want)
    full, _ = read_site(model, "llama", 1, "resid_post", inputs)
    for i in range(len(lengths)):
        for k, j in enumerate(slots[i]):
            if j is None:
                assert torch.equal(cache[i, k], torch.zeros(32)), "an empty slot holds no token's value"
            else:
                assert torch.equal(cache[i, k], full[i, j])


@pytest.mark.parametrize("side", ["left", "right"])
def test_per_example_tensor_positions(side):
    model = model_of("qwen3")
    inputs = make_inputs("qwen3", [6, 3, 5], 6, side, 5)
    pos = torch.tensor([[0, 5, 2], [2, -1, -1], [-1, -1, -1]])  # -1 pads; the last row selects nothing
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    slots = resolve(pos, inputs["attention_mask"])

    def edit(part):
        for i in range(3):
            for j in slots[i]:
                if j is not None:
                    part[i, j] = part[i, j] * 2 + v

    want = run_edited(model, "qwen3", 1, "attn.out", inputs, edit).logits
    with wrapped(model) as lab:
        got = lab.run(inputs, [sl.Lambda("blocks.1.attn.out", lambda h: h * 2 + v, positions=pos)]).logits
        per_call = lab.run(inputs, [sl.Lambda("blocks.1.attn.out", lambda h: h * 2 + v, positions="per-call")], positions=pos).logits
    assert torch.equal(got, want)
    assert torch.equal(per_call, want)


@pytest.mark.parametrize("side", ["left", "right"])
def test_base_and_source_of_different_lengths_with_separate_positions(side):
    model = model_of("llama")
    base = make_inputs("llama", [9, 4], 9, side, 6)
    source = make_inputs("llama", [5, 3], 5, side, 7)
    spec, sspec = [0, -1], [1, -2]
    src, _ = read_site(model, "llama", 1, "mlp.post", source)
    todo = pairs(spec, base["attention_mask"], source["attention_mask"], sspec)

    def edit(part):
        for i, bj, sj in todo:
            part[i, bj] = src[i, sj]

    want = run_edited(model, "llama", 1, "mlp.post", base, edit).logits
    with wrapped(model) as lab:
        iv = sl.Interchange("blocks.1.mlp.post", positions=spec, source_positions=sspec, source=source)
        got = lab.run(base, [iv]).logits
        plain = lab.run(base).logits
    assert not torch.equal(got, plain)
    assert torch.equal(got, want)


@pytest.mark.parametrize("side", ["left", "right"])
def test_empty_source_slot_leaves_the_base_unchanged(side):
    """f2+l2 on a 3-token source leaves a slot empty: the aligned base slot keeps its value."""
    model = model_of("llama")
    base = make_inputs("llama", [7, 3], 7, side, 8)
    source = make_inputs("llama", [3, 7], 7, side, 9)
    src, _ = read_site(model, "llama", 1, "resid_post", source)
    todo = pairs("f2+l2", base["attention_mask"], source["attention_mask"])
    assert len(todo) == 6  # 3 + 3 slots filled on both sides (of 8)

    def edit(part):
        for i, bj, sj in todo:
            part[i, bj] = src[i, sj]

    want = run_edited(model, "llama", 1, "resid_post", base, edit).logits
    with wrapped(model) as lab:
        got = lab.run(base, [sl.Interchange("blocks.1.resid_post", positions="f2+l2", source=source)]).logits
        sv = lab.source_value(sl.Interchange("blocks.1.resid_post", positions="f2+l2", source=source))
        via_value = lab.run(base, [sl.Interchange("blocks.1.resid_post", positions="f2+l2", source=sv)]).logits
    assert torch.equal(got, want)
    assert torch.equal(via_value, want)


@pytest.mark.parametrize("arch,site,width", [("llama", "attn.k", 2), ("llama", "attn.v", 2), ("mistral", "attn.k", 2), ("phi3", "attn.k", 2), ("gpt2", "attn.z", 4)])
def test_heads_count_kv_heads_under_gqa(arch, site, width):
    model = model_of(arch)
    base, source = make_inputs(arch, [6, 4], 6, "left", 10), make_inputs(arch, [5, 6], 6, "left", 11)
    with wrapped(model) as lab:
        assert lab.sites[f"blocks.1.{site}"]["shape"][2] == width
        with pytest.raises(sl.UnitError, match=f"has {width} heads"):
            lab.run(base, [sl.Interchange(f"blocks.1.{site}", heads=[width], positions=-1, source=source)])
        got = lab.run(base, [sl.Interchange(f"blocks.1.{site}", heads=[width - 1], positions=-1, source=source)]).logits
    src, _ = read_site(model, arch, 1, site, source)
    todo = pairs(-1, base["attention_mask"], source["attention_mask"])

    def edit(part):
        for i, bj, sj in todo:
            part[i, bj, width - 1] = src[i, sj, width - 1]

    want = run_edited(model, arch, 1, site, base, edit).logits
    assert torch.equal(got, want)


def test_dims_select_features():
    model = model_of("llama")
    base, source = make_inputs("llama", [6, 4], 6, "right", 12), make_inputs("llama", [5, 6], 6, "right", 13)
    dims = [0, 5, 7, 31]
    src, _ = read_site(model, "llama", 1, "resid_post", source)
    todo = pairs(-1, base["attention_mask"], source["attention_mask"])

    def edit(part):
        for i, bj, sj in todo:
            part[i, bj, dims] = src[i, sj, dims]

    want = run_edited(model, "llama", 1, "resid_post", base, edit).logits
    R = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))[0][:2]

    def sub(part):
        for i, bj, sj in todo:
            h, s = part[i, bj, dims], src[i, sj, dims]
            part[i, bj, dims] = h + ((s - h) @ R.T) @ R

    want_sub = run_edited(model, "llama", 1, "resid_post", base, sub).logits
    with wrapped(model) as lab:
        got = lab.run(base, [sl.Interchange("blocks.1.resid_post", dims=dims, positions=-1, source=source)]).logits
        iv = sl.SubspaceInterchange("blocks.1.resid_post", size=2, init=R, dims=dims, positions=-1, source=source)
        got_sub = lab.run(base, [iv]).logits
    assert torch.equal(got, want)
    assert iv.width == 4
    torch.testing.assert_close(got_sub, want_sub, atol=1e-6, rtol=1e-6)


# -- batch invariance -------------------------------------------------------------------------


def _rows(inputs: dict, i: int) -> dict:
    m = inputs["attention_mask"][i].bool()
    return {"input_ids": inputs["input_ids"][i][m][None], "attention_mask": torch.ones(1, int(m.sum()), dtype=torch.long)}


@pytest.mark.parametrize("arch,side", [("llama", "left"), ("llama", "right"), ("qwen3", "left"), ("qwen3", "right"), ("bert", "right")])
def test_padded_batch_equals_examples_one_by_one(arch, side):
    """Interventions at real-token positions give the same per-example result batched or alone (<= 1e-5)."""
    model = model_of(arch)
    lengths = [7, 4, 5]
    base, source = make_inputs(arch, lengths, 7, side, 14), make_inputs(arch, [6, 7, 3], 7, side, 15)
    pos = torch.tensor([[1, 6], [0, -1], [4, 2]])
    v = torch.randn(32, generator=torch.Generator().manual_seed(4))

    def ivs(src, p):
        return [
            sl.Interchange("blocks.0.resid_post", positions=-1, source_positions=0, source=src),
            sl.Add("blocks.1.mlp.out", v, positions="f2+l2"),
            sl.Scale("blocks.1.attn.z", factor=0.0, heads=[1], positions=p),
        ]

    with wrapped(model) as lab:
        batched = _out(lab.run(base, ivs(source, pos)).output)
        for i, n in enumerate(lengths):
            alone = _out(lab.run(_rows(base, i), ivs(_rows(source, i), pos[i : i + 1])).output)
            real = base["attention_mask"][i].bool()
            torch.testing.assert_close(batched[i][real], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_source_batch_of_one_is_broadcast(side):
    """One source example for a batch of bases; f2+l2 on a 3-token source leaves slots empty for every row."""
    model = model_of("llama")
    base = make_inputs("llama", [7, 4, 6], 7, side, 16)
    source = make_inputs("llama", [3], 5, side, 17)
    src, _ = read_site(model, "llama", 1, "attn.z", source)
    b_slots = resolve("f2+l2", base["attention_mask"])
    s_slots = resolve("f2+l2", source["attention_mask"])[0]

    def edit(part):
        for i in range(3):
            for bj, sj in zip(b_slots[i], s_slots):
                if bj is not None and sj is not None:
                    part[i, bj, [0, 2]] = src[0, sj, [0, 2]]

    want = run_edited(model, "llama", 1, "attn.z", base, edit).logits
    with wrapped(model) as lab:
        got = lab.run(base, [sl.Interchange("blocks.1.attn.z", heads=[0, 2], positions="f2+l2", source=source)]).logits
    assert torch.equal(got, want)


def test_heads_and_dims_together():
    model = model_of("qwen3")
    base, source = make_inputs("qwen3", [6, 4], 6, "left", 18), make_inputs("qwen3", [5, 6], 6, "left", 19)
    src, _ = read_site(model, "qwen3", 1, "attn.z", source)
    todo = pairs([0, -1], base["attention_mask"], source["attention_mask"])
    dims = [1, 4, 7]

    def edit(part):
        for i, bj, sj in todo:
            for h in (1, 3):
                part[i, bj, h, dims] = src[i, sj, h, dims]

    want = run_edited(model, "qwen3", 1, "attn.z", base, edit).logits
    with wrapped(model) as lab:
        iv = sl.Interchange("blocks.1.attn.z", heads=[1, 3], dims=dims, positions=[0, -1], source=source)
        got = lab.run(base, [iv]).logits
        seen = {}
        lab.run(base, [sl.Lambda("blocks.1.attn.z", lambda x: seen.setdefault("x", x), heads=[1, 3], dims=dims, positions=[0, -1])])
    assert seen["x"].shape == (2, 2, 2, 3)  # [batch, k, head, dims]
    assert torch.equal(got, want)


def test_interventions_at_one_site_compose_in_order_and_reads_see_the_result():
    model = model_of("llama")
    inputs = make_inputs("llama", [7, 5], 7, "left", 20)
    v = torch.randn(32, generator=torch.Generator().manual_seed(5))
    slots = resolve([0, -1], inputs["attention_mask"])
    last = resolve(-1, inputs["attention_mask"])

    def edit(part):  # Add at [0, -1], then Scale at -1
        for i in range(2):
            for j in slots[i]:
                part[i, j] = part[i, j] + v
            part[i, last[i][0]] = part[i, last[i][0]] * 2.0

    want = run_edited(model, "llama", 1, "resid_post", inputs, edit).logits
    full, _ = read_site(model, "llama", 1, "resid_post", inputs)
    with wrapped(model) as lab:
        res = lab.run(
            inputs,
            [
                sl.Collect("blocks.2.resid_pre", name="next"),  # the same tensor, one block later
                sl.Add("blocks.1.resid_post", v, positions=[0, -1]),
                sl.Collect("blocks.1.resid_post", name="here"),
                sl.Scale("blocks.1.resid_post", factor=2.0, positions=-1),
            ],
        )
    assert torch.equal(res.logits, want)
    edited = full.clone()
    edit(edited)
    assert torch.equal(res.cache["here"], edited)  # a read sees what the rest of the forward uses
    assert torch.equal(res.cache["next"], edited)


@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm_padded_batch_equals_one_by_one(smollm, side):
    model, tok = smollm
    base = dict(tok(["The quick brown fox jumps", "Hello", "One two three"], return_tensors="pt", padding=True, padding_side=side))
    source = dict(tok(["A slow green turtle", "Good night moon", "Hi"], return_tensors="pt", padding=True, padding_side=side))
    R = torch.linalg.qr(torch.randn(576, 576, generator=torch.Generator().manual_seed(0)))[0][:8]
    v = torch.randn(576, generator=torch.Generator().manual_seed(1))

    def ivs(src):
        return [
            sl.SubspaceInterchange("blocks.9.resid_post", size=8, init=R, positions=-1, source=src),
            sl.Add("blocks.14.mlp.out", v, positions="f1+l1"),
        ]

    with wrapped(model, tok) as lab:
        batched = lab.run(base, ivs(source)).logits
        for i in range(3):
            alone = lab.run(_rows(base, i), ivs(_rows(source, i))).logits
            real = base["attention_mask"][i].bool()
            torch.testing.assert_close(batched[i][real], alone[0], atol=1e-4, rtol=1e-4)


def test_one_positions_grammar_everywhere():
    """``"last"`` / ``"first"`` mean ``"l1"`` / ``"f1"`` in every API (one parser): a run, a sweep, ReFT
    prompt positions and configs, and a DAS encoder (where ``"l1"`` and a spec like ``"f1+l1"`` are
    accepted beside its named positions)."""
    import transformers as T

    from steerlab import reft
    from steerlab.alignment import PromptEncoder
    from steerlab.models import embedded_path
    from tests.archs import tiny_inputs, tiny_model

    assert sl.Positions("last") == sl.Positions("l1") and sl.Positions("first") == sl.Positions("f1")
    model = tiny_model("llama")
    lab = sl.wrap(model)
    x = tiny_inputs("llama", pad=2, side="left")
    add = lambda p: sl.Add("blocks.1.resid_post", torch.ones(32), positions=p)  # noqa: E731
    assert torch.equal(lab.run(x, [add("last")]).logits, lab.run(x, [add(-1)]).logits)
    src = {k: v.flip(0) for k, v in x.items()}
    metric = sl.metrics.logit_diff(3, 4)
    a = sl.sweep(lab, x, src, sites="blocks.1.resid_post", positions="last", metric=metric)
    b = sl.sweep(lab, x, src, sites="blocks.1.resid_post", positions=[-1], metric=metric)
    assert torch.equal(a.per_example, b.per_example)
    lab.unwrap()
    assert torch.equal(reft.prompt_positions([3, 5], "last"), reft.prompt_positions([3, 5], "l1"))
    assert reft.ReftConfig(layers=[0], positions="last").position_groups() == ["last"]
    tok = T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    enc = PromptEncoder(tok, "The {word} is", {0: " good", 1: " bad"})
    settings = [{"word": "cat"}, {"word": "hippopotamus"}]
    e = enc.encode(settings)
    assert torch.equal(enc.positions("last", settings, e), enc.positions("l1", settings, e))
    both = enc.positions("f1+l1", settings, e)
    assert both[:, 0].tolist() == [0, 0] and torch.equal(both[:, 1:], enc.positions("last", settings, e))
    assert enc.position_spec("l1") == "l1"
    with pytest.raises(sl.ConfigError, match="unknown position 'middle'"):
        enc.positions("middle", settings, e)
