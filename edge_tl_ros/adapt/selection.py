"""Which frames the robot keeps: the selection policy of the adaptation node (no ROS)."""

from __future__ import annotations

import numpy as np

POLICIES = ('informative', 'uniform')


def informativeness(probs: np.ndarray, teacher_probs: np.ndarray | None = None) -> np.ndarray:
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


class Selector:
    """Keeps about ``rate`` of a stream of frames; stateful (running mean of the scores, random state)."""

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self._score_ema: float | None = None

    def select(self, probs: np.ndarray, teacher_probs: np.ndarray | None = None,
               policy: str = 'informative', rate: float = 0.5) -> np.ndarray:
        """Decide which frames to keep -> bool mask ``[N]``; on average about ``rate`` of the frames.

        ``uniform`` keeps each frame with probability ``rate``. ``informative`` keeps frames with
        probability proportional to :func:`informativeness` (normalised by its running mean, so the
        average rate holds on a stream), with a floor of ``rate / 10`` so confident frames still appear.
        """
        if policy not in POLICIES:
            raise ValueError(f'unknown selection policy {policy!r}; choose one of {list(POLICIES)}')
        rate = float(min(max(rate, 0.0), 1.0))
        p = np.atleast_2d(np.asarray(probs, np.float32))
        n = p.shape[0]
        if policy == 'uniform':
            keep_p = np.full(n, rate)
        else:
            s = informativeness(p, teacher_probs)
            m = float(s.mean())
            self._score_ema = m if self._score_ema is None else 0.95 * self._score_ema + 0.05 * m
            ref = max(self._score_ema, 1e-3)
            keep_p = np.clip(np.maximum(rate * s / ref, rate * 0.1), 0.0, 1.0)
        return self._rng.random(n) < keep_p
