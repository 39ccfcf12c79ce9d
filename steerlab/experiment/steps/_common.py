"""Key checks shared by the step tables, and the base/source pair that [patch] and [attribution] share."""

from __future__ import annotations

import json
import random
from typing import Any

from steerlab.interventions.errors import ConfigError


def positive_int(table: dict, key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}.{key} = {value!r}: expected a positive integer")
    return value


def positive_float(table: dict, key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}.{key} = {value!r}: expected a positive number")
    return float(value)


def boolean(table: dict, key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key} = {value!r}: expected true or false")
    return value


def int_list(value: Any, key: str, where: str) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise ConfigError(f"{where}.{key} = {value!r}: expected an integer or a list of integers, e.g. [10, 20]")
    return list(items)


def task_position(task, value: Any, where: str) -> Any:
    """A position the task's prompts name (``last``, a field, one of ``[task.positions]``), an int, or ``none`` (every position)."""
    if value in (None, "none"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value in task.positions:
        return value
    raise ConfigError(f"{where}: position {value!r}; expected one the task names ({', '.join(task.positions)}), an integer, or \"none\"")


def sites(table: dict, where: str, default: str | None = None) -> list[str]:
    """``sites`` (a name, a pattern or a list) or ``layers`` (integers: ``blocks.L.resid_post``)."""
    if "sites" in table and "layers" in table:
        raise ConfigError(f"{where}: give sites or layers, not both")
    if "layers" in table:
        return [f"blocks.{L}.resid_post" for L in int_list(table["layers"], "layers", where)]
    value = table.get("sites", default)
    if value is None:
        raise ConfigError(f"{where} has no sites: expected sites = \"blocks.*.resid_post\" (a name, a pattern or a list) or layers = [10, 20]")
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(f"{where}.sites = {value!r}: expected a site name, a pattern or a list of them")
    return items


# -- the base/source pair of [patch] and [attribution] -------------------------------------------------------------
def answer(task, setting: dict) -> Any:
    """The causal model's output for one setting of the task's inputs."""
    return task.causal_model.run(setting)[task.output]


def pair_table(table: dict, ctx, where: str, why: str) -> tuple[dict | None, dict | None]:
    """The step's ``base`` and ``source`` tables (both or neither), each checked by the causal model;
    refused when their answers are equal (``why`` says what that would spoil)."""
    pair = {}
    for key in ("base", "source"):
        if key in table:
            if not isinstance(table[key], dict):
                raise ConfigError(f"{where}.{key}: expected a table of input values, e.g. {{ NAME = \"John\" }}")
            try:
                ctx.task.causal_model.check_input(table[key])
            except Exception as e:  # noqa: BLE001 - the causal model's own message names the bad value
                raise ConfigError(f"{where}.{key}: {e}") from None
        pair[key] = table.get(key)
    if (pair["base"] is None) != (pair["source"] is None):
        raise ConfigError(f"{where}: give both base and source, or neither (then a pair is drawn from the task)")
    if pair["base"] is not None and answer(ctx.task, pair["base"]) == answer(ctx.task, pair["source"]):
        raise ConfigError(f"{where}: base and source have the same answer {answer(ctx.task, pair['base'])!r}; {why}")
    return pair["base"], pair["source"]


def draw_pair(task, seed: int, step: str, tokenizer=None) -> tuple[dict, dict]:
    """The first base/source pair, in a seeded shuffle of the task's inputs, that differ in one variable and
    have different answers; with ``tokenizer``, also prompts of equal token counts (position-wise patching)."""
    rng = random.Random(seed)
    inputs = task.inputs(limit=2048, seed=seed)
    rng.shuffle(inputs)
    enc = None if tokenizer is None else task.encoder(tokenizer)
    length: dict[str, int] = {}

    def n(x: dict) -> int:
        key = json.dumps(x, sort_keys=True, default=str)
        if key not in length:
            length[key] = len(tokenizer(enc.text(x))["input_ids"])
        return length[key]

    def same_length(b: dict, s: dict) -> bool:
        return enc is None or n(b) == n(s)

    for b in inputs:
        for s in inputs:
            if answer(task, b) != answer(task, s) and sum(b[v] != s[v] for v in b) == 1 and same_length(b, s):
                return b, s
    lengths = ", prompts of equal token counts" if tokenizer is not None else ""
    raise ConfigError(f"{step}: no base/source pair of inputs differing in one variable, with different answers{lengths}; "
                      "give base and source")
