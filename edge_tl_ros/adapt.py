"""On-robot adaptation rounds: which frames to keep, how to label them, when to accept a new head.

No ROS in here (the adaptation node is a thin wrapper). A *round* takes the labelled frames of the
:class:`~edge_tl_ros.store.FrameStore` (or arrays), splits them into train/holdout (stratified,
deterministic), trains a head with :func:`~edge_tl_ros.headtrain.train_head` regularised toward the
current head (optionally replaying half of the bundle's source-domain anchor set), and accepts it only if

- holdout accuracy improves: ``new >= old + margin``, and
- the anchor set (the other half of ``bundle.anchor``) does not get worse by more than ``anchor_tolerance``.

Otherwise the current head stays and :class:`RoundResult` says why. :meth:`Adapter.commit` writes an
accepted head through :meth:`HeadRegistry.add` (atomic). A round never writes anything by itself: a
rejected, failed or killed round leaves the disk untouched.

:func:`run_round_in_subprocess` runs a round in a fresh ``spawn`` process (niced, BLAS/ORT threads
bounded, killed with its parent) so the perception node's latency does not suffer; the adaptation node
calls it from a worker thread. :class:`TeacherLabeler` pseudo-labels stored crops with a (bigger)
teacher bundle, in that worker process, in small batches at low priority.
"""

from __future__ import annotations

import math
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

from .bundle import MAX_CLASSES, Head, HeadRegistry, ModelBundle, check_class_name
from .headtrain import accuracy, class_weights, train_head
from .store import LABEL_SOURCES, FrameStore, StoreArrays

POLICIES = ('informative', 'uniform')


@dataclass
class AdaptConfig:
    """Knobs of an adaptation round (the node maps its parameters onto these)."""

    min_labelled: int = 30  # labelled frames needed before a round is attempted
    holdout_fraction: float = 0.3  # of the trusted (topic/teacher) labels, per class
    margin: float = 0.02  # holdout accuracy must improve by at least this much
    anchor_tolerance: float = 0.05  # max allowed drop of anchor-set accuracy
    l2_to_prior: float = 1e-2  # pull toward the current head (standardised feature units)
    label_sources: tuple = ('topic', 'teacher')  # which labels a round may use
    self_label_threshold: float = 0.95  # student confidence needed for a 'self' pseudo-label
    teacher_min_confidence: float = 0.7  # confidence needed for a 'teacher' pseudo-label
    teacher_student_ensemble: bool = True  # pseudo-label from teacher x student (geometric mean of probs)
    teacher_test_time_norm: bool = True  # teacher normalises with robot-frame batch statistics (ttn.py)
    teacher_batch_size: int = 64  # frames per test-time-norm batch of the teacher (memory ~ batch)
    student_test_time_norm: bool = True  # ensemble's student side: the bundle's student, re-normalised too
    allow_new_classes: bool = False  # labels naming classes the head does not know add classes
    seed: int = 0
    anchor_replay: float = 0.5  # total weight of replayed anchor samples relative to local ones; 0 = off
    class_balanced: bool = True
    iters: int = 200  # L-BFGS iterations (converges far earlier on typical data)
    min_holdout: int = 3  # fewer trusted holdout frames than this: reject (cannot validate)
    refit_after_accept: bool = True  # accepted: retrain the recipe on ALL labelled frames (holdout too)

    def __post_init__(self):
        self.label_sources = tuple(str(s) for s in self.label_sources)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        checks = [
            (self.min_labelled >= 2, 'min_labelled must be >= 2'),
            (0.05 <= self.holdout_fraction <= 0.9, 'holdout_fraction must be in [0.05, 0.9]'),
            (-1.0 <= self.margin <= 1.0, 'margin must be in [-1, 1]'),
            (0.0 <= self.anchor_tolerance <= 1.0, 'anchor_tolerance must be in [0, 1]'),
            (self.l2_to_prior >= 0 and math.isfinite(self.l2_to_prior), 'l2_to_prior must be >= 0'),
            (len(self.label_sources) > 0, 'label_sources must name at least one source'),
            (set(self.label_sources) <= set(LABEL_SOURCES),
             f'label_sources must be a subset of {list(LABEL_SOURCES)}, got {list(self.label_sources)}'),
            (0.0 <= self.self_label_threshold <= 1.0, 'self_label_threshold must be in [0, 1]'),
            (0.0 <= self.teacher_min_confidence <= 1.0, 'teacher_min_confidence must be in [0, 1]'),
            (self.anchor_replay >= 0, 'anchor_replay must be >= 0'),
            (self.iters >= 1, 'iters must be >= 1'),
            (self.min_holdout >= 1, 'min_holdout must be >= 1'),
            (16 <= self.teacher_batch_size <= 4096, 'teacher_batch_size must be in [16, 4096]'),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class RoundResult:
    accepted: bool
    reason: str
    head: Head | None = None  # the trained head (accepted or not); unsaved, version = base version
    metrics: dict = field(default_factory=dict)
    teacher_labels: dict = field(default_factory=dict)  # stamp_ns -> class name, for the store
    failed: bool = False  # the round could not run (error, killed worker, timeout)

    def summary(self) -> dict:
        """JSON-friendly description (no arrays)."""
        return {'accepted': self.accepted, 'reason': self.reason, 'failed': self.failed,
                'metrics': self.metrics}


@dataclass
class LabelledData:
    """What a round trains/validates on, after label-source filtering and self-labelling."""

    features: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] int64 indices into class_names
    sources: np.ndarray  # [N] str
    stamps: np.ndarray  # [N] int64
    class_names: tuple[str, ...]
    new_classes: tuple[str, ...] = ()
    dropped_unknown: int = 0


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def stratified_split(labels: np.ndarray, fraction: float, seed: int, eligible: np.ndarray | None = None):
    """Deterministic per-class split -> (train_idx, holdout_idx).

    Only ``eligible`` samples may go to the holdout; a class with a single eligible sample stays in train.
    """
    labels = np.asarray(labels)
    eligible = np.ones(len(labels), bool) if eligible is None else np.asarray(eligible, bool)
    rng = np.random.default_rng(seed)
    hold = []
    for c in np.unique(labels):
        idx = np.flatnonzero((labels == c) & eligible)
        if len(idx) < 2:
            continue
        idx = rng.permutation(idx)
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1), len(idx) - 1)
        hold.extend(idx[:k].tolist())
    hold_mask = np.zeros(len(labels), bool)
    hold_mask[hold] = True
    return np.flatnonzero(~hold_mask), np.flatnonzero(hold_mask)


class Adapter:
    """Selection, labelling and accept/reject logic of adaptation rounds for one bundle."""

    def __init__(self, bundle: ModelBundle, registry: HeadRegistry | None, config: AdaptConfig | None = None):
        self.bundle = bundle
        self.registry = registry
        self.config = config or AdaptConfig()
        self.config.validate()
        self._rng = np.random.default_rng(self.config.seed)
        self._score_ema: float | None = None

    # -- selection -------------------------------------------------------------------------------------
    def informativeness(self, probs: np.ndarray, teacher_probs: np.ndarray | None = None) -> np.ndarray:
        """Score in [0, 1] per frame: 1 - (top1 - top2) of the student; 1 where the teacher disagrees."""
        p = np.atleast_2d(np.asarray(probs, np.float32))
        if p.shape[1] >= 2:
            part = -np.partition(-p, 1, axis=1)
            score = 1.0 - (part[:, 0] - part[:, 1])
        else:
            score = 1.0 - p[:, 0]
        if teacher_probs is not None:
            t = np.atleast_2d(np.asarray(teacher_probs, np.float32))
            disagree = np.argmax(t, axis=1) != np.argmax(p, axis=1)
            score = np.where(disagree, 1.0, score)
        return np.clip(score, 0.0, 1.0)

    def select(self, features: np.ndarray | None, probs: np.ndarray, teacher_probs: np.ndarray | None = None,
               policy: str = 'informative', rate: float = 0.5) -> np.ndarray:
        """Decide which frames to keep -> bool mask ``[N]``; on average about ``rate`` of the frames.

        ``uniform`` keeps each frame with probability ``rate``. ``informative`` keeps frames with
        probability proportional to :meth:`informativeness` (normalised by its running mean, so the
        average rate holds on a stream), with a floor of ``rate / 10`` so confident frames still appear.
        ``features`` are accepted for API stability (diversity-based policies); unused here.
        """
        del features
        if policy not in POLICIES:
            raise ValueError(f'unknown selection policy {policy!r}; choose one of {list(POLICIES)}')
        rate = float(min(max(rate, 0.0), 1.0))
        p = np.atleast_2d(np.asarray(probs, np.float32))
        n = p.shape[0]
        if policy == 'uniform':
            keep_p = np.full(n, rate)
        else:
            s = self.informativeness(p, teacher_probs)
            m = float(s.mean())
            self._score_ema = m if self._score_ema is None else 0.95 * self._score_ema + 0.05 * m
            ref = max(self._score_ema, 1e-3)
            keep_p = np.clip(np.maximum(rate * s / ref, rate * 0.1), 0.0, 1.0)
        return self._rng.random(n) < keep_p

    # -- labelled data ---------------------------------------------------------------------------------
    def gather(self, data, current_head: Head) -> LabelledData:
        """Labelled frames allowed by ``config.label_sources`` as training arrays.

        ``data`` is a :class:`FrameStore`, :class:`StoreArrays`, or ``(features, labels, sources)`` where
        labels are class names (or indices into the head's classes) and sources label-source strings.
        With ``'self'`` allowed, unlabelled store entries whose student confidence is at least
        ``self_label_threshold`` get their student top class as a ``self`` label.
        """
        cfg = self.config
        D = current_head.feature_size
        if isinstance(data, FrameStore):
            data = data.entries(labelled_only='self' not in cfg.label_sources, feature_size=D)
        if isinstance(data, StoreArrays):
            feats = data.features
            names, sources = list(data.labels), list(data.sources)
            if 'self' in cfg.label_sources:
                for i, lab in enumerate(names):
                    if lab is None and data.conf[i] >= cfg.self_label_threshold \
                            and 0 <= data.top[i] < current_head.num_classes:
                        names[i], sources[i] = current_head.class_names[data.top[i]], 'self'
            stamps = data.stamps
        else:
            feats, labs, sources = data
            feats = np.asarray(feats, np.float32)
            labs = list(labs)
            names = [current_head.class_names[int(v)] if isinstance(v, (int, np.integer)) else
                     (None if v is None else str(v)) for v in labs]
            sources = [str(s) for s in sources]
            stamps = np.arange(len(names), dtype=np.int64)
        if len(feats) and feats.shape[1] != D:
            raise ValueError(f'stored features have {feats.shape[1]} dims, the head expects {D}')
        keep = [i for i, (n, s) in enumerate(zip(names, sources)) if n is not None and s in cfg.label_sources]
        class_names = list(current_head.class_names)
        known = set(class_names)
        unknown = sorted({names[i] for i in keep} - known)
        dropped = 0
        if unknown and cfg.allow_new_classes:
            # a new class needs a valid name and room under the bound; labels of the others are dropped
            unknown = [c for c in unknown if check_class_name(c) is None][:max(0, MAX_CLASSES - len(known))]
            class_names += unknown
            known |= set(unknown)
        if any(names[i] not in known for i in keep):
            before = len(keep)
            keep = [i for i in keep if names[i] in known]
            dropped = before - len(keep)
        pos = {c: k for k, c in enumerate(class_names)}
        return LabelledData(
            features=np.asarray(feats, np.float32)[keep] if keep else np.zeros((0, D), np.float32),
            labels=np.array([pos[names[i]] for i in keep], np.int64),
            sources=np.array([sources[i] for i in keep], dtype=object),
            stamps=np.asarray(stamps, np.int64)[keep] if keep else np.zeros(0, np.int64),
            class_names=tuple(class_names),
            new_classes=tuple(unknown) if cfg.allow_new_classes else (),
            dropped_unknown=dropped)

    # -- a round ---------------------------------------------------------------------------------------
    def _anchor_split(self):
        """(replay features, replay labels, check features, check labels) from the bundle's anchor set."""
        anchor = self.bundle.anchor
        if anchor is None or len(anchor[1]) == 0:
            return None, None, None, None
        af, al = anchor
        if self.config.anchor_replay > 0 and len(al) >= 4:
            check_idx, replay_idx = stratified_split(al, 0.5, self.config.seed + 1)
            return af[replay_idx], al[replay_idx], af[check_idx], al[check_idx]
        return None, None, af, al

    def run_round(self, data, current_head: Head | None = None) -> RoundResult:
        """Train a candidate head on local labelled data and decide whether to accept it (writes nothing).

        The candidate trains on the labelled frames minus a per-class holdout and must beat the current
        head there by ``margin`` without losing more than ``anchor_tolerance`` on the anchor set. Once it
        is accepted, ``refit_after_accept`` retrains the same recipe on every labelled frame and returns
        that head (``metrics['refit']``), unless it fails the anchor check.
        """
        t0 = time.perf_counter()
        cfg = self.config
        if current_head is None:
            if self.registry is None:
                current_head = self.bundle.head
            else:
                current_head, _ = self.registry.load_current_or_fallback()
        ld = self.gather(data, current_head)
        counts = {s: int(np.sum(ld.sources == s)) for s in LABEL_SOURCES}
        metrics = {'base_version': current_head.version, 'n_labelled': int(len(ld.labels)),
                   'label_counts': counts, 'dropped_unknown_class': ld.dropped_unknown,
                   'new_classes': list(ld.new_classes), 'label_sources': list(cfg.label_sources)}

        def done(accepted, reason, head=None):
            metrics['seconds'] = round(time.perf_counter() - t0, 4)
            for k, v in list(metrics.items()):
                if isinstance(v, float):
                    metrics[k] = _nan_to_none(v)
            return RoundResult(accepted, reason, head, metrics)

        if len(ld.labels) < cfg.min_labelled:
            extra = f' ({ld.dropped_unknown} had unknown classes)' if ld.dropped_unknown else ''
            return done(False, f'not enough labelled frames: {len(ld.labels)} < '
                               f'min_labelled={cfg.min_labelled}{extra}')
        trusted = ld.sources != 'self'  # self labels echo the current head: train only, never validate
        tr, ho = stratified_split(ld.labels, cfg.holdout_fraction, cfg.seed, eligible=trusted)
        metrics.update(n_train=int(len(tr)), n_holdout=int(len(ho)),
                       class_counts={ld.class_names[c]: int(n) for c, n in
                                     zip(*np.unique(ld.labels, return_counts=True))})
        if len(ho) < cfg.min_holdout:
            return done(False, f'only {len(ho)} trusted holdout frames (< {cfg.min_holdout}); '
                               'need more topic/teacher labels to validate a new head')
        if len(np.unique(ld.labels[tr])) < 2 and not ld.new_classes:
            return done(False, 'training frames cover fewer than 2 classes')

        rf, rl, cf, cl = self._anchor_split()

        def fit(idx, info=None):
            """The round's recipe on local frames ``idx`` (+ anchor replay) -> head."""
            X, y = ld.features[idx], ld.labels[idx]
            w = class_weights(y, len(ld.class_names), cfg.class_balanced)
            w = w / w.sum()
            if rf is not None:
                rw = class_weights(rl, len(ld.class_names), cfg.class_balanced)
                w = np.concatenate([w, cfg.anchor_replay * rw / rw.sum()])
                X, y = np.concatenate([X, rf]), np.concatenate([y, rl])
            return train_head(X, y, current_head, class_names=ld.class_names, l2_to_prior=cfg.l2_to_prior,
                              class_balanced=False, iters=cfg.iters, seed=cfg.seed, sample_weight=w,
                              info=info)

        info: dict = {}
        try:
            new = fit(tr, info)
        except ValueError as e:
            return done(False, f'training failed: {e}')
        metrics['train'] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()}
        metrics['n_anchor_replay'] = 0 if rf is None else int(len(rl))

        hx, hy = ld.features[ho], ld.labels[ho]
        h_old, h_new = accuracy(current_head, hx, hy), accuracy(new, hx, hy)
        metrics.update(holdout_acc_old=round(h_old, 4), holdout_acc_new=round(h_new, 4))
        if cf is not None:
            a_old, a_new = accuracy(current_head, cf, cl), accuracy(new, cf, cl)
            metrics.update(anchor_acc_old=round(a_old, 4), anchor_acc_new=round(a_new, 4),
                           n_anchor_check=int(len(cl)))
        else:
            a_old = a_new = float('nan')
            metrics.update(anchor_acc_old=None, anchor_acc_new=None, n_anchor_check=0)

        if not h_new >= h_old + cfg.margin - 1e-9:
            return done(False, f'holdout accuracy {h_old:.3f} -> {h_new:.3f} does not improve by margin '
                               f'{cfg.margin:.3f}', new)
        if cf is not None and a_old - a_new > cfg.anchor_tolerance + 1e-9:
            return done(False, f'anchor accuracy drops {a_old:.3f} -> {a_new:.3f} (more than '
                               f'anchor_tolerance {cfg.anchor_tolerance:.3f}): the head would forget the '
                               'source domain', new)
        note = '' if cf is not None else ' (bundle has no anchor set: forgetting not checked)'
        reason = f'holdout accuracy {h_old:.3f} -> {h_new:.3f}' + (
            f', anchor {a_old:.3f} -> {a_new:.3f}' if cf is not None else '') + note
        if cfg.refit_after_accept:
            # the recipe is validated: its head from every labelled frame (the holdout too) is the better
            # estimate (bench.adaptation: +2.4 points of the gap at 500 frames). The anchor check still
            # guards it; should the refit forget the source domain, the validated head is kept.
            everything = np.arange(len(ld.labels))
            try:
                refit = fit(everything)
            except ValueError as e:
                refit, why = None, f'training failed: {e}'
            a_ref = accuracy(refit, cf, cl) if refit is not None and cf is not None else float('nan')
            if refit is not None and (cf is None or a_old - a_ref <= cfg.anchor_tolerance + 1e-9):
                metrics['refit'] = {'used': True, 'n_train': int(len(everything)),
                                    'anchor_acc': None if cf is None else round(a_ref, 4)}
                return done(True, f'{reason}; refit on all {len(everything)} labelled frames', refit)
            if refit is not None:
                why = f'anchor accuracy {a_old:.3f} -> {a_ref:.3f}'
            metrics['refit'] = {'used': False, 'why': why}
        return done(True, reason, new)

    def commit(self, result: RoundResult) -> Head:
        """Write an accepted round's head as the registry's next (current) version; returns it."""
        if not result.accepted or result.head is None:
            raise ValueError(f'refusing to commit a round that was not accepted ({result.reason})')
        if self.registry is None:
            raise ValueError('no head registry to commit to')
        metrics = dict(result.metrics)
        metrics['reason'] = result.reason
        return self.registry.add(result.head, metrics)


# -- teacher pseudo-labels ---------------------------------------------------------------------------------
class TeacherLabeler:
    """Pseudo-label stored crops with a teacher bundle (ORT, feature_extractor mode, low priority).

    With ``test_time_norm`` (and ``norm_stats.npz`` in the teacher bundle) the teacher normalises its
    activations with the statistics of each batch of robot frames (:mod:`edge_tl_ros.ttn`): under a
    domain shift its labels are then markedly more accurate. Batches are shuffled mixes of at least
    ``ttn_batch_size`` frames, padded with other stored crops when few frames need labels. Without
    norm stats (or the onnx package) it labels plainly and says why in ``note``.
    """

    def __init__(self, teacher_bundle_path, num_threads: int = 1, batch_size: int = 16,
                 test_time_norm: bool = False, ttn_batch_size: int = 64):
        from .bundle import load_bundle
        from .engine import Engine

        self.bundle = load_bundle(teacher_bundle_path)
        self.engine = Engine(self.bundle, mode='feature_extractor', num_threads=num_threads,
                             low_priority=True)
        self.batch_size = max(1, int(batch_size))
        self.ttn = None
        self.ttn_batch_size = max(1, int(ttn_batch_size))
        self.note: str | None = None
        self.last_mode: str | None = None  # how the last probs() call labelled ('plain' with too few frames)
        if test_time_norm:
            from .ttn import TestTimeNormSession, TTNError, load_norm_stats

            stats_path = self.bundle.path('norm_stats')
            if stats_path is None:
                self.note = (f'teacher bundle {self.bundle.name} has no norm_stats.npz (add it with '
                             '`edge-tl norm-stats`): plain teacher labels')
            else:
                try:
                    self.ttn = TestTimeNormSession(self.bundle.files['backbone'], load_norm_stats(stats_path),
                                                   threads=num_threads)
                    self.ttn_batch_size = max(self.ttn_batch_size, self.ttn.min_batch)
                except TTNError as e:
                    self.note = f'test-time normalisation unavailable ({e}): plain teacher labels'

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.engine.head.class_names

    @property
    def mode(self) -> str:
        return 'test_time_norm' if self.ttn is not None else 'plain'

    def _probs_ttn(self, images_rgb: np.ndarray, context_rgb: np.ndarray | None) -> np.ndarray:
        from .engine import softmax
        from .ttn import balanced_batches

        n = len(images_rgb)
        head = self.engine.head
        probs = np.zeros((n, head.num_classes), np.float32)
        for idx in balanced_batches(n, self.ttn_batch_size):
            x = self.engine.prepare_batch(images_rgb[idx], order='rgb')
            short = self.ttn_batch_size - len(idx)
            if short > 0 and context_rgb is not None and len(context_rgb):
                pad = self.engine.prepare_batch(context_rgb[:short], order='rgb')
                x = np.concatenate([x, pad])
            probs[idx] = softmax(head.logits(self.ttn.features(x)[:len(idx)]))
        return probs

    def probs(self, images_rgb: np.ndarray, context_rgb: np.ndarray | None = None) -> np.ndarray:
        """Teacher class probabilities ``[N,C]`` for RGB images ``[N,H,W,3]`` (any size).

        ``context_rgb``: other frames of the same domain that only fill up small test-time-norm batches.
        """
        self.last_mode = 'plain'
        if self.ttn is not None:
            avail = len(images_rgb) + (0 if context_rgb is None else len(context_rgb))
            if avail >= self.ttn.min_batch:
                self.last_mode = 'test_time_norm'
                return self._probs_ttn(images_rgb, context_rgb)
        out = [self.engine.predict_batch(images_rgb[i:i + self.batch_size], order='rgb',
                                         batch_size=self.batch_size)
               for i in range(0, len(images_rgb), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.engine.head.num_classes), np.float32)

    def store_probs(self, store: FrameStore, max_frames: int | None = None,
                    stamps=None) -> tuple[np.ndarray, np.ndarray]:
        """Teacher probabilities for store entries without a topic/teacher label -> ``(stamps, probs)``.

        The round turns them into labels with :func:`pseudo_labels` and, when it ends, the node writes
        those with ``store.set_label(.., 'teacher')`` (so later rounds do not label them again).
        ``stamps`` instead names the entries to label (the student side of the ensemble labels exactly
        the teacher's frames).
        """
        arr = store.entries()
        if stamps is not None:
            todo = [int(s) for s in stamps]
        else:
            todo = [int(s) for s, src in zip(arr.stamps, arr.sources) if src not in ('topic', 'teacher')]
        if max_frames is not None:
            todo = todo[-int(max_frames):]
        C = self.engine.head.num_classes
        if not todo:
            return np.zeros(0, np.int64), np.zeros((0, C), np.float32)
        if self.ttn is not None:  # whole set at once: batches mix frames from the entire store
            imgs, found = store.crops(todo)
            context = None
            if len(found) < self.ttn_batch_size:
                have = {int(s) for s in found}
                others = [int(s) for s in arr.stamps[::-1] if int(s) not in have]
                context, _ = store.crops(others[:self.ttn_batch_size - len(found)])
            return np.asarray(found, np.int64), self.probs(imgs, context)
        stamps, probs = [], []
        for i in range(0, len(todo), self.batch_size):
            imgs, found = store.crops(todo[i:i + self.batch_size])
            if len(found):
                stamps.append(np.asarray(found, np.int64))
                probs.append(self.probs(imgs))
        if not stamps:
            return np.zeros(0, np.int64), np.zeros((0, C), np.float32)
        return np.concatenate(stamps), np.concatenate(probs)


def ensemble_probs(p_teacher: np.ndarray, p_student: np.ndarray) -> np.ndarray:
    """Product of experts: the normalised geometric mean of teacher and student class probabilities.

    A label wins only where both find it plausible; under a domain shift teacher and student make
    different mistakes, so the ensemble labels more frames right than either alone (bench.adaptation).
    """
    g = np.sqrt(np.clip(p_teacher, 1e-12, None) * np.clip(p_student, 1e-12, None))
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def pseudo_labels(stamps: np.ndarray, p_teacher: np.ndarray, teacher_classes, head: Head,
                  student_features: np.ndarray | None, cfg: AdaptConfig,
                  p_student: np.ndarray | None = None) -> tuple[dict[int, str], dict]:
    """Teacher pseudo-labels (stamp -> class name) and how they were made.

    With ``cfg.teacher_student_ensemble`` (and the same classes in teacher and head) the label is the
    top class of :func:`ensemble_probs` of the teacher and the student; otherwise the teacher's own.
    The student side is ``p_student`` when given (the round passes the bundle's student re-normalised
    to the robot frames, ``student_test_time_norm``), else the current head on the stored features.
    Only labels with confidence >= ``cfg.teacher_min_confidence`` are kept.
    """
    info = {'ensemble': False}
    probs = np.asarray(p_teacher, np.float32)
    classes = tuple(teacher_classes)
    if cfg.teacher_student_ensemble and len(probs):
        if classes != head.class_names:
            info['ensemble_note'] = 'teacher and head classes differ: teacher-only labels'
        elif p_student is not None and np.shape(p_student) == probs.shape:
            probs = ensemble_probs(probs, np.asarray(p_student, np.float32))
            info.update(ensemble=True, student='test_time_norm')
        elif student_features is None or len(student_features) != len(probs):
            info['ensemble_note'] = 'no stored features for these frames: teacher-only labels'
        else:
            from .engine import softmax

            probs = ensemble_probs(probs, softmax(head.logits(np.asarray(student_features, np.float32))))
            info.update(ensemble=True, student='current_head')
    top = np.argmax(probs, axis=1) if len(probs) else np.zeros(0, np.int64)
    conf = probs[np.arange(len(top)), top] if len(probs) else np.zeros(0, np.float32)
    keep = conf >= cfg.teacher_min_confidence
    info.update(candidates=int(len(probs)), kept=int(keep.sum()))
    return {int(s): classes[t] for s, t, k in zip(stamps, top, keep) if k}, info


def student_norm_probs(bundle, store: FrameStore, stamps, head: Head, cfg: AdaptConfig,
                       threads: int = 1) -> tuple[np.ndarray | None, str | None]:
    """The student side of the labelling ensemble: the bundle's own student (backbone + bundle head)
    re-normalised to the robot frames like the teacher (AdaBN on its conv activations, :mod:`ttn`).

    -> ``(probs [N,C] for stamps, None)``, or ``(None, why)`` when it cannot: no ``norm_stats.npz`` in
    the bundle, fewer frames than a normalisation batch needs, or the current head has other classes
    (then :func:`pseudo_labels` uses the current head on the stored features). Only labels use it: the
    robot's backbone and the head that is trained stay as they are (bench.adaptation: +2.6 points of
    the gap at 500 frames, every shift up).
    """
    if tuple(bundle.class_names) != tuple(head.class_names):
        return None, 'the current head has classes the bundle lacks: the current head is the student side'
    try:
        labeler = TeacherLabeler(bundle.root, num_threads=threads, test_time_norm=True,
                                 ttn_batch_size=cfg.teacher_batch_size)
    except (OSError, ValueError) as e:
        return None, f'student re-normalisation unavailable ({" ".join(str(e).split())})'
    if labeler.mode != 'test_time_norm':
        return None, labeler.note
    found, probs = labeler.store_probs(store, stamps=stamps)
    if labeler.last_mode != 'test_time_norm':
        return None, f'{len(found)} frames are too few to re-normalise the student'
    if len(found) != len(stamps) or not np.array_equal(found, np.asarray(stamps, np.int64)):
        return None, 'some frames have no stored crop: the current head is the student side'
    return probs, None


def overlay_labels(arr: StoreArrays, labels: dict[int, str], source: str = 'teacher') -> StoreArrays:
    """A copy of ``arr`` with ``labels`` applied where no more trusted label exists (topic wins)."""
    from .store import SOURCE_RANK

    names, sources = list(arr.labels), list(arr.sources)
    for i, s in enumerate(arr.stamps):
        lab = labels.get(int(s))
        if lab is not None and SOURCE_RANK.get(sources[i], 0) <= SOURCE_RANK[source]:
            names[i], sources[i] = lab, source
    return StoreArrays(arr.stamps, arr.features, arr.probs, arr.top, arr.conf, names, sources, arr.created)


# -- the round in a separate process ----------------------------------------------------------------------
_ENV_LOCK = threading.Lock()
_THREAD_VARS = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')


def _worker_init(nice_level: int, threads: int) -> None:
    """Initializer of the round process: lower priority, bound BLAS threads, die with the parent.

    ``nice_level`` is the niceness the worker must have (absolute); it normally inherited it already
    from the thread that started it (see :func:`_start_niced`)."""
    if nice_level:
        try:
            now = _current_nice()
            if now < nice_level:
                os.nice(int(nice_level) - now)
        except OSError:
            pass
    from .engine import limit_threads

    limit_threads(threads)
    try:  # Linux: SIGKILL this worker when the node process dies (no orphaned rounds)
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _current_nice() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError):
        return 0


def _sched_policy_name() -> str:
    try:
        return {getattr(os, 'SCHED_IDLE', -1): 'idle', getattr(os, 'SCHED_BATCH', -1): 'batch'}.get(
            os.sched_getscheduler(0), 'other')
    except (OSError, AttributeError):
        return 'unknown'


def _start_niced(proc, nice: int, threads: int, sched_idle: bool = False) -> None:
    """Start ``proc`` (a ``spawn`` process) already at niceness ``nice`` and with ``threads`` BLAS threads.

    On Linux niceness is per thread and a new process inherits it from the thread that starts it, so a
    short-lived thread lowers its own priority and starts the process: the interpreter start-up and the
    imports (the costly part of a round on a small CPU) then run niced too, not just the training. An
    unprivileged thread cannot raise its priority again, hence the throwaway thread. BLAS reads its
    thread count at import: the spawned interpreter gets these variables at exec time.

    ``sched_idle``: the Linux ``SCHED_IDLE`` policy as well (also inherited): the worker then runs only on
    CPU time nothing else wants, and any normal thread that wakes up preempts it at once."""
    err: list[BaseException] = []

    def start():
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except (OSError, AttributeError):
            pass  # the worker nices itself in _worker_init
        if sched_idle:
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except (OSError, AttributeError):
                pass  # not Linux: niceness only
        try:
            with _ENV_LOCK:
                saved = {k: os.environ.get(k) for k in _THREAD_VARS}
                os.environ.update({k: str(int(threads)) for k in _THREAD_VARS})
                try:
                    proc.start()
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            err.append(e)

    t = threading.Thread(target=start, name='edge_tl_spawn_niced', daemon=True)
    t.start()
    t.join()
    if err:
        raise err[0]


def _round_job(job: dict) -> RoundResult:
    from .bundle import load_bundle

    startup = time.time() - job['spawned_at'] if job.get('spawned_at') else None
    t0 = time.perf_counter()
    bundle = load_bundle(job['bundle_path'], check_onnx=False)
    registry = HeadRegistry(bundle, job['state_dir'])
    if job.get('base_version') is None:
        head, _ = registry.load_current_or_fallback()
    else:
        head = registry.load(job['base_version'])
    cfg = AdaptConfig(**job['config'])
    store = FrameStore(job['store_root'], readonly=True)
    arr = store.entries(feature_size=head.feature_size)
    t_load = time.perf_counter() - t0
    teacher_labels: dict[int, str] = {}
    if job.get('teacher_bundle') and 'teacher' in cfg.label_sources:
        labeler = TeacherLabeler(job['teacher_bundle'], num_threads=job.get('threads', 1),
                                 test_time_norm=cfg.teacher_test_time_norm,
                                 ttn_batch_size=cfg.teacher_batch_size)
        stamps, p_teacher = labeler.store_probs(store, max_frames=job.get('teacher_max_frames'))
        row = {int(s): i for i, s in enumerate(arr.stamps)}
        feats = (arr.features[[row[int(s)] for s in stamps]] if all(int(s) in row for s in stamps)
                 else None)
        p_student, student_note = None, None
        if cfg.teacher_student_ensemble and cfg.student_test_time_norm and len(stamps):
            p_student, student_note = student_norm_probs(bundle, store, stamps, head, cfg,
                                                         job.get('threads', 1))
        teacher_labels, how = pseudo_labels(stamps, p_teacher, labeler.class_names, head, feats, cfg,
                                            p_student=p_student)
        teacher_info = {'mode': labeler.mode, 'labels': len(teacher_labels), 'note': labeler.note, **how}
        if student_note:
            teacher_info['student_note'] = student_note
        arr = overlay_labels(arr, teacher_labels)
    else:
        teacher_info = None
    result = Adapter(bundle, registry, cfg).run_round(arr, head)
    result.teacher_labels = teacher_labels
    result.metrics['teacher'] = teacher_info
    result.metrics['worker'] = {'pid': os.getpid(), 'nice': os.nice(0),
                                'nice_at_start': job.get('nice_at_start'),
                                'sched_policy': job.get('sched_policy'),
                                'load_seconds': round(t_load, 3),
                                'startup_seconds': None if startup is None else round(startup, 3),
                                'job_seconds': round(time.perf_counter() - t0, 3),
                                'blas_threads': os.environ.get('OPENBLAS_NUM_THREADS'),
                                'teacher_labels': len(teacher_labels)}
    return result


def _round_worker(conn, nice_level: int, threads: int, job: dict) -> None:
    try:
        job['nice_at_start'] = _current_nice()  # before _worker_init: inherited from the starting thread
        job['sched_policy'] = _sched_policy_name()
        _worker_init(nice_level, threads)
        r = _round_job(job)
        head = None if r.head is None else (np.asarray(r.head.weight), np.asarray(r.head.bias),
                                            r.head.class_names, r.head.version)
        payload = ('ok', {'accepted': r.accepted, 'reason': r.reason, 'metrics': r.metrics,
                          'teacher_labels': r.teacher_labels, 'head': head})
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        payload = ('error', f'{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}')
    try:
        conn.send(payload)
    finally:
        conn.close()


def run_round_in_subprocess(bundle_path, state_dir, store_root, config: AdaptConfig,
                            base_version: int | None = None, teacher_bundle: str | None = None,
                            nice_level: int = 10, threads: int = 1, timeout_s: float = 600.0,
                            cancel: threading.Event | None = None, on_start=None,
                            teacher_max_frames: int | None = None, sched_idle: bool = False) -> RoundResult:
    """Run one round in a fresh ``spawn`` process and return its :class:`RoundResult` (nothing is written).

    The worker is niced by ``nice_level`` (and scheduled ``SCHED_IDLE`` if ``sched_idle``) from its first
    instruction, limited to ``threads`` BLAS/ONNX Runtime threads, and dies with its parent. A crash, kill,
    ``timeout_s`` or ``cancel`` gives ``RoundResult(failed=True)``. ``on_start(pid)`` is called once the
    worker runs (for status reporting and tests).
    """
    import multiprocessing as mp

    config.validate()
    job = {'bundle_path': str(bundle_path), 'state_dir': str(state_dir), 'store_root': str(store_root),
           'config': asdict(config), 'base_version': base_version,
           'teacher_bundle': str(teacher_bundle) if teacher_bundle else None, 'threads': int(threads),
           'teacher_max_frames': teacher_max_frames}
    ctx = mp.get_context('spawn')
    recv, send = ctx.Pipe(duplex=False)
    target_nice = min(19, _current_nice() + max(0, int(nice_level)))
    proc = ctx.Process(target=_round_worker, args=(send, target_nice, int(threads), job), daemon=True,
                       name='edge_tl_adapt_round')
    t0 = time.monotonic()
    t_spawn = time.time()
    job['spawned_at'] = t_spawn
    _start_niced(proc, target_nice, threads, sched_idle)
    send.close()
    if on_start is not None:
        on_start(proc.pid)

    def failed(reason, detail=None):
        m = {'seconds': round(time.monotonic() - t0, 4)}
        if detail:
            m['error'] = detail
        return RoundResult(False, reason, None, m, failed=True)

    try:
        while True:
            if recv.poll(0.1):
                try:
                    status, payload = recv.recv()
                except (EOFError, OSError):
                    proc.join(5)
                    return failed(f'round process died (exit code {proc.exitcode})')
                break
            if not proc.is_alive():
                if recv.poll(0):
                    continue
                return failed(f'round process died (exit code {proc.exitcode})')
            if cancel is not None and cancel.is_set():
                return failed('round cancelled')
            if time.monotonic() - t0 > timeout_s:
                return failed(f'round timed out after {timeout_s:.0f} s')
    finally:
        if proc.is_alive():
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
        recv.close()
    if status != 'ok':
        return failed(f'round failed in worker: {payload.splitlines()[0]}', payload)
    head = None
    if payload['head'] is not None:
        w, b, names, ver = payload['head']
        head = Head(w, b, names, ver)
    teacher = {int(k): v for k, v in payload['teacher_labels'].items()}
    return RoundResult(payload['accepted'], payload['reason'], head, payload['metrics'], teacher)
