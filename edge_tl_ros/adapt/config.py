"""The settings of an adaptation round (:class:`AdaptConfig`) and what a round returns.

Every field that a user may set is also an adaptation-node parameter (:mod:`edge_tl_ros.settings`):
its name, default, range and description are declared here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..bundle import Head
from ..settings import check, setting
from ..store import LABEL_SOURCES

BIG = 10_000_000


@dataclass
class AdaptConfig:
    """Knobs of an adaptation round; the adaptation node declares the ``param`` ones as parameters."""

    label_sources: tuple = setting(('topic', 'teacher'), 'labels.sources',
                                   'Labels a round may use: any of topic, teacher, self.')
    teacher_min_confidence: float = setting(0.7, 'labels.teacher_min_confidence',
                                            'Confidence needed for a teacher pseudo-label.', (0.0, 1.0))
    self_label_threshold: float = setting(0.95, 'labels.self_threshold',
                                          'Student confidence needed for a self pseudo-label.', (0.0, 1.0))
    redundancy_max_cosine: float = setting(1.0, 'labels.redundancy_max_cosine',
                                           'Drop a pseudo-label whose class probabilities have a cosine '
                                           'similarity above this with the running mean of those kept before '
                                           'it in the round (EATA non-redundancy; 1 = off).', (0.0, 1.0))
    allow_new_classes: bool = setting(False, 'labels.allow_new_classes',
                                      'Labels naming classes the head does not know add classes.')
    min_labelled: int = setting(30, 'round.min_labelled', 'Labelled frames needed before a round trains.',
                                (2, BIG))
    holdout_fraction: float = setting(0.3, 'accept.holdout_fraction',
                                      'Fraction of trusted labels held out to validate a new head.',
                                      (0.05, 0.9))
    margin: float = setting(0.02, 'accept.margin', 'Holdout accuracy must improve by at least this much.',
                            (-1.0, 1.0))
    anchor_tolerance: float = setting(0.05, 'accept.anchor_tolerance',
                                      'Maximum allowed drop of accuracy on the bundle\'s source-domain '
                                      'anchor set.', (0.0, 1.0))
    # research / ablation knobs (bench.adaptation measures each): advanced.*
    l2_to_prior: float = setting(1e-2, 'advanced.l2_to_prior',
                                 'Regularisation of the new head toward the current one.', (0.0, 1e9))
    anchor_replay: float = setting(0.5, 'advanced.anchor_replay',
                                   'Weight of replayed anchor samples relative to local ones (0 = off).',
                                   (0.0, 100.0))
    refit_after_accept: bool = setting(True, 'advanced.refit_after_accept',
                                       'Once accepted, retrain the same recipe on every labelled frame.')
    teacher_student_ensemble: bool = setting(True, 'advanced.teacher_student_ensemble',
                                             'Pseudo-label with the geometric mean of teacher and student '
                                             'probabilities instead of the teacher alone.')
    teacher_test_time_norm: bool = setting(True, 'advanced.teacher_test_time_norm',
                                           'The teacher normalises with statistics of batches of robot '
                                           'frames (needs norm_stats.npz in the teacher bundle).')
    student_test_time_norm: bool = setting(True, 'advanced.student_test_time_norm',
                                           'The ensemble\'s student side is the bundle\'s student '
                                           're-normalised to the robot frames (labels only).')
    adapt_backbone: bool = setting(True, 'advanced.adapt_backbone',
                                   'Also propose the student with its normalisation statistics re-estimated '
                                   'on the stored frames, gated like a head (needs norm_stats and anchor '
                                   'images in the bundle).')
    teacher_batch_size: int = setting(64, 'advanced.teacher_batch_size',
                                      'Frames per test-time-normalisation batch of the labelling models.',
                                      (16, 4096))
    # fixed in the node (tests and benchmarks set them)
    seed: int = setting(0, None, range=(0, 2**63 - 1))
    class_balanced: bool = True
    iters: int = setting(200, None, range=(1, 1_000_000))  # L-BFGS iterations (converges far earlier)
    min_holdout: int = setting(3, None, range=(1, BIG))  # fewer trusted holdout frames: reject
    redundancy_momentum: float = setting(0.9, None, range=(0.0, 0.999))  # EATA's running-mean momentum

    def __post_init__(self):
        self.label_sources = tuple(str(s) for s in self.label_sources)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        srcs = list(self.label_sources)
        if not srcs or not set(srcs) <= set(LABEL_SOURCES) or len(set(srcs)) != len(srcs):
            raise ValueError(f'labels.sources={srcs} must be a non-empty list of distinct values from '
                             f'{list(LABEL_SOURCES)}')
        check(self)


@dataclass
class RoundResult:
    accepted: bool
    reason: str
    head: Head | None = None  # the trained head (accepted or not); unsaved, version = base version
    metrics: dict = field(default_factory=dict)
    teacher_labels: dict = field(default_factory=dict)  # stamp_ns -> class name, for the store
    failed: bool = False  # the round could not run (error, killed worker, timeout)
    backbone: bytes | None = None  # the adapted backbone (serialised ONNX) the head belongs to, if any

    def summary(self) -> dict:
        """JSON-friendly description (no arrays)."""
        return {'accepted': self.accepted, 'reason': self.reason, 'failed': self.failed,
                'metrics': self.metrics}
