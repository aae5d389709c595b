"""Score calibration and the reject option (numpy only; no torch, no ROS).

- :func:`fit_temperature`: temperature scaling (Guo et al., ICML 2017): the one scalar ``T`` that
  minimises the negative log-likelihood of ``softmax(logits / T)`` on validation data. Exported models
  fold ``1/T`` into their head, so every consumer (ONNX ``full.onnx``, the numpy head, adapted heads
  that start from it) reads calibrated probabilities without knowing about ``T``.
- :func:`ece`: expected calibration error (equal-width confidence bins).
- :func:`reject_threshold`: the ``min_score`` below which a frame is published as no class: the
  score that keeps a chosen fraction of the validation signs; :func:`reject_report` measures false
  accepts of "no sign" input (e.g. GTSDB background crops) at that threshold.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The NLL-minimising temperature in ``[lo, hi]`` (golden-section search on log T; NLL is convex in
    1/T). Raises ``ValueError`` on empty or mismatched input."""
    logits = np.asarray(logits)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise ValueError(f'fit_temperature: {logits.shape} logits for {labels.shape} labels')
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, np.exp(c)), nll(logits, labels, np.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over confidence bins of |accuracy - confidence| x bin share."""
    probs = np.asarray(probs)
    if not len(probs):
        return float('nan')
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side='left') - 1, 0, bins - 1)
    total = 0.0
    for k in range(bins):
        m = which == k
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reject_threshold(probs: np.ndarray, keep: float = 0.99) -> float:
    """The ``min_score`` that keeps (at least) the fraction ``keep`` of these in-domain frames."""
    if not 0.0 < keep <= 1.0:
        raise ValueError('keep must be in (0, 1]')
    conf = np.sort(np.asarray(probs).max(axis=1))
    if not len(conf):
        raise ValueError('reject_threshold: no frames')
    k = int(np.floor((1.0 - keep) * len(conf)))
    return float(conf[min(k, len(conf) - 1)])


def reject_report(signs: np.ndarray, sign_labels: np.ndarray, background: np.ndarray,
                  min_score: float) -> dict:
    """At ``min_score``: the fraction of background frames accepted (published as a class), of sign
    frames accepted, and the accuracy of the accepted signs (``probs`` arrays [N,C])."""
    s_conf, b_conf = signs.max(axis=1), background.max(axis=1) if len(background) else np.zeros(0)
    acc = s_conf >= min_score
    right = signs.argmax(axis=1) == np.asarray(sign_labels)
    return {
        'min_score': round(float(min_score), 5),
        'background_false_accept_rate': round(float((b_conf >= min_score).mean()), 5) if len(b_conf)
        else None,
        'background_n': int(len(b_conf)),
        'sign_accept_rate': round(float(acc.mean()), 5),
        'accepted_sign_accuracy': round(float(right[acc].mean()), 5) if acc.any() else None,
        'sign_n': int(len(s_conf)),
    }
