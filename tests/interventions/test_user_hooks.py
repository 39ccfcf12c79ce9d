"""RELIABILITY row 2: the user's own hooks.

K hooks of every kind (forward pre/post, with kwargs, prepended, always-called,
full backward, state-dict; on the root, on a block, on modules steerlab hooks
too) are all still registered and all still firing after every kind of call,
and they fire during steerlab's calls as well. pyvene, for contrast, removes
them (reproduced below).
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from tests.archs import tiny_inputs, tiny_model
from tests.reliability import CALL_TYPES, NO_FAULT, Scenario, UserHooks, check_user_hooks, one_thread_fixture

_one_thread = one_thread_fixture()

# forward hooks a call must fire (a collect stops early, so the root's own forward hook may not run)
_DURING = {"root_pre", "root_pre_kw_prepend", "block_pre", "block_fwd_always", "block_fwd_kw", "site0_pre", "site0_fwd"}


def _user_hooked(arch: str) -> tuple[Scenario, UserHooks]:
    model = tiny_model(arch)
    hooks = UserHooks()
    sc = Scenario.of(model)
    # on the root, a block, and on modules steerlab hooks in these calls (mlp of block 1, attention output)
    hooks.install(model, sc.lab.layers, [sc.lab.resolve(sc.site(1, "mlp.out")).module, sc.lab.resolve(sc.site(1, "attn.z")).module])
    return sc, hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("call", ["run", "execute", "collect", "generate", "attached_step", "das_step"])
def test_user_hooks_survive_every_call(arch, call):
    sc, hooks = _user_hooked(arch)
    assert hooks.k >= 10
    mark = hooks.mark()
    CALL_TYPES[call].fn(sc, NO_FAULT)
    fired = set(hooks.fired_since(mark))
    assert _DURING <= fired, f"user hooks silent during {call}: {sorted(_DURING - fired)}"
    if call in ("attached_step", "das_step"):
        assert "block_full_bwd" in fired  # the training step's backward reached the user's backward hook
    check_user_hooks(hooks, sc.model, sc.base)  # K of K registered and firing afterwards
    sc.lab.unwrap()
    check_user_hooks(hooks, sc.model, sc.base)  # and after unwrapping


def test_user_hooks_survive_a_sequence_of_all_calls_on_smollm(smollm):
    model, tok = smollm
    sc = Scenario.of(model, tok)
    hooks = UserHooks().install(model, sc.lab.layers, [sc.lab.resolve(sc.site(1, "mlp.out")).module])
    try:
        for name in ("run", "execute", "collect", "generate", "attached_step", "das_step"):
            mark = hooks.mark()
            CALL_TYPES[name].fn(sc, NO_FAULT)
            assert {"root_pre", "block_pre", "site0_fwd"} <= set(hooks.fired_since(mark)), name
        check_user_hooks(hooks, model, sc.base)
        assert hooks.k == len(hooks.registered()) >= 10
    finally:
        hooks.remove()
        sc.lab.unwrap()


def test_user_hook_sees_the_intervened_value_and_steerlab_keeps_it():
    """A user's forward hook on a module steerlab edits is called with the edited value when
    registered after steerlab's (it runs later), and the user's return value is respected."""
    model = tiny_model("llama")
    lab = sl.wrap(model)
    x = tiny_inputs("llama")
    seen = {}
    mlp = lab.resolve("blocks.1.mlp.out").module
    with lab.attach(sl.Zero("blocks.1.mlp.out")):
        h = mlp.register_forward_hook(lambda m, a, out: seen.setdefault("out", out.clone()))
        try:
            with torch.no_grad():
                model(**x)
        finally:
            h.remove()
    assert torch.equal(seen["out"], torch.zeros_like(seen["out"]))


def test_pyvene_removes_the_users_hooks():
    """The contrast RELIABILITY.md cites: after one pyvene call a user's forward hook is gone."""
    import pyvene as pv

    model = tiny_model("gpt2")
    count = [0]
    model.transformer.h[1].register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    cfg = pv.IntervenableConfig([{"layer": 1, "component": "block_output", "intervention_type": pv.VanillaIntervention}])
    pvm = pv.IntervenableModel(cfg, model)
    x = tiny_inputs("gpt2")
    pvm(x, [x], unit_locations={"sources->base": ([[[0]] * 2], [[[0]] * 2])})
    model(**x)
    assert len(model.transformer.h[1]._forward_hooks) == 0 and count[0] == 0
    # steerlab on the same model and the same kind of call keeps such a hook, and it keeps firing
    model2 = tiny_model("gpt2")
    ours = [0]
    model2.transformer.h[1].register_forward_hook(lambda *a: ours.__setitem__(0, ours[0] + 1))
    sl.wrap(model2).run(x, [sl.Interchange("blocks.1.resid_post", positions=[0], source=x)])
    during = ours[0]
    model2(**x)
    assert len(model2.transformer.h[1]._forward_hooks) == 1 and during >= 2 and ours[0] == during + 1
