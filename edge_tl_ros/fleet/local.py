"""A robot's local step in federated training: the round's recipe, started from the fleet head.

:func:`local_step` trains exactly what :func:`edge_tl_ros.adapt.run_round` trains (class-balanced local
labelled frames from ``gather`` + replay of half the bundle's anchor set, ``train_head`` regularised
toward its prior), with the fleet head as the prior instead of the deployed head, on every labelled
frame (no holdout: the fleet head that comes back is judged by the gate, :mod:`.gate`).
"""

from __future__ import annotations

import numpy as np

from ..adapt.config import AdaptConfig
from ..adapt.round import _anchor_split, gather
from ..bundle import Head, ModelBundle
from ..headtrain import class_weights, train_head


def local_step(bundle: ModelBundle, data, prior: Head, cfg: AdaptConfig) -> Head:
    """The round's head recipe on ``data`` (what :func:`gather` takes) from ``prior``; ValueError when
    there is nothing to train on. ``prior`` must start with the bundle's classes (:func:`.gate.fit_to`)."""
    ld = gather(data, prior, cfg)
    if len(ld.labels) == 0:
        raise ValueError('no labelled frames to train on')
    X, y = ld.features, ld.labels
    w = class_weights(y, len(ld.class_names), cfg.class_balanced)
    w = w / w.sum()
    rf, rl, _, _ = _anchor_split(bundle, cfg)
    if rf is not None:
        rw = class_weights(rl, len(ld.class_names), cfg.class_balanced)
        w = np.concatenate([w, cfg.anchor_replay * rw / rw.sum()])
        X, y = np.concatenate([X, rf]), np.concatenate([y, rl])
    return train_head(X, y, prior, class_names=ld.class_names, l2_to_prior=cfg.l2_to_prior,
                      class_balanced=False, iters=cfg.iters, seed=cfg.seed, sample_weight=w)
