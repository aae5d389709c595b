"""headtrain: numpy multinomial logistic regression regularised toward a prior head."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.bundle import Head
from edge_tl_ros.headtrain import HeadTrainError, accuracy, class_weights, train_head
from edge_tl_ros.toy import TOY_CLASSES, toy_features, toy_frames, toy_head


def blobs(rng, n, centers, scale=0.3, offset=5.0):
    y = rng.integers(0, len(centers), n)
    x = centers[y] + rng.normal(0, scale, (n, centers.shape[1])) + offset  # offset: raw != standardised
    return x.astype(np.float32), y


def zero_head(C, D, names=None):
    names = names or tuple(f'c{i}' for i in range(C))
    return Head(np.zeros((C, D), np.float32), np.zeros(C, np.float32), names)


def test_learns_separable_problem_and_acts_on_raw_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, (4, 6))
    X, y = blobs(rng, 300, centers)
    Xt, yt = blobs(rng, 300, centers)
    info = {}
    head = train_head(X, y, zero_head(4, 6), l2_to_prior=1e-3, info=info)
    assert accuracy(head, Xt, yt) > 0.97
    assert info['converged'] and info['iterations'] > 0
    assert head.weight.dtype == np.float32 and head.class_names == zero_head(4, 6).class_names


def test_toy_shifted_domain_is_learned_from_the_bundle_head():
    rng = np.random.default_rng(1)
    im, y = toy_frames(rng, 200, shifted=True)
    imt, yt = toy_frames(rng, 200, shifted=True)
    prior = toy_head()
    assert accuracy(prior, toy_features(imt), yt) < 0.2
    head = train_head(toy_features(im), y, prior, l2_to_prior=1e-2)
    assert accuracy(head, toy_features(imt), yt) > 0.95


def test_huge_l2_stays_at_prior():
    rng = np.random.default_rng(2)
    im, y = toy_frames(rng, 100, shifted=True)
    prior = toy_head()
    head = train_head(toy_features(im), y, prior, l2_to_prior=1e8)
    np.testing.assert_allclose(head.weight, prior.weight, atol=1e-4)
    np.testing.assert_allclose(head.bias, prior.bias, atol=1e-4)
    assert head.version == prior.version


def test_class_balancing_matters_on_imbalanced_set():
    rng = np.random.default_rng(3)
    centers = np.array([[0.0, 0.0], [1.2, 0.0]])
    n0, n1 = 970, 30
    X = np.concatenate([centers[0] + rng.normal(0, 0.6, (n0, 2)), centers[1] + rng.normal(0, 0.6, (n1, 2))])
    y = np.array([0] * n0 + [1] * n1)
    Xt = np.concatenate([centers[0] + rng.normal(0, 0.6, (2000, 2)),
                         centers[1] + rng.normal(0, 0.6, (2000, 2))])
    yt = np.array([0] * 2000 + [1] * 2000)
    prior = zero_head(2, 2)

    def recall1(h):
        return accuracy(h, Xt[yt == 1], yt[yt == 1])

    plain = train_head(X, y, prior, l2_to_prior=1e-4, class_balanced=False)
    bal = train_head(X, y, prior, l2_to_prior=1e-4, class_balanced=True)
    # unbalanced: the minority class is mostly predicted as the majority; balanced: recovered
    assert recall1(plain) < 0.35
    assert recall1(bal) > 0.65 and recall1(bal) > recall1(plain) + 0.3
    # balanced accuracy is better
    def bacc(h):
        return 0.5 * (accuracy(h, Xt[yt == 0], yt[yt == 0]) + recall1(h))
    assert bacc(bal) > bacc(plain) + 0.1


def test_class_weights():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.mean() == pytest.approx(1.0)
    assert w[:3].sum() == pytest.approx(w[3])
    np.testing.assert_array_equal(class_weights(np.array([0, 1]), 2, balanced=False), [1, 1])


def test_new_class_extension():
    rng = np.random.default_rng(4)
    im, y = toy_frames(rng, 150)  # the toy head is right on these
    X = toy_features(im)
    # a 4th class the bundle never saw: grey frames
    grey = np.clip(rng.uniform(0.4, 0.6, (50, 1)) + rng.normal(0, 0.02, (50, 3)), 0, 1)
    grey_img = np.broadcast_to((grey * 255).astype(np.uint8)[:, None, None, :], (50, 16, 16, 3))
    Xg = toy_features(np.ascontiguousarray(grey_img))
    names = TOY_CLASSES + ('grey',)
    Xa = np.concatenate([X, Xg])
    ya = np.concatenate([y, np.full(50, 3)])
    head = train_head(Xa, ya, toy_head(), class_names=names, l2_to_prior=1e-2)
    assert head.class_names == names and head.num_classes == 4
    assert accuracy(head, Xg, np.full(50, 3)) > 0.9
    assert accuracy(head, X, y) > 0.9
    # with a huge l2 the new row stays at ~0 and the old ones at the prior
    frozen = train_head(Xa, ya, toy_head(), class_names=names, l2_to_prior=1e8)
    np.testing.assert_allclose(frozen.weight[:3], toy_head().weight, atol=1e-4)
    np.testing.assert_allclose(frozen.weight[3], 0, atol=1e-4)


def test_bad_inputs():
    prior = toy_head()
    X = np.zeros((4, 8), np.float32)
    with pytest.raises(HeadTrainError):
        train_head(X, np.array([0, 1, 2, 3]), prior)  # label out of range
    with pytest.raises(HeadTrainError):
        train_head(np.zeros((4, 7), np.float32), np.zeros(4, int), prior)
    with pytest.raises(HeadTrainError):
        train_head(X, np.zeros(4, int), prior, class_names=('green', 'red', 'blue'))  # reordered
    with pytest.raises(HeadTrainError):
        train_head(X[:0], np.zeros(0, int), prior)


_SPEED = """
import json, time
import numpy as np
from edge_tl_ros.bundle import Head
from edge_tl_ros.headtrain import accuracy, train_head
out = {}
for D in (128, 1280):
    rng = np.random.default_rng(5)
    C, N = 43, 500
    centers = rng.normal(0, 1, (C, D))
    y = rng.integers(0, C, N)
    X = np.maximum(centers[y] + rng.normal(0, 1.5, (N, D)), 0).astype(np.float32)
    prior = Head(rng.normal(0, 0.05, (C, D)), np.zeros(C), tuple(f'c{i}' for i in range(C)))
    t = time.process_time()
    head = train_head(X, y, prior, l2_to_prior=1e-2)
    out[D] = (time.process_time() - t, accuracy(head, X, y))
print(json.dumps(out))
"""


def test_speed_one_core():
    """N=500, C=43, D=128 and 1280 with one BLAS thread (as in the round process): seconds at most."""
    env = dict(os.environ, OMP_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, '-c', _SPEED], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    cpu128, acc128 = res['128']
    cpu1280, acc1280 = res['1280']
    assert acc128 > 0.9 and acc1280 > 0.9
    assert cpu128 < 3 and cpu1280 < 15, res
