"""Map a user's label names (or numeric ids) to a bundle's class names: ``--class-map FILE``.

The file is YAML or JSON, one entry per label of the user's data::

    # my label -> bundle class name (null: ignore frames with this label)
    stop: "Stop"
    speed_30: "Speed limit (30km/h)"
    14: "Stop"          # a numeric id (an npz's y value) works too
    parking: null

Every target must be one of the bundle's class names (:class:`ClassMapError` lists the unknown ones and
the valid names). A label that is neither a key of the map nor already a bundle class name is an error
too, so that a typo cannot silently turn into a wrong label. No ROS, no torch.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path


class ClassMapError(ValueError):
    """A class map that cannot be used (unreadable, wrong layout, unknown names)."""


def load_class_map(path: str | os.PathLike, class_names) -> dict[str, str | None]:
    """Read ``path`` (``.json``, else YAML) -> ``{label: bundle class name or None}``, checked against
    ``class_names``."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise ClassMapError(f'class map {path}: {e.strerror or e}') from None
    try:
        if path.suffix.lower() == '.json':
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ClassMapError(f'class map {path} is not valid {path.suffix.lstrip(".") or "YAML"}: '
                            f'{" ".join(str(e).split())[:200]}') from None
    if not isinstance(data, dict) or not data:
        raise ClassMapError(f'class map {path} must be a non-empty mapping "your label: bundle class name"')
    known = set(class_names)
    out: dict[str, str | None] = {}
    bad = []
    for k, v in data.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)) or (v is not None and not isinstance(v, str)):
            raise ClassMapError(f'class map {path}: entry {k!r}: {v!r} must map a name or id to a class name '
                                'or null')
        if v is not None and v not in known:
            bad.append(v)
        out[str(k)] = v
    if bad:
        raise ClassMapError(f'class map {path}: {_unknown(bad, class_names)}')
    return out


def _unknown(names, class_names) -> str:
    hints = []
    for n in sorted(set(names))[:5]:
        close = difflib.get_close_matches(n, list(class_names), 1)
        hints.append(f'{n!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
    more = f' and {len(set(names)) - 5} more' if len(set(names)) > 5 else ''
    return (f'unknown class name(s) {", ".join(hints)}{more}; the bundle has {len(class_names)} classes: '
            f'{", ".join(map(repr, list(class_names)[:8]))}{", ..." if len(class_names) > 8 else ""}')


def map_label(label, class_map: dict[str, str | None], class_names) -> str | None:
    """One label (name or id) through the map; a bundle class name not in the map stays itself."""
    key = str(int(label)) if not isinstance(label, str) and float(label).is_integer() else str(label)
    if key in class_map:
        return class_map[key]
    if key in set(class_names):
        return key
    raise KeyError(key)


def apply_class_map(labels: dict, class_map: dict[str, str | None], class_names, error=ClassMapError) -> dict:
    """``{stamp: label}`` -> ``{stamp: bundle class name}`` (None-mapped labels dropped); raises ``error``
    naming the labels neither in the map nor bundle classes."""
    out, missing = {}, set()
    names = set(class_names)
    for s, lab in labels.items():
        if lab in class_map:
            if class_map[lab] is not None:
                out[s] = class_map[lab]
        elif lab in names:
            out[s] = lab
        else:
            missing.add(lab)
    if missing:
        shown = ', '.join(map(repr, sorted(missing)[:5])) + (f' and {len(missing) - 5} more'
                                                             if len(missing) > 5 else '')
        raise error(f'labels {shown} are neither in the class map nor class names of the bundle: add them to '
                    'the map (null ignores a label)')
    return out


def remap_split(split, class_map: dict[str, str | None], class_names):
    """A :class:`edge_tl_ros.data.Split` with its labels (class names or ids of the data) as indices into
    ``class_names``; images whose label maps to None are left out. Raises :class:`ClassMapError` naming
    data classes neither in the map nor in ``class_names``."""
    import numpy as np

    from .data import Split

    pos = {c: k for k, c in enumerate(class_names)}
    table, missing = {}, []
    for i, name in enumerate(split.class_names):
        target = class_map.get(str(name), class_map.get(str(i), name if name in pos else KeyError))
        if target is KeyError:
            missing.append(str(name))
        table[i] = None if target is None or target is KeyError else pos[target]
    if missing:
        shown = ', '.join(map(repr, missing[:5])) + (f' and {len(missing) - 5} more'
                                                     if len(missing) > 5 else '')
        raise ClassMapError(f'data classes {shown} are neither in the class map nor class names of the '
                            'bundle: add them to the map (null leaves their images out)')
    new = np.array([-1 if table[int(y)] is None else table[int(y)] for y in split.labels], np.int64)
    keep = new >= 0
    return Split(split.images[keep], new[keep], tuple(class_names))
