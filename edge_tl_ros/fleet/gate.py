"""A robot's own gate for a fleet head: the round's holdout and source-anchor checks, on a given head.

The fleet head is never trained here; it is judged exactly as :func:`edge_tl_ros.adapt.run_round` judges
its candidate, with the round's own pieces (``gather`` for the labelled frames, ``stratified_split`` with
the same seed for the trusted holdout, ``_anchor_split`` for the source-domain check half of the bundle's
anchor set, ``headtrain.accuracy``): accepted only if the holdout accuracy is at least the current head's
plus ``margin`` and the anchor accuracy drops by at most ``anchor_tolerance``. So the fleet can never make
one robot worse on its own data or make it forget the source domain.
"""

from __future__ import annotations

import time

import numpy as np

from ..adapt.config import AdaptConfig, RoundResult
from ..adapt.round import _anchor_split, gather, stratified_split
from ..bundle import Head, ModelBundle
from ..headtrain import accuracy
from .update import align_head


def fit_to(fleet: Head, current: Head) -> Head:
    """The fleet head with the current head's classes first, in its order (classes the fleet head lacks
    keep the current head's rows), so the registry accepts it as a version of this bundle's head."""
    missing = [c for c in current.class_names if c not in fleet.class_names]
    if missing:
        pos = {c: k for k, c in enumerate(current.class_names)}
        ix = [pos[c] for c in missing]
        fleet = Head(np.concatenate([fleet.weight, current.weight[ix]]),
                     np.concatenate([fleet.bias, current.bias[ix]]),
                     fleet.class_names + tuple(missing), fleet.version)
    return align_head(fleet, current.class_names)


def gate_fleet_head(bundle: ModelBundle, data, current: Head, fleet: Head, cfg: AdaptConfig,
                    margin: float | None = None) -> RoundResult:
    """Judge ``fleet`` against ``current`` on the robot's labelled ``data`` (what :func:`gather` takes)
    and the bundle's anchor set. ``margin`` overrides ``cfg.margin`` (the fleet default is 0: not worse).
    The result's head is ``fleet`` aligned to the current head's classes (:func:`fit_to`)."""
    t0 = time.perf_counter()
    margin = cfg.margin if margin is None else float(margin)
    cand = fit_to(fleet, current)
    ld = gather(data, current, cfg)
    metrics = {'kind': 'fleet', 'base_version': current.version, 'n_labelled': int(len(ld.labels)),
               'margin': margin}

    def done(ok, reason):
        metrics['seconds'] = round(time.perf_counter() - t0, 4)
        return RoundResult(ok, reason, cand, metrics)

    if cand.feature_size != current.feature_size:
        return done(False, f'fleet head expects {cand.feature_size} features, this robot has '
                           f'{current.feature_size}')
    trusted = ld.sources != 'self'
    _, ho = stratified_split(ld.labels, cfg.holdout_fraction, cfg.seed, eligible=trusted)
    metrics['n_holdout'] = int(len(ho))
    if len(ho) < cfg.min_holdout:
        return done(False, f'only {len(ho)} trusted holdout frames (< {cfg.min_holdout}) to judge the '
                           'fleet head')
    # labels index ld.class_names, which start with the current head's classes (the candidate's order)
    cand_eval = cand if ld.class_names == cand.class_names[:len(ld.class_names)] else None
    if cand_eval is None:
        return done(False, 'fleet head classes do not line up with the local labels')
    hx, hy = ld.features[ho], ld.labels[ho]
    h_old, h_new = accuracy(current, hx, hy), accuracy(cand, hx, hy)
    metrics.update(holdout_acc_old=round(h_old, 4), holdout_acc_new=round(h_new, 4))
    _, _, cf, cl = _anchor_split(bundle, cfg)
    if cf is not None:
        a_old, a_new = accuracy(current, cf, cl), accuracy(cand, cf, cl)
        metrics.update(anchor_acc_old=round(a_old, 4), anchor_acc_new=round(a_new, 4),
                       n_anchor_check=int(len(cl)))
    if not h_new >= h_old + margin - 1e-9:
        return done(False, f'fleet head: holdout accuracy {h_old:.3f} -> {h_new:.3f} does not improve by '
                           f'margin {margin:.3f}')
    if cf is not None and a_old - a_new > cfg.anchor_tolerance + 1e-9:
        return done(False, f'fleet head: anchor accuracy drops {a_old:.3f} -> {a_new:.3f} (more than '
                           f'anchor_tolerance {cfg.anchor_tolerance:.3f})')
    anchor = f', anchor {a_old:.3f} -> {a_new:.3f}' if cf is not None else ' (no anchor set)'
    return done(True, f'fleet head: holdout accuracy {h_old:.3f} -> {h_new:.3f}{anchor}')
