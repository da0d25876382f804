"""Containers that count their own changes, so a cached step plan notices them at no cost per tensor.

An optimizer's ``state`` (parameter -> per-parameter state dict) and each param group's
``"params"`` list are the containers a user (or a checkpoint loader) may edit between two steps:
``opt.state.clear()``, ``del opt.state[p]``, ``opt.state[p]["exp_avg"] = t``,
``group["params"][0] = q`` ... torch.optim reads them afresh every step; our cached plan
(``_dispatch.py``) must see every such edit without walking them. These subclasses of ``dict``,
``defaultdict`` and ``list`` behave exactly as their bases (reads are the bases' own C code) and
advance one process-wide counter, :func:`mutations`, on every mutating call. A plan records the
counter when it is built; a step whose counter is unchanged knows that no observed container
changed (Note [Plan invalidation] in ``_dispatch.py``).

Two places convert a plain container into an observed one, and then hold a copy, not the object
given: a plain ``dict`` stored into an observed state (``opt.state[p] = {...}``) is stored as an
:class:`ObservedDict` of the same items, and a plain mapping assigned to ``opt.state`` (or loaded by
``load_state_dict``) becomes an :class:`ObservedState` of the same items. Edits made afterwards
through ``opt.state`` are seen; edits to the plain dict that was handed over are not, as they are
not part of the optimizer any more.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

_counter = [0]


def mutations() -> int:
    """How many times any observed container has been changed in this process."""
    return _counter[0]


def _changed() -> None:
    _counter[0] += 1


def _counting(base: type, names: tuple[str, ...]):
    """A class decorator: each method in ``names`` counts a change, then runs ``base``'s."""
    def decorate(cls):
        for name in names:
            def counted(self, *args, _method=getattr(base, name), **kwargs):
                _changed()
                return _method(self, *args, **kwargs)
            counted.__name__ = name
            setattr(cls, name, counted)
        return cls
    return decorate


@_counting(dict, ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault", "update"))
class ObservedDict(dict):
    """A parameter's state: a ``dict`` whose every change is counted."""

    __slots__ = ()


def observed_dict(value: Any) -> Any:
    """``value`` as the state container stores it: plain dicts become :class:`ObservedDict`."""
    return ObservedDict(value) if type(value) is dict else value


class ObservedState(defaultdict):
    """An optimizer's ``state``: a ``defaultdict`` of :class:`ObservedDict` whose every change is counted."""

    def __init__(self, items=()) -> None:
        super().__init__(ObservedDict)
        _changed()
        for key, value in dict(items).items():
            super().__setitem__(key, observed_dict(value))

    def __missing__(self, key):
        _changed()  # reading a missing key inserts an empty state, as defaultdict does
        return super().__missing__(key)

    def __setitem__(self, key, value) -> None:
        _changed()
        super().__setitem__(key, observed_dict(value))

    def __delitem__(self, key) -> None:
        _changed()
        super().__delitem__(key)

    def __ior__(self, other):
        self.update(other)
        return self

    def clear(self) -> None:
        _changed()
        super().clear()

    def pop(self, *args):
        _changed()
        return super().pop(*args)

    def popitem(self):
        _changed()
        return super().popitem()

    def setdefault(self, key, default=None):
        _changed()
        return super().setdefault(key, observed_dict(default))

    def update(self, *args, **kwargs) -> None:
        _changed()
        for key, value in dict(*args, **kwargs).items():
            super().__setitem__(key, observed_dict(value))

    def copy(self) -> ObservedState:
        return ObservedState(self)

    def __reduce__(self):
        # Pickled as torch's own container, a defaultdict(dict) of plain dicts.
        return _plain_state, (dict(self),)


def _plain_state(items: dict) -> defaultdict:
    return defaultdict(dict, {key: dict(value) if isinstance(value, dict) else value for key, value in items.items()})


def observed_state(value: Any) -> ObservedState:
    """``value`` (a mapping) as an :class:`ObservedState`; returned unchanged when it already is one."""
    return value if type(value) is ObservedState else ObservedState(value)


@_counting(list, ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop",
                  "remove", "clear", "sort", "reverse"))
class ObservedList(list):
    """A param group's ``"params"``: a ``list`` whose every change is counted."""

    __slots__ = ()

    def __reduce__(self):
        return list, (list(self),)
