"""Key checks shared by the step tables."""

from __future__ import annotations

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
