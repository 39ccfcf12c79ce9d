"""ReftModel: configuration, positions, attach/detach, save and load, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from steerlab import reft
from steerlab.interventions import fileformat
from steerlab.interventions.errors import (
    ConfigError, FileFormatError, FingerprintMismatch, PositionOutOfRange, SiteNotFound, SubspaceSizeError, UnitError,
)
from tests.archs import tiny_model
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine

LL = "llama"


def _hooks(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _grads(model):
    return [p.requires_grad for p in model.parameters()]


def _batch(seed=1, b=3, t=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _randomise(rm, seed=0):
    """Move every trainable parameter off its initial value (a round trip must be able to fail)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))


def test_config_places_interventions_and_counts_parameters(capsys):
    m = tiny_model(LL)
    rm = reft.get_reft_model(m, reft.ReftConfig(layers="all", rank=4, positions="f2+l2", tied=False))
    assert [iv.site for iv in rm.interventions] == [f"blocks.{i}.resid_post" for i in (0, 1, 2)] * 2
    assert rm.groups == [[0, 1, 2], [3, 4, 5]]
    assert [iv.positions.to_json() for iv in rm.interventions] == ["f2"] * 3 + ["l2"] * 3
    per = 4 * 32 + 4 + 32 * 4  # W, b, and R's parameter
    trainable, base = rm.get_nb_trainable_parameters()
    assert trainable == 6 * per and base == sum(p.numel() for p in m.parameters())
    rm.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"trainable params: {6 * per:,d}" in out and f"trainable%: {100 * 6 * per / base:.4f}" in out
    assert sum(p.requires_grad for p in m.parameters()) == 0


def test_bad_configuration_is_refused_and_the_model_left_as_found():
    m = tiny_model(LL)
    hooks, grads = _hooks(m), _grads(m)
    with pytest.raises(SiteNotFound, match=r"layers=\[7\] are not in this model, which has 3 layers \(0..2\)"):
        reft.get_reft_model(m, reft.ReftConfig(layers=[0, 7]))
    with pytest.raises(SubspaceSizeError, match="rank=40 does not fit site 'blocks.0.resid_post' of width 32"):
        reft.get_reft_model(m, reft.ReftConfig(layers=[0], rank=40))
    with pytest.raises(ConfigError, match="modules_to_save names 'classifier', which this model lacks"):
        reft.get_reft_model(m, reft.ReftConfig(layers=[0], modules_to_save=["classifier"]))
    with pytest.raises(SiteNotFound, match="unknown site 'blocks.0.nope'"):
        reft.get_reft_model(m, reft.ReftConfig(layers=[0], site="nope"))
    assert _hooks(m) == hooks and _grads(m) == grads
    with pytest.raises(ConfigError, match="intervention='lora': expected one of"):
        reft.ReftConfig(intervention="lora")
    with pytest.raises(ConfigError, match="tied=False needs a spec like 'f7\\+l7'"):
        reft.ReftConfig(positions="l1", tied=False)
    with pytest.raises(ConfigError, match="act_fn='relu' is not an argument of ConsReFT"):
        reft.get_reft_model(m, reft.ReftConfig(layers=[0], intervention="consreft", act_fn="relu"))
    assert _hooks(m) == hooks and _grads(m) == grads


def _hand_steered(model, iv, layer, padded_idx, inputs):
    """The LoReFT edit applied by a hand-written hook at explicit padded indices."""
    R, W, b = iv.R.detach(), iv.weight.detach(), iv.bias.detach()

    def hook(module, args, out):
        h = out.clone()
        for i, row in enumerate(padded_idx):
            for j in row:
                if j >= 0:
                    x = h[i, j]
                    h[i, j] = x + (W @ x + b - R @ x) @ R
        return h

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("side", ["left", "right"])
def test_per_example_positions_hit_the_real_tokens(side):
    m = tiny_model(LL)
    rm = reft.get_reft_model(m, reft.ReftConfig(layers=[1], rank=4, positions="f2+l2"))
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    pad = slice(0, 3) if side == "left" else slice(5, 8)
    mask[1, pad] = 0
    ids[1, pad] = 0
    pos = reft.prompt_positions([8, 5], "f2+l2")  # real-token indices: [0,1,6,7] and [0,1,3,4]
    assert pos[:, 0].tolist() == [[0, 1, 6, 7], [0, 1, 3, 4]]
    padded = [[0, 1, 6, 7], [3, 4, 6, 7]] if side == "left" else [[0, 1, 6, 7], [0, 1, 3, 4]]
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        ours = rm(**inputs, intervention_positions=pos).logits
    with rm.disabled():
        expected = _hand_steered(m, rm.interventions[0], 1, padded, inputs)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)
    with rm.disabled(), torch.no_grad():
        base = m(**inputs).logits
    assert (ours[real] - base[real]).abs().max() > 1e-3


def test_short_prompt_slots_are_left_empty_never_padding():
    pos = reft.prompt_positions([3, 10], "f3+l3")
    assert pos[:, 0].tolist() == [[0, 1, 2, -1, -1, -1], [0, 1, 2, 7, 8, 9]]
    untied = reft.prompt_positions([3, 10], "f3+l3", tied=False)
    assert untied.tolist() == [[[0, 1, 2], [-1, -1, -1]], [[0, 1, 2], [7, 8, 9]]]
    with pytest.raises(PositionOutOfRange, match="position 5 is beyond the prompt of example 0, which has 3 tokens"):
        reft.prompt_positions([3, 10], 5)


def test_wrong_positions_shape_is_a_named_error():
    rm = reft.get_reft_model(tiny_model(LL), reft.ReftConfig(layers=[0], positions="f1+l1", tied=False))
    with pytest.raises(UnitError, match=r"intervention_positions has shape \(3, 2\); expected \[batch, 2, k\]"):
        rm(**_batch(), intervention_positions=torch.zeros(3, 2, dtype=torch.long))


def test_disable_and_unwrap_restore_the_base_model_exactly():
    m = tiny_model(LL)
    user_calls = []
    user = m.model.layers[0].register_forward_hook(lambda *a: user_calls.append(1))
    hooks, grads = _hooks(m), _grads(m)
    with torch.no_grad():
        base = m(**_batch()).logits
    rm = reft.get_reft_model(m, reft.ReftConfig(layers=[0, 2], rank=2, positions="l2"))
    with torch.no_grad():
        steered = rm(**_batch()).logits
        assert (steered - base).abs().max() > 1e-3
        with rm.disabled():
            assert torch.equal(m(**_batch()).logits, base)
            assert _hooks(m) == hooks
        assert torch.equal(rm(**_batch()).logits, steered)
    with pytest.raises(Exception, match="disabled or unwrapped"):
        rm.disable(), rm(**_batch())
    rm.enable()
    assert rm.unwrap() is m
    assert _hooks(m) == hooks and _grads(m) == grads
    with torch.no_grad():
        assert torch.equal(m(**_batch()).logits, base)
    assert user_calls  # the user's own hook kept firing throughout
    user.remove()


def test_train_and_eval_reach_intervention_dropout():
    rm = reft.get_reft_model(tiny_model(LL), reft.ReftConfig(layers=[1], rank=4, positions="l3", dropout=0.5))
    rm.train()
    assert all(iv.training for iv in rm.interventions)
    with torch.no_grad():
        a, b = rm(**_batch()).logits, rm(**_batch()).logits
    assert not torch.equal(a, b)  # dropout active
    rm.eval()
    assert not any(iv.training for iv in rm.interventions)
    with torch.no_grad():
        assert torch.equal(rm(**_batch()).logits, rm(**_batch()).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["loreft", "direft", "noreft", "consreft", "lobireft"])
def test_save_load_round_trip_is_exact(tmp_path, kind, dtype):
    m = tiny_model(LL, dtype=dtype)
    cfg = reft.ReftConfig(layers=[0, 2], rank=3, positions="f1+l2", tied=False, intervention=kind, dropout=0.1,
                          act_fn="gelu" if kind in ("loreft", "direft", "noreft") else None)
    rm = reft.get_reft_model(m, cfg)
    _randomise(rm)
    rm.eval()
    pos = reft.prompt_positions([9, 9, 9], "f1+l2", tied=False)
    with torch.no_grad():
        before = rm(**_batch(), intervention_positions=pos).logits
        with rm.disabled():
            assert not torch.equal(m(**_batch()).logits, before)
    rm.save_pretrained(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "steerlab.json").read_text())
    assert meta["kind"] == "reft" and meta["fingerprint"]["width"] == 32
    assert meta["config"]["interventions"][0]["arguments"]["dropout"] == 0.1
    rm.unwrap()
    fresh = tiny_model(LL, dtype=dtype)
    loaded = reft.ReftModel.from_pretrained(tmp_path / "out", fresh, device="cpu")
    loaded.eval()
    assert loaded.reft_config == cfg and loaded.groups == rm.groups
    for a, b in zip(rm.interventions, loaded.interventions):
        for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False, as in PEFT
    with torch.no_grad():
        assert torch.equal(loaded(**_batch(), intervention_positions=pos).logits, before)
    for name, p in loaded.interventions[0].named_parameters():
        assert p.dtype == (torch.float32 if name.startswith("rotation") else dtype), name  # W, b follow the model; R is fp32


def test_modules_to_save_train_save_and_restore(tmp_path):
    cfg = T.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=96, num_labels=2)
    torch.manual_seed(0)
    m = T.BertForSequenceClassification(cfg).eval()
    original = m.classifier.weight.detach().clone()
    rm = reft.get_reft_model(m, reft.ReftConfig(layers=[1], rank=2, positions="f1", modules_to_save=["classifier"],
                                                task_type=reft.TaskType.SEQ_CLS))
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert {"model.classifier.weight", "model.classifier.bias"} <= trainable
    assert not any("encoder" in n for n in trainable if n.startswith("model."))
    _randomise(rm)
    rm.save_pretrained(tmp_path / "c")
    with torch.no_grad():
        out = rm(**_batch()).logits
    trained_head = m.classifier.weight.detach().clone()
    rm.unwrap()
    assert torch.equal(m.classifier.weight, original) and m.classifier.weight.requires_grad  # as found (a fresh model trains)
    loaded = reft.ReftModel.from_pretrained(tmp_path / "c", m)
    assert torch.equal(m.classifier.weight, trained_head)
    with torch.no_grad():
        assert torch.equal(loaded(**_batch()).logits, out)


def test_load_weights_in_place_keeps_parameter_identity(tmp_path):
    rm = reft.get_reft_model(tiny_model(LL), reft.ReftConfig(layers=[1], rank=2))
    rm.save_pretrained(tmp_path / "a")
    params = [p for p in rm.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    _randomise(rm)
    rm.load_weights(tmp_path / "a")
    assert [p for p in rm.parameters() if p.requires_grad] == params
    assert all(torch.equal(p, s) for p, s in zip(params, saved))
    # a full state dict gathered by a sharding wrapper (FSDP) saves the same tensors
    rm.save_pretrained(tmp_path / "b", state_dict={k: v.clone() for k, v in rm.state_dict().items()})
    assert fileformat.weights_path(tmp_path / "a").read_bytes() == fileformat.weights_path(tmp_path / "b").read_bytes()
    with pytest.raises(FileFormatError, match="the gathered state dict lacks"):
        rm.save_pretrained(tmp_path / "c", state_dict={})
    other = reft.get_reft_model(tiny_model(LL), reft.ReftConfig(layers=[2], rank=2))
    with pytest.raises(FileFormatError, match="holds other interventions than this ReftModel"):
        other.load_weights(tmp_path / "a")


@pytest.mark.parametrize("change", ["width", "layers", "vocab"])
def test_checkpoint_for_another_model_is_refused(tmp_path, change):
    rm = reft.get_reft_model(tiny_model(LL), reft.ReftConfig(layers=[0], rank=2))
    rm.save_pretrained(tmp_path / "r")
    kw = {"width": dict(hidden_size=48, intermediate_size=64), "layers": dict(num_hidden_layers=2), "vocab": dict(vocab_size=80)}[change]
    base = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    other = T.LlamaForCausalLM(T.LlamaConfig(**{**base, **kw})).eval()
    hooks, grads = _hooks(other), _grads(other)
    word = {"width": "width: file 32 vs model 48", "layers": "n_layers: file 3 vs model 2", "vocab": "vocab_size: file 96 vs model 80"}[change]
    with pytest.raises(FingerprintMismatch, match=f"was saved for another model .*{word}"):
        reft.ReftModel.from_pretrained(tmp_path / "r", other)
    assert _hooks(other) == hooks and _grads(other) == grads


def test_corrupt_and_foreign_files_are_rejected(tmp_path):
    rm = reft.get_reft_model(tiny_model(LL), reft.ReftConfig(layers=[0], rank=2))
    good = tmp_path / "good"
    rm.save_pretrained(good)
    m = tiny_model(LL)
    hooks, grads = _hooks(m), _grads(m)

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    def meta_edit(fn):
        def edit(d):
            meta = json.loads((d / "steerlab.json").read_text())
            fn(meta)
            (d / "steerlab.json").write_text(json.dumps(meta))
        return edit

    cases = {
        "truncated": (lambda d: fileformat.weights_path(d).write_bytes(fileformat.weights_path(d).read_bytes()[:100]), "truncated"),
        "garbage_json": (lambda d: (d / "steerlab.json").write_text("{not json"), "is not valid JSON"),
        "pickle_only": (lambda d: [fileformat.weights_path(d).unlink(), (d / "steerlab.json").unlink(), (d / "adapter_model.bin").write_bytes(b"\x80\x04")],
                        "never loads"),
        "unknown_type": (meta_edit(lambda m: m["config"]["interventions"][0].update(type="os.system")), "not a ReFT type"),
        "other_kind": (meta_edit(lambda m: m.update(kind="graph")), "expected 'reft'"),
        "wrong_shape": (meta_edit(lambda m: m["tensors"]["0.weight"].update(shape=[3, 32])), "but steerlab.json says"),
        "missing_tensor": (meta_edit(lambda m: m["tensors"].pop("0.bias")), "extra tensors \\['0.bias'\\]"),
        "wrong_width": (meta_edit(lambda m: m["config"]["interventions"][0].update(width=16)), "width 16, but its slice of 'blocks.0.resid_post'"),
        "newer_version": (meta_edit(lambda m: m.update(version=99)), "made by a newer steerlab"),
    }
    for name, (edit, message) in cases.items():
        d = variant(name, edit)
        with pytest.raises(FileFormatError, match=message):
            reft.ReftModel.from_pretrained(d, m)
        assert _hooks(m) == hooks and _grads(m) == grads, name


@pytest.mark.parametrize("make, phrase", [
    (lambda: reft.LoReFT("blocks.0.resid_post", rank=2, train_rotation="false"), "train_rotation='false'"),
    (lambda: reft.ConsReFT("blocks.0.resid_post", rank=2, train_rotation="no"), "train_rotation='no'"),
    (lambda: reft.LobiReFT("blocks.0.resid_post", rank=2, train_rotation=0), "train_rotation=0"),
    (lambda: reft.DiReFT("blocks.0.resid_post", rank=2, orthogonal="false"), "orthogonal='false'"),
])
def test_flags_given_as_strings_are_refused(make, phrase):
    """``bool("false")`` is True: a flag that is not a bool is a named error, not a silent True."""
    with pytest.raises(ConfigError, match=f"{phrase}: expected True or False"):
        make()


def test_reft_model_flags_given_as_strings_are_refused(tmp_path):
    model = tiny_model(LL)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[0], rank=2, positions="l1"))
    hooks = _hooks(model)
    with pytest.raises(ConfigError, match="decode='false': expected True or False"):
        with rm.using(torch.tensor([[[3]], [[2]]]), decode="false"):
            pass
    with pytest.raises(ConfigError, match="decode='yes': expected True or False"):
        rm.generate(_batch(b=2, t=4), decode="yes", max_new_tokens=2)
    assert _hooks(model) == hooks
    rm.save_pretrained(tmp_path / "r")
    rm.unwrap()
    with pytest.raises(ConfigError, match="is_trainable='false': expected True or False"):
        reft.ReftModel.from_pretrained(tmp_path / "r", model, is_trainable="false")
