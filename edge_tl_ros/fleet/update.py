"""What a robot offers the fleet and how the fleet combines it (numpy only: no Flower, no ROS).

A robot's *update* is what a head is and nothing else: its weight ``[C, D]`` and bias ``[C]`` arrays, its
class names, and how many trusted labels (per source) it was trained on. :func:`aggregate` combines
updates of robots whose class sets differ (aligned by class name onto the union of their classes) into a
fleet head:

- ``mean``: FedAvg weighted by trusted labels (topic + teacher; self labels carry no weight), per class
  row over the robots that know the class;
- ``median``: coordinate-wise median over the robots that know the class (no weights);
- ``trimmed``: coordinate-wise mean after dropping the ``trim`` fraction at each end.

Before combining, each robot's update relative to the ``reference`` (the previous fleet head, or the
median of the updates when there is none) is clipped to ``clip`` in L2 norm. ``clip=None`` (robust, the
default) clips to the lower median of the non-zero update norms and caps every robot's weight at the
median weight: one poisoned or diverged robot can neither move the fleet head further than a typical
robot does nor outweigh it by claiming more labels. :func:`dp_update` is the optional local
differential-privacy step a robot applies before sending: clip its update to ``clip`` and add Gaussian
noise of standard deviation ``noise * clip`` to every coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..bundle import Head

METHODS = ('mean', 'median', 'trimmed')
TRUSTED_SOURCES = ('topic', 'teacher')
SEP = '\n'  # class names never contain a line break (bundle.check_class_name)


@dataclass
class Update:
    """One robot's offer: a head's arrays, its class names and its trusted label counts."""

    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    class_names: tuple[str, ...]
    label_counts: dict = field(default_factory=dict)  # source -> number of labels

    @property
    def trusted(self) -> int:
        return int(sum(int(self.label_counts.get(s, 0)) for s in TRUSTED_SOURCES))

    @classmethod
    def from_head(cls, head: Head, label_counts: dict | None = None) -> 'Update':
        return cls(np.asarray(head.weight, np.float32), np.asarray(head.bias, np.float32),
                   tuple(head.class_names), dict(label_counts or {}))

    def head(self, version: int = 0) -> Head:
        return Head(self.weight, self.bias, self.class_names, version)


def head_arrays(head: Head) -> list[np.ndarray]:
    """The parameter arrays that travel: [weight, bias] (float32)."""
    return [np.asarray(head.weight, np.float32), np.asarray(head.bias, np.float32)]


def arrays_head(arrays, class_names, version: int = 0) -> Head:
    """A :class:`Head` from [weight, bias] and class names (BundleError if they do not fit)."""
    if len(arrays) != 2:
        raise ValueError(f'a head travels as 2 arrays (weight, bias), got {len(arrays)}')
    return Head(np.asarray(arrays[0], np.float32), np.asarray(arrays[1], np.float32),
                tuple(class_names), version)


def encode_names(names) -> str:
    return SEP.join(names)


def decode_names(text: str) -> tuple[str, ...]:
    return tuple(text.split(SEP)) if text else ()


def union_classes(class_lists, first=()) -> tuple[str, ...]:
    """``first`` (e.g. the bundle's classes) in order, then every other class in the order first seen."""
    out = list(first)
    seen = set(out)
    for names in class_lists:
        for c in names:
            if c not in seen:
                seen.add(c)
                out.append(c)
    return tuple(out)


def align(u: Update, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight [K, D], bias [K], present [K] bool) of ``u`` on ``classes`` (rows it lacks are 0)."""
    pos = {c: k for k, c in enumerate(u.class_names)}
    D = u.weight.shape[1]
    W = np.zeros((len(classes), D), np.float64)
    b = np.zeros(len(classes), np.float64)
    present = np.zeros(len(classes), bool)
    for k, c in enumerate(classes):
        if c in pos:
            W[k], b[k], present[k] = u.weight[pos[c]], u.bias[pos[c]], True
    return W, b, present


def align_head(head: Head, first) -> Head:
    """``head`` with its rows reordered so that ``first`` (classes it has) come first, in that order."""
    order = union_classes([head.class_names], [c for c in first if c in head.class_names])
    pos = {c: k for k, c in enumerate(head.class_names)}
    ix = [pos[c] for c in order]
    return Head(head.weight[ix], head.bias[ix], order, head.version)


def _flat(W, b) -> np.ndarray:
    return np.concatenate([W.ravel(), b.ravel()])


def clip_update(W, b, W0, b0, clip: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``(W, b)`` moved toward ``(W0, b0)`` so that the update's L2 norm is at most ``clip``; its norm."""
    dW, db = W - W0, b - b0
    norm = float(np.linalg.norm(_flat(dW, db)))
    if clip is not None and norm > clip > 0:
        s = clip / norm
        return W0 + s * dW, b0 + s * db, norm
    return W, b, norm


def dp_update(head: Head, reference: Head | None, clip: float, noise: float,
              rng: np.random.Generator | None = None) -> Head:
    """Local differential privacy on a robot's update: clip ``head - reference`` to L2 norm ``clip``
    (classes the reference lacks count from 0) and add N(0, (noise * clip)^2) to every coordinate.
    ``clip <= 0`` returns the head unchanged."""
    if clip <= 0:
        return head
    rng = np.random.default_rng() if rng is None else rng
    W, b = head.weight.astype(np.float64), head.bias.astype(np.float64)
    if reference is not None:
        ref = Update.from_head(reference)
        W0, b0, _ = align(ref, head.class_names)
    else:
        W0, b0 = np.zeros_like(W), np.zeros_like(b)
    W, b, _ = clip_update(W, b, W0, b0, clip)
    if noise > 0:
        W = W + rng.normal(0.0, noise * clip, W.shape)
        b = b + rng.normal(0.0, noise * clip, b.shape)
    return Head(W.astype(np.float32), b.astype(np.float32), head.class_names, head.version)


def _trimmed(x: np.ndarray, trim: float) -> np.ndarray:
    n = x.shape[0]
    k = int(np.floor(trim * n))
    if n - 2 * k < 1:
        k = (n - 1) // 2
    s = np.sort(x, axis=0)
    return s[k:n - k].mean(axis=0)


def aggregate(updates: list[Update], reference: Head | None = None, method: str = 'mean',
              clip: float | None = None, trim: float = 0.25, first_classes=(),
              info: dict | None = None) -> Head:
    """The fleet head from robots' updates (see the module docstring). ``clip``: L2 bound of each update
    relative to the reference (None: the median update norm; 0: no clipping). ``info`` receives the
    update norms, the clip used, the weights and the classes."""
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    updates = [u for u in updates if u.weight.ndim == 2 and len(u.class_names)]
    if not updates:
        raise ValueError('no updates to aggregate')
    D = updates[0].weight.shape[1]
    if any(u.weight.shape[1] != D for u in updates):
        raise ValueError('updates disagree on the feature size')
    ref_names = () if reference is None else reference.class_names
    classes = union_classes([u.class_names for u in updates], union_classes([ref_names], first_classes))
    aligned = [align(u, classes) for u in updates]
    W = np.stack([a[0] for a in aligned])  # [R, K, D]
    B = np.stack([a[1] for a in aligned])  # [R, K]
    P = np.stack([a[2] for a in aligned])  # [R, K]
    if reference is not None:
        W0, b0, p0 = align(Update.from_head(reference), classes)
    else:
        W0, b0, p0 = np.zeros((len(classes), D)), np.zeros(len(classes)), np.zeros(len(classes), bool)
    # where the reference lacks a class, the median of the robots that have it stands in for it
    for k in np.flatnonzero(~p0):
        have = P[:, k]
        if have.any():
            W0[k], b0[k] = np.median(W[have, k], axis=0), np.median(B[have, k], axis=0)
    # rows a robot lacks: its update there is zero (it says nothing about that class)
    W = np.where(P[:, :, None], W, W0[None])
    B = np.where(P, B, b0[None])
    norms = np.array([np.linalg.norm(_flat(W[r] - W0, B[r] - b0)) for r in range(len(updates))])
    weights = np.array([max(u.trusted, 0) for u in updates], np.float64)
    if weights.sum() <= 0:
        weights = np.ones(len(updates))
    if clip is None:
        moved = np.sort(norms[norms > 1e-12])  # robots that offer the reference itself say nothing
        used_clip = float(moved[(len(moved) - 1) // 2]) if len(moved) else 0.0
        weights = np.minimum(weights, np.median(weights))
    else:
        used_clip = float(clip)
    if used_clip > 0:
        for r in range(len(updates)):
            W[r], B[r], _ = clip_update(W[r], B[r], W0, b0, used_clip)
    Wf, bf = W0.copy(), b0.copy()
    for k in range(len(classes)):
        have = P[:, k]
        if not have.any():
            continue
        if method == 'mean':
            w = weights[have]
            w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
            Wf[k] = np.tensordot(w, W[have, k], axes=1)
            bf[k] = float(w @ B[have, k])
        elif method == 'median':
            Wf[k], bf[k] = np.median(W[have, k], axis=0), float(np.median(B[have, k]))
        else:
            Wf[k], bf[k] = _trimmed(W[have, k], trim), float(_trimmed(B[have, k][:, None], trim)[0])
    if info is not None:
        info.update(norms=[round(float(n), 4) for n in norms], clip=round(used_clip, 4), method=method,
                    trusted=[u.trusted for u in updates], weights=[float(w) for w in weights],
                    classes=len(classes), robots=len(updates))
    version = 0 if reference is None else reference.version
    return Head(Wf.astype(np.float32), bf.astype(np.float32), classes, version)
