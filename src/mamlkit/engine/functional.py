"""A functional view of any ``nn.Module``: call it with a dict of parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase

from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


class FunctionalModel:
    """Calls ``module`` with parameters supplied by the caller.

    Only trainable parameters (``requires_grad=True``) are replaced; buffers and frozen
    parameters are read from the module itself. A parameter shared by several modules
    (tied weights) appears once, under its first name, and is passed to each module that
    holds it, with ``tie_weights=False``. A submodule registered under two names is one
    slot and is set once: setting it twice, or ``functional_call``'s default weight tying,
    leaves the module holding the call's tensors afterwards (pytorch/pytorch#164759).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.aliases: dict[str, list[str]] = {}
        first_name: dict[int, str] = {}
        for prefix, sub in module.named_modules():  # each module object once
            for local, p in sub._parameters.items():
                if p is None or not p.requires_grad:
                    continue
                name = f"{prefix}.{local}" if prefix else local
                canonical = first_name.setdefault(id(p), name)
                self.aliases.setdefault(canonical, []).append(name)
        self._has_aliases = any(len(v) > 1 for v in self.aliases.values())
        # Every name each parameter is reachable by, a submodule's second name too, for matching names
        # (``adapt=`` patterns); the call above sets each module slot once and must not see these.
        canonical = {id(p): name for name, p in self.params().items()}
        self.all_names: dict[str, list[str]] = {name: [] for name in self.aliases}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in canonical:
                self.all_names[canonical[id(p)]].append(name)

    def params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, each physical tensor once."""
        named = dict(self.module.named_parameters())
        return {name: named[name] for name in self.aliases}

    def __call__(self, params: Params, *args, **kwargs):
        if self._has_aliases:
            params = {alias: t for name, t in params.items() for alias in self.aliases[name]}
        return functional_call(self.module, params, args, kwargs, tie_weights=False, strict=False)

    def call_with(self, params: Params, buffers: Params, *args, **kwargs):
        """As a call, with ``buffers`` (by name) also replaced for this call (the per-step
        BatchNorm's step index, ``MAML(norm="per_step")``)."""
        if self._has_aliases:
            params = {alias: t for name, t in params.items() for alias in self.aliases[name]}
        return functional_call(self.module, {**params, **buffers}, args, kwargs, tie_weights=False, strict=False)


def select_names(
    names: Iterable[str] | Mapping[str, list[str]], patterns: Iterable[str] | Callable[[str], bool] | None
) -> list[str]:
    """Names matching ``patterns``: glob strings (``"head.*"``), a predicate, or ``None`` for all.

    A pattern starting with ``!`` excludes what it matches (``["*", "!*.bn.bias"]``). ``names`` may
    map each name to all its aliases (:attr:`FunctionalModel.aliases`, for a submodule registered
    under two names): a name matches a pattern, or an exclusion, if any of its aliases does.
    """
    aliases = names if isinstance(names, Mapping) else {n: [n] for n in names}
    if patterns is None:
        return list(aliases)
    if callable(patterns):
        return [n for n, al in aliases.items() if any(patterns(a) for a in al)]
    patterns = list(patterns)
    chosen = []
    for n, al in aliases.items():
        keep = False
        for pat in patterns:
            if pat.startswith("!"):
                if any(fnmatchcase(a, pat[1:]) for a in al):
                    keep = False
            elif any(fnmatchcase(a, pat) for a in al):
                keep = True
        if keep:
            chosen.append(n)
    return chosen


def unmatched_patterns(
    names: Iterable[str] | Mapping[str, list[str]], patterns: Iterable[str] | Callable[[str], bool] | None
) -> list[str]:
    """The including patterns (no ``!``) of ``patterns`` that match none of ``names`` or their aliases."""
    if patterns is None or callable(patterns):
        return []
    aliases = names if isinstance(names, Mapping) else {n: [n] for n in names}
    every = [a for al in aliases.values() for a in al]
    return [p for p in patterns if not p.startswith("!") and not any(fnmatchcase(a, p) for a in every)]


def detach(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}
