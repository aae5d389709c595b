"""Settings dataclasses that are also ROS parameters: one source of truth for default, range and text.

A field made with :func:`setting` carries its ROS parameter name (dotted groups: ``store.*``,
``labels.*``, ``round.*``, ``accept.*``, ``advanced.*``), a one-sentence description and its range or
choices. :func:`parameters` turns a dataclass into the ``{name: (default, descriptor kwargs)}`` table
the nodes declare (:func:`edge_tl_ros.nodes.params.declare_all`); :func:`check` validates an instance
against the same ranges, so code that builds the dataclass directly (tests, benchmarks, replays) gets the
node's rules. No ROS in here.
"""

from __future__ import annotations

import dataclasses
import math


def setting(default, param: str | None = None, text: str = '', range: tuple | None = None,  # noqa: A002
            choices: tuple | None = None, read_only: bool = False):
    """A dataclass field; ``param`` is its ROS parameter name (None: a plain field, not a parameter)."""
    meta = {'param': param, 'text': text, 'range': range, 'choices': choices, 'read_only': read_only}
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return dataclasses.field(default_factory=lambda: value, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _settings(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get('param')]


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def parameters(cls) -> dict:
    """``{parameter name: (default, descriptor kwargs)}`` of the dataclass ``cls``."""
    out = {}
    for f in _settings(cls):
        m = f.metadata
        default = _default(f)
        kw = {'text': m['text'], 'read_only': m['read_only']}
        if m['range'] is not None:
            kw['float_range' if isinstance(default, float) else 'int_range'] = m['range']
        if m['choices']:
            kw['choices'] = m['choices']
        out[m['param']] = (list(default) if isinstance(default, tuple) else default, kw)
    return out


def from_parameters(cls, values: dict, **extra):
    """An instance of ``cls`` from ``{parameter name: value}`` (missing names keep their defaults)."""
    kw = {f.name: values[f.metadata['param']] for f in _settings(cls) if f.metadata['param'] in values}
    return cls(**kw, **extra)


def check(obj) -> None:
    """Raise ValueError naming the first field of ``obj`` outside its range or choices."""
    for f in dataclasses.fields(obj):
        m, v = f.metadata, getattr(obj, f.name)
        name = m.get('param') or f.name
        lo_hi = m.get('range')
        if lo_hi is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f'{name} must be a number in [{lo_hi[0]}, {lo_hi[1]}], got {v!r}')
            if not lo_hi[0] <= v <= lo_hi[1]:
                raise ValueError(f'{name}={v} is outside [{lo_hi[0]}, {lo_hi[1]}]')
        if m.get('choices') and v not in m['choices']:
            raise ValueError(f'{name}={v!r} is not one of {list(m["choices"])}')
