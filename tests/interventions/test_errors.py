"""Bad input (DESIGN.md's list): each raised before any compute, as a named
``SteerlabError`` whose message names the bad value and what was expected.

"Before compute" is measured: a forward pre-hook on the model's root counts
forwards during the call and must see none. After the call the model is
exactly as before (hook registries, flags, tensors) and its outputs are
bit-identical to an untouched copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import steerlab as sl
from steerlab.interventions import fileformat
from tests.archs import tiny_model
from tests.reliability import Scenario, assert_unchanged, one_thread_fixture, plain_logits, snapshot

_one_thread = one_thread_fixture()
SITE = "blocks.1.resid_post"


def _tokenizer(pad: bool):
    """A small word-level tokenizer over the tiny models' vocabulary (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[BOS]", "[EOS]"] + [f"w{i}" for i in range(3, 90)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]" if pad else None)
    assert (tok.pad_token is None) != pad
    return tok


_SC: dict = {}


def scenario(tokenizer: str = "none") -> Scenario:
    if tokenizer not in _SC:
        tok = {"none": None, "pad": _tokenizer(True), "nopad": _tokenizer(False)}[tokenizer]
        _SC[tokenizer] = Scenario.of(tiny_model("llama"), tok)
    return _SC[tokenizer]


def right_padded(sc: Scenario) -> dict:
    ids, mask = sc.base["input_ids"].clone(), torch.ones_like(sc.base["attention_mask"])
    mask[-1, -2:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _src(sc, batch=2, seq=7):
    g = torch.Generator().manual_seed(11)
    return {"input_ids": torch.randint(3, 90, (batch, seq), generator=g)}


def _graph_with(sc, ivs, source=None):
    g = sl.Graph()
    s = g.run(source or sc.source, name="clean")
    for iv in ivs:
        if iv.sourced and iv.source is None:
            iv.source = s
    g.run(sc.base, [sl.Interchange("blocks.0.resid_post", positions=[-1], source=s), *ivs], name="patched")
    return g


def _attach_twice(sc):
    att = sc.lab.attach(sl.Add(SITE, torch.ones(32)))
    try:
        att.attach()
    finally:
        att.detach()


def _detach_twice(sc):
    att = sc.lab.attach(sl.Add(SITE, torch.ones(32)))
    att.detach()
    att.detach()


def _attached_per_call_without_positions(sc):
    with sc.lab.attach(sl.Add(SITE, torch.ones(32), positions="per-call")):
        sc.model(**sc.base)


def _other_model_file(sc, tmp):
    other = sl.wrap(tiny_model("mistral"))
    other.save(tmp / "m", [sl.Add(SITE, torch.ones(32))])
    sc.lab.load_interventions(tmp / "m")


def _corrupt_file(sc, tmp):
    sc.lab.save(tmp / "c", [sl.Add(SITE, torch.ones(32))])
    w = fileformat.weights_path(tmp / "c")
    w.write_bytes(w.read_bytes()[:-7])
    sc.lab.load_interventions(tmp / "c")


def _cycle(sc):
    g = sl.Graph()
    a = g.run(sc.base, name="a")
    b = g.run(sc.source, [sl.Interchange(SITE, positions=[-1], source=a)], name="b")
    a.interventions.append(sl.Interchange(SITE, positions=[-1], source=b))
    sc.lab.execute(g)


def _foreign_run(sc):
    other = sl.Graph()
    r = other.run(sc.source)
    sl.Graph().run(sc.base, [sl.Interchange(SITE, source=r)])


def _prefix_mismatch(sc):
    prefix = sl.Prefix(1, torch.zeros(2, 5, 32))  # what lab.prefix(other inputs, 1) holds
    sc.lab.run(sc.base, [sl.Add(SITE, torch.ones(32))], prefix=prefix)


@dataclass
class Case:
    name: str
    call: Callable
    error: type[Exception]
    phrases: tuple[str, ...]
    tokenizer: str = "none"
    tmp: bool = False


C = Case
CASES = [
    # unknown sites, in every call type (the source runs of a graph must not start either)
    C("unknown_site_run", lambda sc: sc.lab.run(sc.base, [sl.Add("blocks.1.resid_pots", torch.ones(32))]),
      sl.SiteNotFound, ("unknown site 'blocks.1.resid_pots'", "did you mean 'blocks.1.resid_post'")),
    C("unknown_site_execute", lambda sc: sc.lab.execute(_graph_with(sc, [sl.Add("blocks.1.mlp.outt", torch.ones(32))])),
      sl.SiteNotFound, ("unknown site 'blocks.1.mlp.outt'", "'blocks.1.mlp.out'")),
    C("unknown_site_generate", lambda sc: sc.lab.generate(sc.base, [sl.Interchange(SITE, positions=[-1], source=sc.source),
                                                                   sl.Add("blocks.2.attn.zz", torch.ones(8))], max_new_tokens=2),
      sl.SiteNotFound, ("unknown site 'blocks.2.attn.zz'", "'blocks.2.attn.z'")),
    C("unknown_site_attach", lambda sc: sc.lab.attach(sl.Add("blocks.1.resid_mids", torch.ones(32))), sl.SiteNotFound, ("'blocks.1.resid_mid'",)),
    C("unknown_site_collect", lambda sc: sc.lab.collect(sc.base, ["blocks.0.resid_post", "blocks.1.resid_psot"]), sl.SiteNotFound,
      ("unknown site 'blocks.1.resid_psot'",)),
    C("layer_beyond_model", lambda sc: sc.lab.run(sc.base, [sl.Zero("blocks.7.resid_post")]), sl.SiteNotFound, ("'blocks.7.resid_post'", "3")),
    # positions beyond a sequence (example 1 has 5 real tokens), both padding sides
    C("position_beyond_left_padded", lambda sc: sc.lab.run(sc.base, [sl.Zero(SITE, positions=[0, 5])]), sl.PositionOutOfRange,
      ("positions=5 is beyond example 1, which has 5 real tokens", "valid: -5..4")),
    C("position_beyond_right_padded", lambda sc: sc.lab.run(right_padded(sc), [sl.Zero(SITE, positions=-6)]), sl.PositionOutOfRange,
      ("positions=-6 is beyond example 1, which has 5 real tokens",)),
    C("per_example_positions_beyond", lambda sc: sc.lab.run(sc.base, [sl.Zero(SITE, positions="per-call")], positions=torch.tensor([[0, 6], [1, 5]])),
      sl.PositionOutOfRange, ("positions[1, 1] = 5 but example 1 has 5 real tokens", "-1 for an empty slot")),
    C("per_example_positions_beyond_right_padded", lambda sc: sc.lab.run(right_padded(sc), [sl.Zero(SITE)], positions=torch.tensor([[6], [5]])),
      sl.PositionOutOfRange, ("positions[1, 0] = 5 but example 1 has 5 real tokens",)),
    C("per_example_positions_rows", lambda sc: sc.lab.run(sc.base, [sl.Zero(SITE)], positions=torch.tensor([[0], [1], [2]])),
      sl.UnitError, ("has 3 rows but the batch has 2 examples", "LongTensor[batch, k]")),
    C("source_position_beyond", lambda sc: sc.lab.run(sc.base, [sl.Interchange(SITE, positions=[-1], source_positions=[9], source=sc.source)]),
      sl.PositionOutOfRange, ("source_positions=9 is beyond example 0, which has 7 real tokens",)),
    C("position_beyond_generate", lambda sc: sc.lab.generate(sc.base, [sl.Add(SITE, torch.ones(32), positions=[6])], max_new_tokens=2),
      sl.PositionOutOfRange, ("positions=6 is beyond example 1",)),
    C("position_beyond_attached", lambda sc: sc.lab.attach(sl.Add(SITE, torch.ones(32), positions=[6])) and sc.model(**sc.base),
      sl.PositionOutOfRange, ("positions=6 is beyond example 1",)),
    # batches
    C("source_batch_mismatch", lambda sc: sc.lab.run(sc.base, [sl.Interchange(SITE, positions=[-1], source=_src(sc, batch=3))]),
      sl.BatchMismatch, ("has batch 3 but the base has 2", "equal batches")),
    C("source_batch_mismatch_generate", lambda sc: sc.lab.generate(sc.base, [sl.Interchange(SITE, positions=[-1], source=_src(sc, batch=3))],
                                                                   max_new_tokens=2), sl.BatchMismatch, ("batch 3", "2")),
    C("source_value_batch_mismatch", lambda sc: sc.lab.run(sc.base, [sl.Interchange(SITE, positions=[-1], source=sl.SourceValue(torch.zeros(3, 1, 32)))]),
      sl.BatchMismatch, ("has batch 3; expected 2 or 1",)),
    C("source_value_shape", lambda sc: sc.lab.run(sc.base, [sl.Interchange(SITE, positions=[-1], source=sl.SourceValue(torch.zeros(2, 1, 31)))]),
      sl.ShapeMismatch, ("has shape (2, 1, 31); expected [batch, 1, 32]",)),
    C("attached_source_value_batch", lambda sc: sc.lab.attach(sl.Interchange(SITE, positions=[-1], source=sl.SourceValue(torch.zeros(3, 1, 32))))
      and sc.model(**sc.base), sl.BatchMismatch, ("the SourceValue of Interchange at 'blocks.1.resid_post' has batch 3 but this forward has 2",)),
    C("attached_source_value_shape", lambda sc: sc.lab.attach(sl.SubspaceInterchange(SITE, size=2, positions=[-1], source=sl.SourceValue(torch.zeros(2, 2, 32)))),
      sl.ShapeMismatch, ("has shape (2, 2, 32); expected [batch, 1, 32]",)),
    C("attached_source_value_heads", lambda sc: sc.lab.attach(sl.Interchange("blocks.1.attn.z", heads=[0, 1], positions=[-1], source=sl.SourceValue(torch.zeros(2, 1, 4, 8)))),
      sl.ShapeMismatch, ("has shape (2, 1, 4, 8); expected [batch, 1, 2, 8]",)),
    C("all_positions_lengths_differ", lambda sc: sc.lab.run(sc.base, [sl.Interchange(SITE, source=_src(sc, seq=5))]),
      sl.ShapeMismatch, ("base length 7 and source length 5 differ", "give positions=")),
    C("position_counts_differ", lambda sc: sc.lab.run(sc.base, [sl.Interchange(SITE, positions=[0, 1], source_positions=[0], source=sc.source)]),
      sl.ShapeMismatch, ("selects 2 base positions but 1 source positions",)),
    # subspaces
    C("subspace_larger_than_site", lambda sc: sc.lab.run(sc.base, [sl.SubspaceInterchange(SITE, size=40, source=sc.source)]),
      sl.SubspaceSizeError, ("a subspace of size 40 does not fit site 'blocks.1.resid_post' of width 32", "expected size <= 32")),
    C("subspace_init_wrong_shape", lambda sc: sc.lab.run(sc.base, [sl.SubspaceInterchange(SITE, size=3, init=torch.eye(31)[:3], source=sc.source)]),
      sl.SubspaceSizeError, ("init has shape (3, 31); expected [rank=3, width=32]",)),
    C("subspace_size_zero", lambda sc: sl.SubspaceInterchange(SITE, size=0), sl.SubspaceSizeError, ("size=0: expected a positive int",)),
    C("subspace_built_for_another_width", lambda sc: sc.lab.run(sc.base, [sl.SubspaceInterchange("blocks.1.attn.z", heads=[0], size=2, width=32, source=sc.source)]),
      sl.ShapeMismatch, ("built for width 32", "'blocks.1.attn.z' has width 8")),
    # heads and dims
    C("head_out_of_range", lambda sc: sc.lab.run(sc.base, [sl.Zero("blocks.1.attn.z", heads=[1, 4])]), sl.UnitError,
      ("heads=[4] out of range at 'blocks.1.attn.z', which has 4 heads (0..3)",)),
    C("kv_head_out_of_range", lambda sc: sc.lab.run(sc.base, [sl.Zero("blocks.1.attn.k", heads=[2])]), sl.UnitError,
      ("heads=[2] out of range at 'blocks.1.attn.k', which has 2 heads (0..1)",)),
    C("heads_at_a_residual_site", lambda sc: sc.lab.run(sc.base, [sl.Zero(SITE, heads=[0])]), sl.UnitError, ("not a per-head site",)),
    C("dim_out_of_range", lambda sc: sc.lab.run(sc.base, [sl.Zero(SITE, dims=[0, 32, 40])]), sl.UnitError,
      ("dims=[32, 40] out of range at 'blocks.1.resid_post', whose width is 32 (0..31)",)),
    # files
    C("file_for_another_model", _other_model_file, sl.FingerprintMismatch, ("model_type: file 'mistral' vs model 'llama'",), tmp=True),
    C("corrupt_file", _corrupt_file, sl.FileFormatError, ("is truncated or was replaced",), tmp=True),
    # sources
    C("sourced_without_source_run", lambda sc: sc.lab.run(sc.base, [sl.Interchange(SITE, positions=[-1])]), sl.SourceError,
      ("Interchange at 'blocks.1.resid_post' in base needs a source",)),
    C("sourced_without_source_generate", lambda sc: sc.lab.generate(sc.base, [sl.SubspaceInterchange(SITE, size=2, positions=[-1])], max_new_tokens=2),
      sl.SourceError, ("SubspaceInterchange at 'blocks.1.resid_post' needs a source",)),
    C("sourced_without_source_attach", lambda sc: sc.lab.attach(sl.Interchange(SITE, positions=[-1])), sl.SourceError,
      ("Interchange at 'blocks.1.resid_post' needs a source", "SourceValue")),
    C("attach_with_a_per_call_source", lambda sc: sc.lab.attach(sl.Interchange(SITE, positions=[-1], source=sc.source)), sl.LifetimeError,
      ("reads from inputs; attached interventions take a precomputed SourceValue",)),
    C("source_on_a_sourceless_type", lambda sc: sl.Add(SITE, torch.ones(32), source=sc.source), sl.SourceError, ("Add takes no source",)),
    # per-call positions
    C("per_call_without_positions_run", lambda sc: sc.lab.run(sc.base, [sl.Add(SITE, torch.ones(32), positions="per-call")]), sl.UnitError,
      ("positions are given per call, and this call gave none", "pass positions=")),
    C("per_call_without_positions_attached", _attached_per_call_without_positions, sl.UnitError,
      ("given per call, and this call gave none", "intervention_positions=")),
    # lifetimes
    C("attach_twice", _attach_twice, sl.LifetimeError, ("already attached",)),
    C("detach_twice", _detach_twice, sl.LifetimeError, ("not attached",)),
    # text and tokenizers
    C("text_without_tokenizer_run", lambda sc: sc.lab.run("w5 w6 w7"), sl.DataError, ("text inputs need a tokenizer",)),
    C("text_without_tokenizer_generate", lambda sc: sc.lab.generate(["w5 w6"], max_new_tokens=2), sl.DataError, ("need a tokenizer",)),
    C("text_without_tokenizer_source", lambda sc: sc.lab.run(sc.base, [sl.Interchange(SITE, positions=[-1], source="w5 w6")]), sl.DataError,
      ("text inputs need a tokenizer",)),
    C("tokenizer_without_pad_run", lambda sc: sc.lab.run(["w5 w6", "w7"]), sl.DataError,
      ("the tokenizer has no pad token, so a batch of 2 texts cannot be padded", "tokenizer.pad_token"), tokenizer="nopad"),
    C("tokenizer_without_pad_generate", lambda sc: sc.lab.generate(["w5 w6", "w7"], max_new_tokens=2), sl.DataError,
      ("has no pad token", "tokenizer.pad_token"), tokenizer="nopad"),
    C("not_model_inputs", lambda sc: sc.lab.run(3.5), sl.DataError, ("cannot use float as model inputs",)),
    # graphs
    C("graph_cycle", _cycle, sl.GraphError, ("the run graph has a cycle: a -> b -> a",)),
    C("run_of_another_graph", _foreign_run, sl.GraphError, ("belongs to another graph",)),
    C("not_an_intervention", lambda sc: sc.lab.run(sc.base, ["blocks.1.resid_post"]), sl.NotAnIntervention, ("must be Intervention objects; got str",)),
    C("prefix_of_other_inputs", _prefix_mismatch, sl.ShapeMismatch, ("the prefix holds (2, 5) (batch, seq) but base has (2, 7)",)),
    C("bad_position_spec", lambda sc: sl.Zero(SITE, positions="f7+x"), sl.UnitError, ("positions='f7+x': expected a spec like 'f7+l7'",)),
    # flags: a truthy string must not read as True (bool("false") is True)
    C("flag_as_string_collect", lambda sc: sc.lab.run(sc.base, [sl.Collect(SITE, detach="false")]), sl.ConfigError,
      ("detach='false': expected True or False",)),
    C("flag_as_string_attach", lambda sc: sc.lab.attach(sl.Add(SITE, torch.ones(32)), decode="no"), sl.ConfigError,
      ("decode='no': expected True or False",)),
    C("flag_as_string_wrap", lambda sc: sl.wrap(sc.model, freeze="false"), sl.ConfigError, ("freeze='false': expected True or False",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_before_compute(case, tmp_path):
    sc = scenario(case.tokenizer)
    forwards = [0]
    before = snapshot(sc.model)
    handle = sc.model.register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    try:
        with pytest.raises(case.error) as info:
            case.call(sc, tmp_path) if case.tmp else case.call(sc)
    finally:
        handle.remove()
        for att in list(sc.lab.attachments):
            att.detach()
    assert isinstance(info.value, sl.SteerlabError)
    for phrase in case.phrases:
        assert phrase in str(info.value), f"{phrase!r} not in {str(info.value)!r}"
    assert forwards[0] == 0, f"{forwards[0]} forward(s) ran before the error"
    assert_unchanged(sc.model, before, what=case.name)
    assert torch.equal(plain_logits(sc.model, sc.base), sc.reference_logits())


def test_the_counter_counts():
    """The forward counter sees the forwards a valid call makes (so 0 above means something)."""
    sc = scenario()
    n = [0]
    h = sc.model.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    try:
        sc.lab.run(sc.base, [sl.Interchange(SITE, positions=[-1], source=sc.source)])
    finally:
        h.remove()
    assert n[0] == 2


def test_errors_are_also_the_builtin_exceptions():
    assert issubclass(sl.SiteNotFound, KeyError) and issubclass(sl.PositionOutOfRange, IndexError)
    assert issubclass(sl.ShapeMismatch, ValueError) and issubclass(sl.LifetimeError, RuntimeError)
    assert issubclass(sl.UnknownInterventionType, sl.FileFormatError) and issubclass(sl.FingerprintMismatch, sl.FileFormatError)
    assert str(sl.SiteNotFound("x", ["y"])) == "unknown site 'x' (`lab.sites` lists every site of this model)"  # not KeyError's quoted repr


def test_not_an_intervention_is_one_named_error():
    """Every place that takes interventions refuses something else with the same error (a TypeError)."""
    from steerlab import reft

    sc = scenario()
    not_one = "blocks.1.resid_post"
    calls = {
        "run": lambda: sc.lab.run(sc.base, [not_one]),
        "graph": lambda: sl.Graph().run(sc.base, [not_one]),
        "attach": lambda: sc.lab.attach([not_one]),
        "prepare": lambda: sc.lab.prepare([not_one]),
        "place": lambda: sc.lab.facts.place(not_one),
        "generate": lambda: sc.lab.generate(sc.base, [not_one], max_new_tokens=1),
        "get_reft_model": lambda: reft.get_reft_model(sc.model, [not_one], stack=True),
    }
    for name, call in calls.items():
        with pytest.raises(sl.NotAnIntervention, match="must be Intervention objects; got str") as info:
            call()
        assert isinstance(info.value, TypeError), name
    assert not sc.lab.attachments
