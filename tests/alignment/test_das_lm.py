"""DAS on language models: the cached paths against the plain engine (a tiny LLaMA with SmolLM2's
tokenizer), and a two-layer search for adjective polarity on SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import steerlab as sl
from steerlab.alignment import search, tasks
from steerlab.alignment._activations import Runner
from steerlab.alignment.das import build_subspace_interventions, store_for
from tests.reliability import assert_unchanged, one_thread_fixture, snapshot

_one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def tokenizer():
    from steerlab.models import embedded_path

    return T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))


@pytest.fixture(scope="module")
def tiny_lab(tokenizer):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    return sl.wrap(T.AutoModelForCausalLM.from_config(cfg).eval(), tokenizer)


@pytest.mark.parametrize("positions", ["last", "adjective"])
def test_cached_runs_equal_the_plain_engine(tiny_lab, tokenizer, positions):
    lab = tiny_lab
    task = tasks.sentiment()
    data = task.counterfactuals(24, tokenizer, seed=1)
    site = "blocks.2.resid_post"
    store = store_for(lab, [data], [site])
    fast, slow = Runner(store, data, site, positions), Runner(store, data, site, positions, suffix=False)
    assert fast.start > 0 and slow.start == 0  # the KV-cache suffix is in use
    if positions == "last":
        assert fast.start == store.encoded["input_ids"].shape[1] - 1
    ivs = build_subspace_interventions(site, {"POLARITY": 4}, 32, seed=3)
    rows = torch.arange(24)
    a, b = fast.run(rows, ivs), slow.run(rows, ivs)
    # the plain engine: source runs from the inputs, positions per example from the collator
    batch = data.collate(range(24), positions=positions)
    iv = sl.SubspaceInterchange(site, size=4, width=32, init=ivs[0].R.detach(), source=batch.sources["POLARITY"])
    out = lab.run(batch.base, [iv], positions=batch.positions, source_positions=batch.source_positions["POLARITY"])
    c = out.logits[:, -1, data.encoder.label_ids]
    torch.testing.assert_close(b, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    # gradients through the suffix run match the whole-sequence run
    grads = []
    for runner in (fast, slow):
        ivs[0].rotation.weight.grad = None
        torch.nn.functional.cross_entropy(runner.run(rows, ivs), runner.labels(rows)).backward()
        grads.append(ivs[0].rotation.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def smol(smollm):
    model, tok = smollm
    lab = sl.wrap(model, tok)
    before = snapshot(model)  # after wrapping, which freezes the parameters until unwrap
    yield lab, before
    lab.unwrap()


def test_smollm_labels_every_task_prompt(smol):
    lab, _ = smol
    task = tasks.sentiment()
    enc = task.encoder(lab.tokenizer)
    # every adjective (train and test) with four nouns
    settings = [s for s in task.prompts("train") + task.prompts("test") if s["NOUN"] in task.nouns[:4]]
    assert len(settings) == 4 * 44
    with torch.no_grad():
        out = lab.model(**enc.encode(settings), logits_to_keep=1)
    scores = enc.scores(out)
    want = torch.tensor([enc.label_index(task.polarity[s["ADJECTIVE"]]) for s in settings])
    assert (scores.argmax(-1) == want).float().mean().item() == 1.0
    # why the task compares the lower-case tokens though SmolLM2 answers capitalised: that pair is biased
    capital = sl.alignment.tasks.sentiment(label_tokens={"positive": " Positive", "negative": " Negative"}).encoder(lab.tokenizer)
    assert capital.labels == enc.labels and capital.scores(out).shape == scores.shape
    assert (capital.scores(out).argmax(-1) == want).float().mean().item() < 0.97


def test_smollm_search_two_layers(smol):
    lab, before = smol
    task = tasks.sentiment()
    res = search(lab, task, sites=["blocks.10.resid_post", "blocks.22.resid_post"], positions="last", sizes=[4],
                 n_train=48, n_test=48, epochs=3, batch_size=16, lr=1e-2, localist_samples=8, selection_size=32, eval_size=48)
    low, high = res.get("blocks.10.resid_post", "last", 4), res.get("blocks.22.resid_post", "last", 4)
    for r in (low, high):
        assert r.iia["POLARITY"].n == 48 and r.chance == 0.5
        assert r.random_init["POLARITY"].near_chance, str(res)
        assert r.localist_method.startswith("best of 8 sampled neuron subsets (sizes 4 of 576")
    # by layer 22 the polarity sits at the answer position in a 4-dimensional subspace
    assert high.full_vector["POLARITY"].value >= 0.9, str(res)
    assert high.iia["POLARITY"].value >= 0.9, str(res)
    # at layer 10 the answer position does not carry it yet: even the whole vector moves little
    assert low.full_vector["POLARITY"].value <= 0.75, str(res)
    assert low.iia["POLARITY"].value < high.iia["POLARITY"].value
    rows = res.rows()
    assert [(r["layer"], r["variable"]) for r in rows] == [(10, "POLARITY"), (22, "POLARITY")]
    fig = res.plot()
    assert fig.layout.title.text.startswith("Distributed alignment search: IIA over sites and sizes")
    assert {"DAS size 4", "random-init size 4", "localist size 4", "full vector (upper bound)"} <= {t.name for t in fig.data}
    # the figure holds the result's numbers: per layer, DAS and each control beside it, and the heatmap cells
    traces = {t.name: t for t in fig.data}
    assert list(traces["DAS size 4"].y) == [r["iia"] for r in rows]
    assert list(traces["random-init size 4"].y) == [r["random_init"] for r in rows]
    assert list(traces["localist size 4"].y) == [r["localist"] for r in rows]
    assert list(traces["full vector (upper bound)"].y) == [r["full_vector"] for r in rows]
    (heat,) = [t for t in fig.data if t.type == "heatmap"]
    assert [list(z) for z in heat.z] == [[r["iia"] for r in rows]] and list(heat.x) == ["L10 resid_post", "L22 resid_post"]
    assert high.subspaces["POLARITY"].basis.shape == (4, 576) and high.subspaces["POLARITY"].positions == [-1]
    assert_unchanged(lab.model, before, what="a search with controls")
