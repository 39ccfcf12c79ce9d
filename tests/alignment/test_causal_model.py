"""CausalModel: construction checks, running and interchange against hand computation, bounded sampling."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from steerlab.alignment import CausalModel
from steerlab.interventions.errors import CausalModelError

E = (0, 1, 2)


def same(a, b):
    return a == b


def equality_model(**kw) -> CausalModel:
    values = {"W": E, "X": E, "Y": E, "Z": E, "WX": (True, False), "YZ": (True, False), "O": (True, False)}
    parents = {"WX": ["W", "X"], "YZ": ["Y", "Z"], "O": ["WX", "YZ"]}
    return CausalModel(values, parents, {"WX": same, "YZ": same, "O": same}, **kw)


def test_structure_is_derived():
    cm = equality_model()
    assert cm.inputs == ("W", "X", "Y", "Z")
    assert cm.outputs == ("O",)
    assert cm.variables.index("WX") < cm.variables.index("O") and cm.variables.index("YZ") < cm.variables.index("O")
    assert cm.descendants("W") == ("WX", "O")
    assert cm.children["WX"] == ("O",)


def test_run_matches_the_task_rule_on_every_input():
    cm = equality_model()
    for w, x, y, z in itertools.product(E, repeat=4):
        s = cm.run({"W": w, "X": x, "Y": y, "Z": z})
        assert s["WX"] == (w == x) and s["YZ"] == (y == z)
        assert s["O"] == ((w == x) == (y == z))


def test_interchange_takes_the_variable_from_the_source_and_recomputes_descendants():
    cm = equality_model()
    rng = random.Random(0)
    for _ in range(200):
        base = {v: rng.choice(E) for v in "WXYZ"}
        src1 = {v: rng.choice(E) for v in "WXYZ"}
        src2 = {v: rng.choice(E) for v in "WXYZ"}
        s = cm.interchange(base, {"WX": src1})
        assert s["WX"] == (src1["W"] == src1["X"])
        assert s["YZ"] == (base["Y"] == base["Z"])
        assert s["O"] == (s["WX"] == s["YZ"])
        assert s["W"] == base["W"]  # ancestors keep the base's values
        both = cm.interchange(base, {"WX": src1, "YZ": src2})
        assert both["O"] == ((src1["W"] == src1["X"]) == (src2["Y"] == src2["Z"]))
        # interchanging an input variable is allowed and acts like a changed input
        assert cm.interchange(base, {"W": src1})["WX"] == (src1["W"] == base["X"])


def test_intervene_fixes_values():
    cm = equality_model()
    s = cm.intervene({"W": 0, "X": 1, "Y": 2, "Z": 2}, {"WX": True})
    assert s["WX"] is True and s["O"] is True
    with pytest.raises(CausalModelError, match=r"cannot set 'WX' to 3; its value set is \[True, False\]"):
        cm.intervene({"W": 0, "X": 1, "Y": 2, "Z": 2}, {"WX": 3})


def test_cycle_is_named():
    with pytest.raises(CausalModelError, match=r"the causal model has a cycle: A -> B -> C -> A \(each arrow: parent -> child\)"):
        CausalModel({"A": [0], "B": [0], "C": [0]}, {"A": ["C"], "B": ["A"], "C": ["B"]},
                    {"A": lambda c: 0, "B": lambda a: 0, "C": lambda b: 0})


def test_self_loop_is_a_cycle():
    with pytest.raises(CausalModelError, match=r"cycle: A -> A"):
        CausalModel({"A": [0]}, {"A": ["A"]}, {"A": lambda a: 0})


def test_unknown_parent():
    with pytest.raises(CausalModelError, match=r"variable 'O' has unknown parents \['Q'\]; variables: \['A', 'O'\]"):
        CausalModel({"A": [0, 1], "O": [0, 1]}, {"O": ["A", "Q"]}, {"O": lambda a, q: a})


def test_parents_for_unknown_variable():
    with pytest.raises(CausalModelError, match=r"parents given for 'P', which has no value set"):
        CausalModel({"A": [0, 1], "O": [0, 1]}, {"O": ["A"], "P": ["A"]}, {"O": lambda a: a})


def test_missing_mechanism():
    with pytest.raises(CausalModelError, match=r"variable 'O' has parents \['A'\] but no mechanism; give mechanisms\['O'\] = f\(A\)"):
        CausalModel({"A": [0, 1], "O": [0, 1]}, {"O": ["A"]}, {})


def test_mechanism_for_an_input():
    with pytest.raises(CausalModelError, match=r"input variable 'A' has a mechanism but no parents"):
        CausalModel({"A": [0, 1], "O": [0, 1]}, {"O": ["A"]}, {"O": lambda a: a, "A": lambda: 0})


def test_mechanism_for_unknown_variable():
    with pytest.raises(CausalModelError, match=r"mechanisms given for unknown variables \['Q'\]"):
        CausalModel({"A": [0, 1], "O": [0, 1]}, {"O": ["A"]}, {"O": lambda a: a, "Q": lambda: 0})


def test_inconsistent_mechanism_value_is_caught_on_construction():
    with pytest.raises(CausalModelError, match=r"the mechanism of 'O' returned 2 on parents \{'A': 1\}, which is not in its value set \[0, 1\]"):
        CausalModel({"A": [0, 1], "O": [0, 1]}, {"O": ["A"]}, {"O": lambda a: 2 * a})


def test_inconsistent_mechanism_found_by_sampling_large_parent_spaces():
    big = tuple(range(200))  # 200 * 200 combinations: sampled, not enumerated
    with pytest.raises(CausalModelError, match=r"the mechanism of 'O' returned 'x'"):
        CausalModel({"A": big, "B": big, "O": [True, False]}, {"O": ["A", "B"]},
                    {"O": lambda a, b: "x" if (a + b) % 7 == 0 else a == b})


def test_mechanism_that_raises_is_named():
    with pytest.raises(CausalModelError, match=r"the mechanism of 'O' raised ZeroDivisionError: integer division or modulo by zero on parents \{'A': 0\}"):
        CausalModel({"A": [0, 1], "O": [0, 1]}, {"O": ["A"]}, {"O": lambda a: 1 // a})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"A": []}, r"variable 'A' has an empty value set"),
        ({"A": [1, 1]}, r"variable 'A' repeats a value in its value set \[1, 1\]"),
        ({"A": "abc"}, r"values\['A'\] = 'abc': expected a sequence of values"),
        ({"A": [[1], [2]]}, r"variable 'A' has an unhashable value"),
        ({}, r"values: expected a non-empty mapping"),
    ],
)
def test_bad_value_sets(values, message):
    with pytest.raises(CausalModelError, match=message):
        CausalModel(values)


def test_bad_inputs_to_run():
    cm = equality_model()
    with pytest.raises(CausalModelError, match=r"must set exactly the inputs \['W', 'X', 'Y', 'Z'\]; missing \['Z'\], not inputs \['Q'\]"):
        cm.run({"W": 0, "X": 0, "Y": 0, "Q": 0})
    with pytest.raises(CausalModelError, match=r"input 'W'=7 is not in its value set \[0, 1, 2\]"):
        cm.run({"W": 7, "X": 0, "Y": 0, "Z": 0})


def test_interchange_of_unknown_variable():
    cm = equality_model()
    base = {"W": 0, "X": 0, "Y": 0, "Z": 0}
    with pytest.raises(CausalModelError, match=r"an intervened variable 'Q' is not one of its variables \['W', 'X', 'Y', 'Z', 'WX', 'YZ', 'O'\]"):
        cm.interchange(base, {"Q": base})


def test_uniform_sampling_covers_the_value_sets():
    cm = equality_model()
    draws = cm.sample_inputs(3000, seed=1)
    counts = Counter(d["W"] for d in draws)
    assert set(counts) == set(E)
    assert all(abs(c / 3000 - 1 / 3) < 0.05 for c in counts.values())


def test_balanced_sampling_by_enumeration_is_exact():
    cm = equality_model()  # 81 inputs: enumerated
    draws = cm.sample_inputs(1000, balance=["WX", "YZ"], seed=0)
    counts = Counter((cm.run(d)["WX"], cm.run(d)["YZ"]) for d in draws)
    assert sorted(counts.values()) == [250, 250, 250, 250]


def test_balanced_sampling_by_rejection_with_a_custom_sampler():
    big = tuple(range(1000))  # 1e12 inputs: not enumerable; equal pairs are rare under uniform draws

    def sampler(rng):
        w = rng.choice(big)
        return {"W": w, "X": w if rng.random() < 0.5 else rng.choice(big), "Y": rng.choice(big), "Z": rng.choice(big)}

    cm = CausalModel({"W": big, "X": big, "Y": big, "Z": big, "WX": (True, False), "YZ": (True, False), "O": (True, False)},
                     {"WX": ["W", "X"], "YZ": ["Y", "Z"], "O": ["WX", "YZ"]}, {"WX": same, "YZ": same, "O": same},
                     input_sampler=sampler)
    draws = cm.sample_inputs(400, balance="O", seed=0)
    assert Counter(cm.run(d)["O"] for d in draws) == {True: 200, False: 200}


def test_unreachable_balance_raises_instead_of_looping():
    big = tuple(range(10_000))
    cm = CausalModel({"W": big, "X": big, "WX": (True, False)}, {"WX": ["W", "X"]}, {"WX": same},
                     input_sampler=lambda rng: {"W": rng.choice(big), "X": rng.choice(big) + 0 * 1})
    # equal pairs have probability 1e-4 under this sampler: the bounded budget runs out with a clear message
    with pytest.raises(CausalModelError, match=r"could not draw 100 inputs balanced over \['WX'\] in 500 draws; still missing \[\(\(True,\), \d+\)\]"):
        cm.sample_inputs(100, balance="WX", seed=0, max_draws=500)


def test_unreachable_value_is_skipped_by_exact_enumeration():
    # O is constant: only one of its values is reachable, so balancing returns it alone
    cm = CausalModel({"A": (0, 1), "O": (0, 1)}, {"O": ["A"]}, {"O": lambda a: 0})
    draws = cm.sample_inputs(10, balance="O")
    assert len(draws) == 10 and all(cm.run(d)["O"] == 0 for d in draws)


def test_input_sampler_output_is_checked():
    cm = equality_model(input_sampler=lambda rng: {"W": 9, "X": 0, "Y": 0, "Z": 0})
    with pytest.raises(CausalModelError, match=r"input 'W'=9 is not in its value set"):
        cm.sample_input(random.Random(0))


def test_outputs_must_be_variables():
    with pytest.raises(CausalModelError, match=r"outputs=\['Q'\] — expected one or more of its variables"):
        equality_model(outputs=["Q"])
