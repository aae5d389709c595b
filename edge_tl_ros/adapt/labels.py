"""Pseudo-labels for robot frames: one labelling function, called by the round and by bench.adaptation.

:func:`pseudo_labels` takes RGB frames and returns a class name (or None) per frame: the teacher's
probabilities, combined with the student's (:func:`ensemble_probs`; the student side is the bundle's own
student re-normalised to the robot frames, :mod:`edge_tl_ros.ttn`, or the current head on the stored
features), cut at ``teacher_min_confidence``. :func:`label_store` applies it to the frame store's
unlabelled entries inside the round's worker process. No ROS in here.
"""

from __future__ import annotations

import numpy as np

from ..bundle import Head
from ..store import SOURCE_RANK, FrameStore, StoreArrays
from .config import AdaptConfig


class LabelModel:
    """A bundle run to label robot frames (ORT, feature_extractor mode, low priority): the teacher, or the
    student side of the teacher x student ensemble.

    With ``test_time_norm`` (and ``norm_stats.npz`` in the teacher bundle) the teacher normalises its
    activations with the statistics of each batch of robot frames (:mod:`edge_tl_ros.ttn`): under a
    domain shift its labels are then markedly more accurate. Batches are shuffled mixes of at least
    ``ttn_batch_size`` frames, padded with other frames of the same domain (``context``) when few frames
    need labels. Without norm stats (or the onnx package) it labels plainly and says why in ``note``.
    """

    def __init__(self, bundle_path, num_threads: int = 1, batch_size: int = 16,
                 test_time_norm: bool = False, ttn_batch_size: int = 64):
        from ..bundle import load_bundle
        from ..engine import Engine

        self.bundle = load_bundle(bundle_path)
        self.engine = Engine(self.bundle, mode='feature_extractor', num_threads=num_threads,
                             low_priority=True)
        self.batch_size = max(1, int(batch_size))
        self.ttn = None
        self.ttn_batch_size = max(1, int(ttn_batch_size))
        self.note: str | None = None
        self.last_mode: str | None = None  # how the last probs() call labelled ('plain' with too few frames)
        if test_time_norm:
            from ..ttn import TestTimeNormSession, TTNError, load_norm_stats

            stats_path = self.bundle.path('norm_stats')
            if stats_path is None:
                self.note = (f'bundle {self.bundle.name} has no norm_stats.npz (add it with '
                             '`edge-tl norm-stats`): plain labels')
            else:
                try:
                    self.ttn = TestTimeNormSession(self.bundle.files['backbone'], load_norm_stats(stats_path),
                                                   threads=num_threads)
                    self.ttn_batch_size = max(self.ttn_batch_size, self.ttn.min_batch)
                except TTNError as e:
                    self.note = f'test-time normalisation unavailable ({e}): plain labels'

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.engine.head.class_names

    @property
    def mode(self) -> str:
        return 'test_time_norm' if self.ttn is not None else 'plain'

    def _probs_ttn(self, images_rgb: np.ndarray, context_rgb: np.ndarray | None) -> np.ndarray:
        from ..engine import softmax
        from ..ttn import balanced_batches

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
        """Class probabilities ``[N,C]`` for RGB images ``[N,H,W,3]`` (any size).

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


def ensemble_probs(p_teacher: np.ndarray, p_student: np.ndarray) -> np.ndarray:
    """Product of experts: the normalised geometric mean of teacher and student class probabilities.

    A label wins only where both find it plausible; under a domain shift teacher and student make
    different mistakes, so the ensemble labels more frames right than either alone (bench.adaptation).
    """
    g = np.sqrt(np.clip(p_teacher, 1e-12, None) * np.clip(p_student, 1e-12, None))
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def non_redundant(probs: np.ndarray, keep: np.ndarray, max_cosine: float,
                  momentum: float = 0.9) -> np.ndarray:
    """EATA's non-redundancy filter (Niu et al. 2022) over frames in stream order: a kept frame stays kept
    only if the cosine similarity of its probability vector with the running mean of the frames kept
    before it is at most ``max_cosine``; the mean moves toward each frame it keeps (``momentum``).

    On robot video the same sign fills many consecutive frames: their pseudo-labels say one thing many
    times, and a round trained on them over-weights it. ``max_cosine >= 1`` keeps everything.
    """
    keep = np.asarray(keep, bool).copy()
    if max_cosine >= 1.0 or not keep.any():
        return keep
    p = np.asarray(probs, np.float64)
    unit = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    mean = None
    for i in np.flatnonzero(keep):
        if mean is not None:
            norm = np.linalg.norm(mean)
            if norm > 0 and float(unit[i] @ mean) / norm > max_cosine:
                keep[i] = False
                continue
        mean = p[i].copy() if mean is None else momentum * mean + (1.0 - momentum) * p[i]
    return keep


def confident_labels(p_teacher: np.ndarray, teacher_classes, head: Head, cfg: AdaptConfig,
                     features: np.ndarray | None = None,
                     p_student: np.ndarray | None = None) -> tuple[list, dict]:
    """Teacher probabilities -> a class name or None per frame, and how they were made.

    Frames are in stream order (:func:`non_redundant` depends on it). With ``cfg.teacher_student_ensemble``
    (and the same classes in teacher and head) the label is the
    top class of :func:`ensemble_probs` of the teacher and the student: ``p_student`` when given, else the
    current head on ``features``. Only labels with confidence >= ``cfg.teacher_min_confidence`` are kept,
    and of those only the non-redundant ones (``cfg.redundancy_max_cosine``, :func:`non_redundant`).
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
        elif features is None or len(features) != len(probs):
            info['ensemble_note'] = 'no stored features for these frames: teacher-only labels'
        else:
            from ..engine import softmax

            probs = ensemble_probs(probs, softmax(head.logits(np.asarray(features, np.float32))))
            info.update(ensemble=True, student='current_head')
    top = np.argmax(probs, axis=1) if len(probs) else np.zeros(0, np.int64)
    conf = probs[np.arange(len(top)), top] if len(probs) else np.zeros(0, np.float32)
    keep = conf >= cfg.teacher_min_confidence
    confident = int(keep.sum())
    keep = non_redundant(probs, keep, cfg.redundancy_max_cosine, cfg.redundancy_momentum)
    info.update(candidates=int(len(probs)), confident=confident, kept=int(keep.sum()),
                redundant=confident - int(keep.sum()))
    info['probs'] = probs  # what the labels come from (callers that report drop it: see label_store)
    return [classes[t] if k else None for t, k in zip(top, keep)], info


def student_side(student: LabelModel | None, head: Head, cfg: AdaptConfig):
    """The re-normalised student of the ensemble, or ``(None, why)`` when the current head is used."""
    if not (cfg.teacher_student_ensemble and cfg.student_test_time_norm) or student is None:
        return None, None
    if tuple(student.class_names) != tuple(head.class_names):
        return None, 'the current head has classes the bundle lacks: the current head is the student side'
    if student.mode != 'test_time_norm':
        return None, student.note
    return student, None


def pseudo_labels(images_rgb: np.ndarray, teacher: LabelModel, head: Head, cfg: AdaptConfig,
                  features: np.ndarray | None = None, student: LabelModel | None = None,
                  context_rgb: np.ndarray | None = None) -> tuple[list, dict]:
    """THE labelling function: RGB frames ``[N,H,W,3]`` -> a class name or None per frame, and how.

    ``teacher`` labels (test-time normalised when it can, ``context_rgb`` filling small batches);
    ``student`` is the bundle's own student as a :class:`LabelModel` (its side of the ensemble when it can
    be re-normalised, see :func:`student_side`), else the current ``head`` on ``features`` is.
    """
    p_teacher = teacher.probs(images_rgb, context_rgb)
    side, note = student_side(student, head, cfg)
    p_student = None
    if side is not None and len(images_rgb):
        p_student = side.probs(images_rgb, context_rgb)
        if side.last_mode != 'test_time_norm':
            p_student, note = None, f'{len(images_rgb)} frames are too few to re-normalise the student'
    names, info = confident_labels(p_teacher, teacher.class_names, head, cfg, features, p_student)
    info.update(mode=teacher.mode, note=teacher.note)
    if note:
        info['student_note'] = note
    return names, info


def frames_to_label(store: FrameStore, arr: StoreArrays, max_frames: int | None = None,
                    min_batch: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Store entries without a topic/teacher label -> ``(stamps, crops, context crops)``.

    The newest ``max_frames`` of them; fewer than ``min_batch`` are padded (``context``) with other stored
    crops, newest first, so test-time normalisation still sees a full batch of the domain.
    """
    todo = [int(s) for s, src in zip(arr.stamps, arr.sources) if src not in ('topic', 'teacher')]
    if max_frames is not None:
        todo = todo[-int(max_frames):]
    if not todo:
        return np.zeros(0, np.int64), np.zeros((0, *store.crop_size, 3), np.uint8), None
    imgs, found = store.crops(todo)
    context = None
    if len(found) < min_batch:
        have = {int(s) for s in found}
        others = [int(s) for s in arr.stamps[::-1] if int(s) not in have]
        context, _ = store.crops(others[:min_batch - len(found)])
    return np.asarray(found, np.int64), imgs, context


def label_store(store: FrameStore, arr: StoreArrays, teacher_path, bundle, head: Head, cfg: AdaptConfig,
                threads: int = 1, max_frames: int | None = None) -> tuple[dict[int, str], dict]:
    """Teacher pseudo-labels (stamp -> class name) for the store's unlabelled entries, and how.

    Runs in the round's worker process; the node writes the labels with ``store.set_label(.., 'teacher')``
    when the round ends, so later rounds do not label the same frames again.
    """
    teacher = LabelModel(teacher_path, num_threads=threads, test_time_norm=cfg.teacher_test_time_norm,
                         ttn_batch_size=cfg.teacher_batch_size)
    student, note = None, None
    unlabelled = any(src not in ('topic', 'teacher') for src in arr.sources)
    if unlabelled and cfg.teacher_student_ensemble and cfg.student_test_time_norm \
            and tuple(bundle.class_names) == tuple(head.class_names):
        try:
            student = LabelModel(bundle.root, num_threads=threads, test_time_norm=True,
                                 ttn_batch_size=cfg.teacher_batch_size)
        except (OSError, ValueError) as e:
            note = f'student re-normalisation unavailable ({" ".join(str(e).split())})'
    min_batch = max([m.ttn_batch_size for m in (teacher, student) if m is not None and m.ttn is not None],
                    default=0)
    stamps, imgs, context = frames_to_label(store, arr, max_frames, min_batch)
    row = {int(s): i for i, s in enumerate(arr.stamps)}
    feats = arr.features[[row[int(s)] for s in stamps]] if all(int(s) in row for s in stamps) else None
    names, info = pseudo_labels(imgs, teacher, head, cfg, feats, student, context)
    if note:
        info['student_note'] = note
    info.pop('probs', None)  # the round reports info as JSON
    labels = {int(s): n for s, n in zip(stamps, names) if n is not None}
    info['labels'] = len(labels)
    return labels, info


def overlay_labels(arr: StoreArrays, labels: dict[int, str], source: str = 'teacher') -> StoreArrays:
    """A copy of ``arr`` with ``labels`` applied where no more trusted label exists (topic wins)."""
    names, sources = list(arr.labels), list(arr.sources)
    for i, s in enumerate(arr.stamps):
        lab = labels.get(int(s))
        if lab is not None and SOURCE_RANK.get(sources[i], 0) <= SOURCE_RANK[source]:
            names[i], sources[i] = lab, source
    return StoreArrays(arr.stamps, arr.features, arr.probs, arr.top, arr.conf, names, sources, arr.created)
