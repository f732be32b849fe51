"""Meta-SGD's learned step sizes: one per adapted parameter, kept in a ``ParameterDict`` whose
keys cannot hold ``.``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def _key(name: str) -> str:
    """The ``inner_lrs`` key of parameter ``name`` (a ParameterDict key cannot hold ``.``), one to one.

    An ordinary name, with no ``__``, ``_.``, ``._`` or ``..``, keeps the key mamlkit always gave
    it, ``.`` -> ``__``, so checkpoints load as they are: each run of ``_`` and ``.`` in it is one
    character, so each run of ``_`` in its key is one (``_``) or two (``.``) long and reads back.
    Any other name (``a__weight`` beside ``a.weight``, whose keys were the same) is written
    ``___`` + its characters with ``_`` -> ``_u`` and ``.`` -> ``_d``: three underscores in a row,
    which no ordinary key holds, then an escape that reads back.
    """
    if "__" in name or "_." in name or "._" in name or ".." in name:
        return "___" + name.replace("_", "_u").replace(".", "_d")
    return name.replace(".", "__")


def _old_key(name: str) -> str:
    """The key before :func:`_key`: not one to one (``a.weight`` and ``a__weight`` shared one)."""
    return name.replace(".", "__")


def _step_size(lr) -> Callable[[str], Any]:
    """The step size of a parameter by name: one for all, or Meta-SGD's learned one per parameter."""
    return (lambda n: lr[_key(n)]) if isinstance(lr, nn.ParameterDict | dict) else (lambda n: lr)


def migrate_old_keys(state_dict: dict, prefix: str, adapted_names: list[str]) -> None:
    """Step sizes saved under their old keys (:func:`_old_key`) move to the new ones, in place; an
    old key that two parameters shared is left alone, so the strict load reports it."""
    owners: dict[str, list[str]] = {}
    for n in adapted_names:
        owners.setdefault(_old_key(n), []).append(n)
    for old, names in owners.items():
        new = f"{prefix}inner_lrs.{_key(names[0])}"
        old = f"{prefix}inner_lrs.{old}"
        if len(names) == 1 and old != new and old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
