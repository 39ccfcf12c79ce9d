"""Steering figures on SmolLM2-135M: the per-token effect equals a hand-written LoReFT hook's
log-probabilities, the figures hold the numbers of the results they were given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from steerlab import reft
from steerlab.interventions.errors import ConfigError, DataError
from steerlab.viz import reft_training_curve, token_effects, token_label

PROMPT = "Review: The hotel was"
LAYER = 20


@pytest.fixture(scope="module")
def steered(smollm):
    """A rank-4 LoReFT at layer 20 on the last prompt token, trained a few steps to say 'awful'."""
    model, tok = smollm
    torch.manual_seed(0)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[LAYER], rank=4, positions="l1"), tokenizer=tok)
    data = reft.InstructionDataset(tok, ["Review: The movie was", "Review: The food was"], [" awful.", " awful."],
                                   positions="l1", chat_template=False)
    result = reft.train(rm, data, epochs=4, lr=2e-2, batch_size=2, cache_prefix=True)
    yield rm, result
    rm.unwrap()


def by_hand(model, tok, iv, prompt_ids, cont_ids, steer: bool) -> list[float]:
    """log p(continuation) with the LoReFT written out as a forward hook: h + R^T(W h + b - R h) at the last prompt token."""
    ids = torch.tensor([prompt_ids + cont_ids])
    n = len(prompt_ids)
    R, W, b = iv.R.detach(), iv.weight.detach(), iv.bias.detach()

    def hook(mod, args, out):
        h = out[:, n - 1]
        out = out.clone()
        out[:, n - 1] = h + (h @ W.T + b - h @ R.T) @ R
        return out

    handle = model.model.layers[LAYER].register_forward_hook(hook) if steer else None
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    lp = F.log_softmax(logits[0, n - 1 : -1].float(), -1)
    return lp.gather(-1, ids[0, n:, None]).squeeze(-1).tolist()


def test_steering_effect_equals_a_hand_written_hook(steered, smollm):
    model, tok = smollm
    rm, _ = steered
    (iv,) = rm.interventions
    eff = reft.steering_effect(rm, PROMPT, max_new_tokens=6)
    assert eff.origin == "steered generation"
    p_ids = tok(PROMPT)["input_ids"]
    assert eff.token_ids and eff.tokens == [tok.decode([i]) for i in eff.token_ids]
    with rm.disabled():  # the hand-written hook alone
        assert eff.base_logprob == pytest.approx(by_hand(model, tok, iv, p_ids, eff.token_ids, steer=False), abs=1e-4)
        assert eff.steered_logprob == pytest.approx(by_hand(model, tok, iv, p_ids, eff.token_ids, steer=True), abs=1e-4)
    assert eff.delta == pytest.approx([s - b for s, b in zip(eff.steered_logprob, eff.base_logprob)])
    assert eff.total == pytest.approx(sum(eff.delta))
    # the greedy steered generation chose each token as the steered argmax: its log-prob is the largest there
    assert eff.tokens[0] == " awful" and eff.delta[0] > 1.0


def test_steering_effect_on_a_given_continuation_and_the_base_generation(steered, smollm):
    model, tok = smollm
    rm, _ = steered
    given = reft.steering_effect(rm, PROMPT, " wonderful and clean.")
    assert given.origin == "given" and "".join(given.tokens) == " wonderful and clean."
    taught = reft.steering_effect(rm, PROMPT, " awful.")
    assert taught.delta[0] > given.delta[0] + 1.0  # the taught word gains far more than an opposite one
    base = reft.steering_effect(rm, PROMPT, generate_with="base", max_new_tokens=5)
    with rm.disabled():
        plain = rm.generate([PROMPT], max_new_tokens=5, do_sample=False).texts[0]
    assert base.continuation == plain and base.origin == "base generation"
    with pytest.raises(ConfigError, match="generate_with='sideways'"):
        reft.steering_effect(rm, PROMPT, generate_with="sideways")
    with pytest.raises(DataError, match="continuation=''"):
        reft.steering_effect(rm, PROMPT, "")


def test_steering_effect_with_decode_edits_the_continuation_too(steered, smollm):
    model, tok = smollm
    rm, _ = steered
    dec = reft.steering_effect(rm, PROMPT, max_new_tokens=5, decode=True)
    gen = rm.generate([PROMPT], max_new_tokens=5, do_sample=False, decode=True).texts[0]
    assert dec.continuation == gen  # the scored tokens are the decode-steered generation's
    prompt_only = reft.steering_effect(rm, PROMPT, dec.continuation)
    assert dec.steered_logprob[0] == pytest.approx(prompt_only.steered_logprob[0], abs=1e-5)  # the first token sees the prompt only
    assert dec.steered_logprob[1:] != pytest.approx(prompt_only.steered_logprob[1:], abs=1e-3)


def test_token_effects_figure_holds_the_effect(steered):
    rm, _ = steered
    effects = [reft.steering_effect(rm, PROMPT, max_new_tokens=5), reft.steering_effect(rm, "Review: The album was", " great fun.")]
    fig = token_effects(effects)
    bars = [t for t in fig.data if t.type == "bar"]
    lines = {(t.name, t.yaxis): t for t in fig.data if t.type == "scatter"}
    assert len(bars) == 2
    for i, (e, bar) in enumerate(zip(effects, bars), start=1):
        axis = "y" if i == 1 else f"y{i}"
        assert list(bar.y) == pytest.approx(e.delta) and bar.yaxis == axis
        assert list(lines[("base log-prob", axis)].y) == pytest.approx(e.base_logprob)
        assert list(lines[("steered log-prob", axis)].y) == pytest.approx(e.steered_logprob)
        xaxis = fig.layout[f"xaxis{'' if i == 1 else i}"]
        assert list(xaxis.ticktext) == [token_label(t) for t in e.tokens] and list(xaxis.tickvals) == list(range(len(e.tokens)))
        assert repr(e.tokens[0]) in bar.customdata[0] and f"{e.delta[0]:+.3f}" in bar.customdata[0]
        assert f"{e.total:+.2f} nats" in fig.layout.annotations[i - 1].text
    assert fig.layout.yaxis.title.text == "log-prob (nats)" and fig.layout.xaxis.title.text == "continuation token"
    assert effects[0].plot().data[0].y == fig.data[0].y  # .plot() draws the same thing
    with pytest.raises(ConfigError, match="item 0 is a str"):
        token_effects(["not an effect"])


def test_reft_training_curve_holds_the_losses(steered):
    _, result = steered
    fig = reft_training_curve(result)
    loss, means = fig.data
    assert list(loss.y) == result.losses and list(loss.x) == list(range(1, result.steps + 1))
    per = result.steps // result.epochs
    assert list(means.x) == [per * (e + 1) for e in range(result.epochs)]
    assert list(means.y) == pytest.approx([sum(result.losses[e * per : (e + 1) * per]) / per for e in range(result.epochs)])
    assert f"{result.losses[0]:.3f} → {result.losses[-1]:.3f} over {result.steps} steps" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "optimiser step"
    assert result.plot().data[0].y == loss.y
    with pytest.raises(ConfigError, match="holds no losses"):
        reft_training_curve(reft.TrainResult())
    other = reft.TrainResult([3.0, 2.0, 1.5], 1, 0.5)
    both = reft_training_curve({"seeded": result, "control": other})
    assert [t.name for t in both.data] == ["seeded: loss per step", "control: loss per step"]
    assert list(both.data[0].y) == result.losses and list(both.data[1].y) == [3.0, 2.0, 1.5]
    assert "control 3.000 → 1.500 over 3 steps" in both.layout.title.text
    with pytest.raises(ConfigError, match="result 'control' holds no losses"):
        reft_training_curve({"seeded": result, "control": reft.TrainResult()})
