"""Patching metrics against hand computations on real logits, under both padding sides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import steerlab as sl
from steerlab.interventions.inputs import Inputs
from tests.archs import tiny_model, tiny_inputs


@pytest.fixture(scope="module")
def run():
    """Logits of a tiny LLaMA on a batch whose last example is padded (2 pads), per padding side."""
    model = tiny_model("llama")
    out = {}
    for side in ("left", "right"):
        inp = tiny_inputs("llama", batch=3, seq=6, pad=2, side=side)
        with torch.no_grad():
            out[side] = (inp, model(**inp))
    return out


def last_real(mask: torch.Tensor) -> list[int]:
    """Padded index of each example's last real token, by plain Python."""
    return [max(j for j, m in enumerate(row) if m) for row in mask.tolist()]


def first_real(mask: torch.Tensor) -> list[int]:
    return [min(j for j, m in enumerate(row) if m) for row in mask.tolist()]


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_metrics_read_the_last_real_token(run, side):
    inp, out = run[side]
    z = torch.stack([out.logits[i, j] for i, j in enumerate(last_real(inp["attention_mask"]))])
    torch.testing.assert_close(sl.metrics.logit_diff(5, 7)(out, inp), z[:, 5] - z[:, 7], rtol=0, atol=0)
    torch.testing.assert_close(sl.metrics.logit(11)(out, inp), z[:, 11], rtol=0, atol=0)
    p = torch.softmax(z.double(), -1)
    torch.testing.assert_close(sl.metrics.prob(11)(out, inp).double(), p[:, 11], rtol=1e-6, atol=0)
    torch.testing.assert_close(sl.metrics.logprob(11)(out, inp).double(), p[:, 11].log(), rtol=1e-6, atol=0)
    # position 0 is each example's first real token, not padded slot 0
    z0 = torch.stack([out.logits[i, j] for i, j in enumerate(first_real(inp["attention_mask"]))])
    torch.testing.assert_close(sl.metrics.logit(11, position=0)(out, inp), z0[:, 11], rtol=0, atol=0)
    # the logits tensor alone, and a RunResult, work as outputs too
    torch.testing.assert_close(sl.metrics.logit(3)(out.logits, Inputs.of(inp)), z[:, 3], rtol=0, atol=0)


def test_per_example_tokens_and_packed_copies(run):
    inp, out = run["left"]
    z = torch.stack([out.logits[i, j] for i, j in enumerate(last_real(inp["attention_mask"]))])
    good, bad = [5, 6, 7], torch.tensor([9, 10, 11])
    want = z[torch.arange(3), good] - z[torch.arange(3), bad]
    m = sl.metrics.logit_diff(good, bad)
    torch.testing.assert_close(m(out, inp), want, rtol=0, atol=0)
    # a batch repeating the examples (copy-major, as a packed sweep runs) reuses the tokens per copy
    rep = {k: v.repeat(2, 1) for k, v in inp.items()}
    torch.testing.assert_close(m(out.logits.repeat(2, 1, 1), rep), want.repeat(2), rtol=0, atol=0)
    with pytest.raises(sl.BatchMismatch, match="the metric has 3 per-example tokens but the batch has 4 rows"):
        m(out.logits[:2].repeat(2, 1, 1), {k: v[:2].repeat(2, 1) for k, v in inp.items()})


def test_kl(run):
    inp, out = run["right"]
    idx = last_real(inp["attention_mask"])
    z = torch.stack([out.logits[i, j] for i, j in enumerate(idx)])
    ref = torch.randn_like(z)
    want = F.kl_div(z.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(sl.metrics.kl(ref)(out, inp), want, rtol=1e-5, atol=1e-6)
    to_base = sl.metrics.kl_to_base().against(out, inp)
    assert to_base(out, inp).abs().max() < 1e-6  # the base against itself
    shifted = out.logits.clone()
    shifted[..., 4] += 3.0
    assert (to_base(shifted, inp) > 1e-3).all()
    with pytest.raises(sl.ConfigError, match=r"kl_to_base\(\) needs the base run's output"):
        sl.metrics.kl_to_base()(out, inp)


def test_loss_is_the_models_own_per_example_loss():
    model = tiny_model("llama")
    inp = tiny_inputs("llama", batch=3, seq=6, pad=2, side="right")
    with torch.no_grad():
        out = model(**inp)
        got = sl.metrics.loss()(out, inp)
        for i in range(3):
            n = int(inp["attention_mask"][i].sum())
            ids = inp["input_ids"][i : i + 1, :n]
            own = model(input_ids=ids, labels=ids).loss  # transformers' mean next-token loss on the unpadded example
            assert got[i].item() == pytest.approx(own.item(), rel=1e-5)


def test_string_tokens_resolve_with_the_tokenizer(smollm):
    model, tok = smollm
    (paris,) = tok.encode(" Paris", add_special_tokens=False)
    m = sl.metrics.logit_diff(" Paris", " Rome").bind(tok)
    assert int(m.ids["good"]) == paris
    lab = sl.wrap(model, tok)
    try:
        assert int(sl.metrics.prob(" Paris").bind(lab).ids["token"]) == paris  # a Lab binds too
    finally:
        lab.unwrap()
    with pytest.raises(sl.ConfigError, match=r"token=' Tchaikovsky' is \d+ tokens under this tokenizer \(\[' T.*\]\); a metric token must be a single token"):
        sl.metrics.prob(" Tchaikovsky", tokenizer=tok)
    with pytest.raises(sl.ConfigError, match=r"good\[1\]=' Tchaikovsky' is \d+ tokens"):
        sl.metrics.logit_diff([" Paris", " Tchaikovsky"], " Rome", tokenizer=tok)
    with pytest.raises(sl.ConfigError, match=r"token=' Paris' is a string but the metric has no tokenizer"):
        sl.metrics.prob(" Paris")(torch.zeros(1, 2, 5))


def test_bad_metric_input(run):
    inp, out = run["left"]
    with pytest.raises(sl.PositionOutOfRange, match=r"metric position=5 is beyond example 2, which has 4 real tokens"):
        sl.metrics.logit(3, position=5)(out, inp)
    with pytest.raises(sl.ConfigError, match=r"position=\[0, 1\]: expected one int"):
        sl.metrics.logit(3, position=[0, 1])
    with pytest.raises(sl.ConfigError, match="the model output \\(BaseModelOutput.*\\) has none; a model without a language-model head needs a custom metric"):
        bert = tiny_model("bert")
        with torch.no_grad():
            sl.metrics.logit(3)(bert(**tiny_inputs("bert")), None)
    with pytest.raises(sl.ConfigError, match=r"kl\(reference=\(3,\)\): expected logits \[batch, vocab\]"):
        sl.metrics.kl(torch.zeros(3))
