"""The label-free backbone candidate of a round: the student re-normalised to the robot's frames.

A BatchNorm student under a domain shift is mostly mis-normalised: its features move because the
statistics they are normalised with no longer fit. :func:`backbone_round` re-estimates them on the
stored crops (AdaBN, :func:`edge_tl_ros.ttn.adapted_backbone`: no label needed), trains a head on the
new backbone's features with the round's labels, and gates the pair like a head:

- holdout: the candidate pair must beat the deployed pair (current head on its own backbone) by
  ``margin`` on the same held-out labelled crops, both run from the crops here;
- source: on the bundle's anchor *images* (``anchor.npz`` ``images``) the candidate pair may lose at most
  ``anchor_tolerance`` against the deployed pair. A bundle without anchor images gets no backbone
  candidate (forgetting could not be checked).

The head trains with the round's recipe (class-balanced, pulled toward the current head, anchor replay
through the new backbone). Nothing is written; the caller registers an accepted pair with
``HeadRegistry.add(head, metrics, backbone=result.backbone)``. No ROS, no torch.
"""

from __future__ import annotations

import time

import numpy as np

from ..bundle import Head, ModelBundle
from ..engine import Engine
from ..headtrain import accuracy, class_weights, train_head
from .config import AdaptConfig, RoundResult
from .round import stratified_split

MAX_STATS_FRAMES = 1000  # moments from more frames change nothing measurable and cost memory


def backbone_round(bundle: ModelBundle, images: np.ndarray, labels, sources, current_head: Head,
                   current_backbone: bytes | None, cfg: AdaptConfig, stats_images: np.ndarray | None = None,
                   threads: int = 1) -> RoundResult | None:
    """Propose (adapted backbone, head) from stored crops; None where the bundle cannot have one.

    ``images``: RGB crops [N,h,w,3] of the labelled frames (any size: resized by the bundle's rule);
    ``labels``: their class names; ``sources``: their label sources (``self`` labels train, never
    validate). ``stats_images``: the frames the statistics come from (default ``images``; the unlabelled
    stored frames are as good for that). ``current_backbone``: the deployed pair's backbone (None = the
    bundle's). Returns a :class:`RoundResult` whose ``backbone`` holds the serialised ONNX.
    """
    from .. import ttn

    t0 = time.perf_counter()
    if bundle.path('norm_stats') is None or bundle.anchor_images is None or bundle.anchor is None:
        return None
    if tuple(current_head.class_names) != tuple(bundle.class_names):
        return None  # new classes: the head path handles them
    metrics: dict = {'kind': 'backbone', 'base_version': current_head.version}

    def done(accepted, reason, head=None, backbone=None):
        metrics['seconds'] = round(time.perf_counter() - t0, 4)
        return RoundResult(accepted, reason, head, metrics, backbone=backbone)

    pos = {c: k for k, c in enumerate(bundle.class_names)}
    keep = [i for i, (n, s) in enumerate(zip(labels, sources)) if n in pos and s in cfg.label_sources]
    if len(keep) < cfg.min_labelled:
        return done(False, f'not enough labelled frames: {len(keep)} < min_labelled={cfg.min_labelled}')
    y = np.array([pos[labels[i]] for i in keep], np.int64)
    src = np.array([sources[i] for i in keep], dtype=object)
    eng = Engine(bundle, 'feature_extractor', num_threads=threads)
    imgs = np.asarray(images)[keep]
    xs = eng.prepare_batch(imgs if stats_images is None else np.asarray(stats_images))
    if len(xs) > MAX_STATS_FRAMES:
        xs = xs[np.sort(np.random.default_rng(cfg.seed).choice(len(xs), MAX_STATS_FRAMES, replace=False))]
    if len(xs) < ttn.MIN_BATCH:
        return done(False, f'{len(xs)} frames are too few to estimate statistics (>= {ttn.MIN_BATCH})')
    try:
        model = ttn.adapted_backbone(bundle.files['backbone'], ttn.load_norm_stats(bundle.path('norm_stats')),
                                     xs, threads)
    except ttn.TTNError as e:
        return done(False, f'no adapted backbone: {e}')
    metrics['stats_frames'] = int(len(xs))
    new_eng = Engine(bundle, 'feature_extractor', num_threads=threads, backbone=model)
    old_eng = eng if current_backbone is None else Engine(bundle, 'feature_extractor', num_threads=threads,
                                                          backbone=current_backbone)
    f_new, f_old = new_eng.features_batch(imgs), old_eng.features_batch(imgs)
    al, anchor_imgs = bundle.anchor[1], bundle.anchor_images
    a_new_f, a_old_f = new_eng.features_batch(anchor_imgs), old_eng.features_batch(anchor_imgs)

    trusted = src != 'self'
    tr, ho = stratified_split(y, cfg.holdout_fraction, cfg.seed, eligible=trusted)
    metrics.update(n_labelled=int(len(y)), n_train=int(len(tr)), n_holdout=int(len(ho)))
    if len(ho) < cfg.min_holdout:
        return done(False, f'only {len(ho)} trusted holdout frames (< {cfg.min_holdout})')
    if len(np.unique(y[tr])) < 2:
        return done(False, 'training frames cover fewer than 2 classes')
    # anchor halves as the head round splits them: replay the one, check on the other
    if cfg.anchor_replay > 0 and len(al) >= 4:
        check, replay = stratified_split(al, 0.5, cfg.seed + 1)
    else:
        check, replay = np.arange(len(al)), np.zeros(0, np.int64)
    C = len(bundle.class_names)

    def fit(idx):
        X, yy = f_new[idx], y[idx]
        w = class_weights(yy, C, cfg.class_balanced)
        w = w / w.sum()
        if len(replay):
            rw = class_weights(al[replay], C, cfg.class_balanced)
            w = np.concatenate([w, cfg.anchor_replay * rw / rw.sum()])
            X, yy = np.concatenate([X, a_new_f[replay]]), np.concatenate([yy, al[replay]])
        return train_head(X, yy, current_head, class_names=bundle.class_names, l2_to_prior=cfg.l2_to_prior,
                          class_balanced=False, iters=cfg.iters, seed=cfg.seed, sample_weight=w)

    try:
        new = fit(tr)
    except ValueError as e:
        return done(False, f'training failed: {e}')
    h_old, h_new = accuracy(current_head, f_old[ho], y[ho]), accuracy(new, f_new[ho], y[ho])
    a_old = accuracy(current_head, a_old_f[check], al[check])
    a_new = accuracy(new, a_new_f[check], al[check])
    metrics.update(holdout_acc_old=round(h_old, 4), holdout_acc_new=round(h_new, 4),
                   anchor_acc_old=round(a_old, 4), anchor_acc_new=round(a_new, 4),
                   n_anchor_check=int(len(check)),
                   normalised_only_holdout_acc=round(accuracy(current_head, f_new[ho], y[ho]), 4))
    if not h_new >= h_old + cfg.margin - 1e-9:
        return done(False, f'adapted backbone: holdout accuracy {h_old:.3f} -> {h_new:.3f} does not improve '
                           f'by margin {cfg.margin:.3f}', new, model)
    if a_old - a_new > cfg.anchor_tolerance + 1e-9:
        return done(False, f'adapted backbone: anchor accuracy drops {a_old:.3f} -> {a_new:.3f} (more than '
                           f'anchor_tolerance {cfg.anchor_tolerance:.3f})', new, model)
    reason = (f'adapted backbone: holdout accuracy {h_old:.3f} -> {h_new:.3f}, anchor {a_old:.3f} -> '
              f'{a_new:.3f}')
    if cfg.refit_after_accept:
        refit = fit(np.arange(len(y)))
        a_ref = accuracy(refit, a_new_f[check], al[check])
        if a_old - a_ref <= cfg.anchor_tolerance + 1e-9:
            metrics['refit'] = {'used': True, 'n_train': int(len(y)), 'anchor_acc': round(a_ref, 4)}
            return done(True, f'{reason}; refit on all {len(y)} labelled frames', refit, model)
        metrics['refit'] = {'used': False, 'why': f'anchor accuracy {a_old:.3f} -> {a_ref:.3f}'}
    return done(True, reason, new, model)


def choose(head_result: RoundResult | None, backbone_result: RoundResult | None) -> RoundResult:
    """The round's decision between the head-only and the backbone candidate: the accepted one with the
    larger holdout gain (each measured against the deployed pair on its own holdout); the head result when
    neither is accepted. The other candidate's summary goes into ``metrics['other_candidate']``."""
    if backbone_result is None:
        return head_result
    if head_result is None:
        return backbone_result

    def gain(r):
        m = r.metrics
        if not r.accepted or m.get('holdout_acc_new') is None or m.get('holdout_acc_old') is None:
            return None
        return m['holdout_acc_new'] - m['holdout_acc_old']

    gh, gb = gain(head_result), gain(backbone_result)
    pick, other = (backbone_result, head_result) if gb is not None and (gh is None or gb > gh) \
        else (head_result, backbone_result)
    keys = ('holdout_acc_old', 'holdout_acc_new', 'anchor_acc_old', 'anchor_acc_new')
    pick.metrics['other_candidate'] = {'kind': other.metrics.get('kind', 'head'), 'accepted': other.accepted,
                                       'reason': other.reason, **{k: other.metrics.get(k) for k in keys}}
    pick.metrics.setdefault('kind', 'head')
    return pick
