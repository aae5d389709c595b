"""Train a linear head on cached backbone features, in numpy, regularised toward the current head.

This is the on-robot training step of adaptation: multinomial logistic regression

    minimise  sum_i s_i * CE(softmax(W x_i + b), y_i) / sum_i s_i
              + l2_to_prior / 2 * (||W - W0||^2 + ||b - b0||^2)

solved full-batch with L-BFGS (two-loop recursion + backtracking line search). ``s_i`` are class-balanced
sample weights; ``W0, b0`` is the prior (current) head, extended with zero rows for classes that only
the robot has seen. Features are standardised internally (so one ``l2_to_prior`` works for any feature
scale) and the returned :class:`~edge_tl_ros.bundle.Head` acts on *raw* features. No torch, no scipy:
the robot runtime has numpy only.
"""

from __future__ import annotations

import time

import numpy as np

from .bundle import Head


class HeadTrainError(ValueError):
    """Inputs that cannot be trained on (shapes, labels outside the class list, incompatible classes)."""


def class_weights(labels: np.ndarray, num_classes: int, balanced: bool = True) -> np.ndarray:
    """Per-sample weights with mean 1; balanced: every present class gets the same total weight."""
    labels = np.asarray(labels, np.int64)
    if not balanced or len(labels) == 0:
        return np.ones(len(labels), np.float64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = np.count_nonzero(counts)
    w = len(labels) / (present * counts[labels])
    return w


def _extend_prior(prior: Head, class_names, features_std, labels, mu, sigma):
    """Prior weights in standardised feature space, extended to ``class_names``; plus a start point."""
    names = tuple(str(c) for c in class_names)
    base = prior.class_names
    if names[:len(base)] != base:
        raise HeadTrainError(f'class_names must start with the prior head\'s {len(base)} classes in order '
                             f'(got {list(names[:len(base)])[:5]}...)')
    C, D = len(names), prior.feature_size
    W0 = np.zeros((C, D), np.float64)
    b0 = np.zeros(C, np.float64)
    # logits = W x + b = (W * sigma) x' + (b + W mu) with x' = (x - mu) / sigma
    W0[:len(base)] = prior.weight.astype(np.float64) * sigma
    b0[:len(base)] = prior.bias.astype(np.float64) + prior.weight.astype(np.float64) @ mu
    Winit, binit = W0.copy(), b0.copy()
    if C > len(base):
        ref = float(np.median(b0[:len(base)])) if len(base) else 0.0
        for c in range(len(base), C):
            sel = labels == c
            if not sel.any():
                continue
            m = features_std[sel].mean(axis=0)
            # nearest-class-mean start: logit_c(x') = m.x' - |m|^2 / 2 (+ the prior biases' level)
            Winit[c] = m
            binit[c] = ref - 0.5 * float(m @ m)
    return names, W0, b0, Winit, binit


def _loss_grad(params, X, Y1h, sw, W0, b0, lam, C, D):
    W = params[:C * D].reshape(C, D)
    b = params[C * D:]
    Z = X @ W.T + b
    Z -= Z.max(axis=1, keepdims=True)
    np.exp(Z, out=Z)
    Z /= Z.sum(axis=1, keepdims=True)  # probabilities
    p_true = np.maximum((Z * Y1h).sum(axis=1), 1e-300)
    loss = -(sw * np.log(p_true)).sum()
    G = (Z - Y1h) * sw[:, None]  # [N, C], already divided by sum(sw) via sw normalisation
    dW = G.T @ X
    db = G.sum(axis=0)
    dW_r = W - W0
    db_r = b - b0
    loss += 0.5 * lam * (float((dW_r * dW_r).sum()) + float(db_r @ db_r))
    dW += lam * dW_r
    db += lam * db_r
    return loss, np.concatenate([dW.ravel(), db])


def _lbfgs(fg, x0, iters: int, m: int = 10, gtol: float = 1e-6):
    """Minimise a smooth convex ``fg(x) -> (f, g)`` with L-BFGS; returns ``(x, f, iterations, converged)``."""
    x = x0.copy()
    f, g = fg(x)
    S, Yk, rho = [], [], []
    g0n = max(np.linalg.norm(g), 1e-12)
    it = 0
    for it in range(1, iters + 1):
        # two-loop recursion
        q = g.copy()
        alphas = []
        for s, y, r in zip(reversed(S), reversed(Yk), reversed(rho)):
            a = r * (s @ q)
            alphas.append(a)
            q -= a * y
        if S:
            q *= (S[-1] @ Yk[-1]) / (Yk[-1] @ Yk[-1])
        else:
            q /= g0n  # first step: unit-length steepest descent
        for (s, y, r), a in zip(zip(S, Yk, rho), reversed(alphas)):
            q += s * (a - r * (y @ q))
        d = -q
        gd = g @ d
        if gd >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            S.clear(), Yk.clear(), rho.clear()
            d = -g / max(np.linalg.norm(g), 1e-12)
            gd = g @ d
        step = 1.0
        for _ in range(30):  # Armijo backtracking
            x_new = x + step * d
            f_new, g_new = fg(x_new)
            if np.isfinite(f_new) and f_new <= f + 1e-4 * step * gd:
                break
            step *= 0.5
        else:
            return x, f, it, False
        s_vec, y_vec = x_new - x, g_new - g
        sy = s_vec @ y_vec
        x, f, g = x_new, f_new, g_new
        if sy > 1e-10:
            S.append(s_vec), Yk.append(y_vec), rho.append(1.0 / sy)
            if len(S) > m:
                S.pop(0), Yk.pop(0), rho.pop(0)
        if np.linalg.norm(g) <= gtol * max(1.0, g0n):
            return x, f, it, True
    return x, f, it, False


def train_head(features: np.ndarray, labels: np.ndarray, prior: Head, class_names=None,
               l2_to_prior: float = 1e-2, class_balanced: bool = True, iters: int = 200, seed: int = 0,
               standardize: bool = True, sample_weight: np.ndarray | None = None,
               info: dict | None = None) -> Head:
    """Fit a linear head on ``features [N,D]`` / ``labels [N]`` (indices into ``class_names``).

    ``class_names`` defaults to the prior's; it may extend them with new classes (appended at the end):
    their rows start at the class mean (nearest-class-mean initialisation) and are regularised toward 0.
    ``l2_to_prior`` pulls every weight and bias toward the prior head (in standardised feature units);
    a huge value returns (numerically) the prior. ``class_balanced`` weights samples inversely to their
    class frequency; ``sample_weight [N]`` multiplies those weights (e.g. to down-weight replayed
    source-domain samples). ``seed`` is accepted for API stability (the solver is deterministic).
    ``info`` (a dict), if given, receives ``iterations``, ``converged``, ``loss``, ``seconds``.
    The returned head has the prior's version; :meth:`HeadRegistry.add` assigns the next one.
    """
    t0 = time.perf_counter()
    del seed  # full-batch L-BFGS from a fixed start is deterministic
    X = np.asarray(features, np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise HeadTrainError(f'features {X.shape} and labels {y.shape} do not match ([N,D] and [N])')
    if X.shape[1] != prior.feature_size:
        raise HeadTrainError(f'features have {X.shape[1]} dims, the prior head expects {prior.feature_size}')
    if len(y) == 0:
        raise HeadTrainError('no training samples')
    if not np.isfinite(X).all():
        raise HeadTrainError('features contain NaN or Inf')
    names = tuple(class_names) if class_names is not None else prior.class_names
    C, D = len(names), X.shape[1]
    if y.min() < 0 or y.max() >= C:
        raise HeadTrainError(f'labels must be in 0..{C - 1}, got {y.min()}..{y.max()}')
    if l2_to_prior < 0:
        raise HeadTrainError('l2_to_prior must be >= 0')

    if standardize:
        mu = X.mean(axis=0)
        sigma = X.std(axis=0)
        sigma = np.where(sigma > 1e-6 * max(1.0, float(np.abs(mu).max(initial=0.0))), sigma, 1.0)
    else:
        mu, sigma = np.zeros(D), np.ones(D)
    Xs = (X - mu) / sigma
    names, W0, b0, Winit, binit = _extend_prior(prior, names, Xs, y, mu, sigma)

    sw = class_weights(y, C, class_balanced)
    if sample_weight is not None:
        extra = np.asarray(sample_weight, np.float64).reshape(-1)
        if extra.shape != sw.shape or not np.isfinite(extra).all() or (extra < 0).any():
            raise HeadTrainError(f'sample_weight must be [N] finite and >= 0, got shape {extra.shape}')
        sw = sw * extra
    if sw.sum() <= 0:
        raise HeadTrainError('all sample weights are zero')
    sw = sw / sw.sum()
    Y1h = np.zeros((len(y), C), np.float64)
    Y1h[np.arange(len(y)), y] = 1.0
    lam = max(float(l2_to_prior), 1e-8)  # a floor keeps separable problems bounded

    def fg(p):
        return _loss_grad(p, Xs, Y1h, sw, W0, b0, lam, C, D)

    p0 = np.concatenate([Winit.ravel(), binit])
    p, loss, n_it, converged = _lbfgs(fg, p0, iters=max(1, int(iters)))
    Ws = p[:C * D].reshape(C, D)
    bs = p[C * D:]
    W = Ws / sigma
    b = bs - W @ mu
    if info is not None:
        info.update(iterations=int(n_it), converged=bool(converged), loss=float(loss),
                    seconds=time.perf_counter() - t0)
    return Head(W.astype(np.float32), b.astype(np.float32), names, prior.version)


def accuracy(head: Head, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``head`` on ``features``/``labels`` (NaN for an empty set)."""
    if len(labels) == 0:
        return float('nan')
    pred = np.argmax(head.logits(np.asarray(features, np.float32)), axis=1)
    return float(np.mean(pred == np.asarray(labels)))
